//! The separator's blocks, the loss and the engine's micro-batch as tapes (see [`super::tape`]):
//! every op of `sepdist_model::separator`, `loss` and `ops::{norm, attn_proj, attention, ffn,
//! grouped_linear, glu, stft, stft_l1}` in the order the code runs it, with the same views, copies and broadcasts (a fused
//! op is one node, see [`super::tape::Fused`]). A change to those
//! files needs the same change here; `tests/plan.rs` compares the result with the counting
//! allocator and fails when they drift apart.

use super::tape::{Bin, Fused, Id, Tape, Un};
use sepdist_config::LossConfig;
use sepdist_model::{BlockKind, Dims, Separator};

/// A maximal run of bands consecutive in frequency and in one group (`bands::Run`).
#[derive(Debug, Clone, Copy)]
struct Run {
    group: usize,
    len: u64,
}

/// Shapes of one micro-batch.
#[derive(Debug, Clone)]
pub(crate) struct Shapes {
    /// Micro-batch (examples per rank per micro-step).
    pub b: u64,
    /// Samples per example.
    pub n: u64,
    pub sources: u64,
    pub frames: u64,
    pub bins: u64,
    pub bands: u64,
    pub dim: u64,
    pub heads: u64,
    pub head_dim: u64,
    pub ffn: [u64; 2],
    pub n_fft: u64,
    pub hop: u64,
    /// Bytes per activation element (4: fp32, 2: bf16).
    pub es: u64,
    /// ZeRO-3: the parameters are gathered per piece into fresh fp32 tensors that live as
    /// long as the graph holds them (otherwise they are the engine's `Var`s, counted outside).
    pub gathered: bool,
    /// Per band group: (bands, bins per band).
    groups: Vec<(u64, u64)>,
    runs: Vec<Run>,
    /// Mask-estimator widths per group: `D → hidden … → 2·d_g`.
    mask_widths: Vec<Vec<u64>>,
    /// Loss resolutions: (n_fft, frames at the loss hop).
    loss_res: Vec<(u64, u64)>,
    /// The loss' STFTs (empty when its STFT term has weight 0).
    loss_stfts: Vec<sepdist_model::ops::Stft>,
    loss: LossShape,
    /// On a GPU the loss' STFT L1 runs as DFT matmuls (`ops::stft_dft`), not the CPU kernel.
    pub gpu: bool,
}

/// The loss' weights as far as they change its graph.
#[derive(Debug, Clone)]
struct LossShape {
    l1_weight: f64,
    mse_weight: f64,
    multi_weight: f64,
    /// Per source: whether its share of the loss (`w_s / Σw`, `1 / S` without source
    /// weights) is 1, so that its parts are not rescaled.
    share_is_one: Vec<bool>,
}

impl Shapes {
    pub fn new(
        dims: &Dims,
        loss: &LossConfig,
        sources: &[String],
        b: usize,
        n: usize,
        es: u64,
    ) -> Self {
        let weights: Vec<f64> = sources
            .iter()
            .map(|s| loss.source_weights.get(s).copied().unwrap_or(1.0))
            .collect();
        // `SeparationLoss::for_sources` keeps weights only when one differs from 1.
        let weighted = weights.iter().any(|&w| w != 1.0);
        let total: f64 = weights.iter().sum();
        let share_is_one = weights
            .iter()
            .map(|&w| {
                let share = if weighted {
                    w / total
                } else {
                    1.0 / weights.len() as f64
                };
                share == 1.0
            })
            .collect();
        let l = &dims.layout;
        let mut runs: Vec<(usize, usize, u64)> = Vec::new(); // (group, last member, len)
        for &(g, m) in &l.band_to_group {
            match runs.last_mut() {
                Some(r) if r.0 == g && r.1 + 1 == m => {
                    r.1 = m;
                    r.2 += 1;
                }
                _ => runs.push((g, m, 1)),
            }
        }
        let groups: Vec<(u64, u64)> = l
            .groups
            .iter()
            .map(|g| (g.bands.len() as u64, g.width as u64))
            .collect();
        let mask_widths = l
            .groups
            .iter()
            .map(|g| {
                let mut w = vec![dims.dim as u64];
                w.extend(std::iter::repeat_n(
                    dims.mask_hidden as u64,
                    dims.mask_depth - 1,
                ));
                w.push(2 * g.dim_in() as u64);
                w
            })
            .collect();
        let loss_res = if loss.multi_stft_resolution_loss_weight != 0.0 {
            loss.multi_stft_resolutions_window_sizes
                .iter()
                .map(|&w| {
                    let nf = w.max(loss.multi_stft_min_n_fft) as u64;
                    (nf, (n / loss.multi_stft_hop_size.max(1)) as u64 + 1)
                })
                .collect()
        } else {
            Vec::new()
        };
        let loss_stfts = if loss.multi_stft_resolution_loss_weight != 0.0 {
            // The config is validated before it is planned: a loss that does not build has
            // nothing to plan.
            sepdist_model::loss::SeparationLoss::new(loss)
                .map(|l| l.resolutions().to_vec())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        Self {
            b: b as u64,
            n: n as u64,
            sources: dims.n_sources as u64,
            frames: (n / dims.hop) as u64 + 1,
            bins: (dims.n_fft / 2 + 1) as u64,
            bands: l.n_bands() as u64,
            dim: dims.dim as u64,
            heads: dims.heads as u64,
            head_dim: dims.head_dim as u64,
            ffn: [dims.ffn[0] as u64, dims.ffn[1] as u64],
            n_fft: dims.n_fft as u64,
            hop: dims.hop as u64,
            es,
            gathered: false,
            groups,
            runs: runs
                .into_iter()
                .map(|(g, _, len)| Run { group: g, len })
                .collect(),
            mask_widths,
            loss_res,
            loss_stfts,
            gpu: false,
            loss: LossShape {
                l1_weight: loss.l1_weight,
                mse_weight: loss.mse_weight,
                multi_weight: loss.multi_stft_resolution_loss_weight,
                share_is_one,
            },
        }
    }

    /// Bytes of the DFT bases of the loss' STFTs on a GPU (f32; `ops::stft_dft`).
    pub fn loss_dft_bases(&self) -> u64 {
        sepdist_model::ops::stft_dft::device_bytes(&self.loss_stfts, 1, self.n as usize, 4).0
    }

    fn bt(&self) -> u64 {
        self.b * self.frames
    }

    /// Elements of a `[B, T, K, D]` activation: the unit of the transformer blocks.
    pub fn unit(&self) -> u64 {
        self.bt() * self.bands * self.dim
    }

    /// Mixture STFT `[B, 2, F, T, 2]`.
    pub fn spec_elems(&self) -> u64 {
        self.b * 4 * self.bins * self.frames
    }
}

/// Parameters of a block: variables (tracked) or detached (the recompute policy's first
/// forward). Their bytes are the parameters' own, accounted outside the tape.
fn param(t: &mut Tape, s: &Shapes, elems: u64, tracked: bool) -> Id {
    if s.gathered {
        t.leaf(elems, 4, tracked)
    } else {
        t.external(elems, s.es, tracked)
    }
}

/// ZeRO-3: per piece, its elements and its per-rank chunk (`zero3::PieceExchange`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Gathers {
    pub world: u64,
    /// Per block before the head: (elements, chunk).
    pub blocks: Vec<(u64, u64)>,
    /// Per source: the head's piece.
    pub head: Vec<(u64, u64)>,
}

impl Gathers {
    /// Transient bytes of gathering a piece, above the level before it: the piece's buffer
    /// with the send and receive buffers (ours, and the MPI backend's owned copies of both, as
    /// a non-blocking collective needs), then with the tensors made from it.
    fn gather(&self, (len, chunk): (u64, u64)) -> u64 {
        let collective = if self.world > 1 {
            len + 2 * (chunk + chunk * self.world)
        } else {
            len
        };
        collective.max(2 * len) * 4
    }

    /// Transient bytes of handing a piece's gradient over: the flat copy of the piece's
    /// gradient with one parameter's `to_vec1`, then with the reduce-scatter's buffers (ours
    /// and the MPI backend's copies).
    fn deliver(&self, (len, chunk): (u64, u64), largest_param: u64) -> u64 {
        let collective = if self.world > 1 {
            2 * (chunk * self.world + chunk)
        } else {
            0
        };
        (len + largest_param.max(collective)) * 4
    }
}

/// `ops::norm::rms_norm(x, gamma)` over rows of width `d` (or `rms_norm_groups`): one fused
/// op keeping `x` and `gamma`.
fn rms_norm(t: &mut Tape, x: Id, gamma: Id, d: u64) -> Id {
    let e = t.elems(x);
    debug_assert_eq!(e % d, 0, "rows of width {d}");
    t.fused(Fused::RmsNorm, &[x, gamma], e, 0)
}

/// The tensors a micro-batch shares between blocks: the mixture STFT (the RoPE tables are
/// allocated with it and live as long; the fused QKV op reads them without a copy).
pub(crate) struct Context {
    pub spec: Id,
}

/// `Separator::prepare_context`: the mixture STFT (its kernel's `[T, F]` complex scratch is
/// transient) and two RoPE tables of cos and sin (built in f64, then cast).
pub(crate) fn context(t: &mut Tape, s: &Shapes) -> Context {
    let scratch = 2 * s.frames * s.bins * 4;
    t.mem.alloc(scratch);
    let spec = t.leaf(s.spec_elems(), s.es, false);
    t.mem.free(scratch);
    for len in [s.frames, s.bands] {
        let f64s = 2 * len * s.head_dim * 8;
        t.mem.alloc(f64s);
        t.leaf(len * s.head_dim, s.es, false); // cos
        t.leaf(len * s.head_dim, s.es, false); // sin
        t.mem.free(f64s);
    }
    Context { spec }
}

/// `frame_features`: permute, contiguous (a copy), reshape: `[B, 2, F, T, 2]` → `[BT, 4F]`.
fn frame_features(t: &mut Tape, x: Id) -> Id {
    t.begin();
    let perm = t.transpose(x, false);
    let copy = t.contiguous(perm);
    let feats = t.reshape(copy);
    t.end(&[feats]);
    feats
}

/// `Block::group_features` of the frame features `feats`: `[n_g, BT, d_g]` (a scope handle).
/// Per run a narrow of the feature axis (strided: its reshape copies), their cat, transposed
/// and copied.
fn group_features(t: &mut Tape, s: &Shapes, feats: Id, g: usize) -> Id {
    t.begin();
    let bt = s.bt();
    let (n_g, width) = s.groups[g];
    let parts: Vec<Id> = s
        .runs
        .iter()
        .filter(|r| r.group == g)
        .map(|r| {
            let v = t.narrow(feats, bt * r.len * 4 * width, false);
            t.reshape(v)
        })
        .collect();
    let cat = t.cat(&parts);
    let tr = t.transpose(cat, n_g == 1 || bt == 1);
    let xg = t.contiguous(tr);
    t.end(&[xg]);
    xg
}

/// `Block::band_split`: `[B, 2, F, T, 2]` → `[B, T, K, D]`.
fn band_split(t: &mut Tape, s: &Shapes, x: Id, tracked: bool) -> Id {
    t.begin();
    let bt = s.bt();
    let d = s.dim;
    let feats = frame_features(t, x);
    let mut outs = Vec::new();
    for (g, &(n_g, width)) in s.groups.iter().enumerate() {
        t.begin(); // the loop body
        let di = 4 * width;
        let xg = group_features(t, s, feats, g); // [n_g, BT, d_g]
        let gamma = param(t, s, n_g * di, tracked);
        let xn = rms_norm(t, xg, gamma, di);
        let w = param(t, s, n_g * di * d, tracked);
        let mm = t.matmul(xn, w, n_g * bt * d);
        let bias = param(t, s, n_g * d, tracked);
        let bias = t.squeeze(bias);
        let out = t.bbinary(Bin::Add, mm, bias, n_g * bt * d);
        t.end(&[out]);
        outs.push(out);
    }
    let parts: Vec<Id> = s
        .runs
        .iter()
        .map(|r| t.narrow(outs[r.group], r.len * bt * d, true))
        .collect();
    let y = t.cat(&parts); // [K, BT, D]
    let y = t.transpose(y, s.bands == 1);
    let y = t.contiguous(y);
    let y = t.reshape(y);
    t.end(&[y]);
    y
}

/// `Block::forward` of a time (`time == true`) or band transformer: the fused ops work on
/// the `[B, T, K, D]` rows as they are, for both kinds.
fn transformer(t: &mut Tape, s: &Shapes, x: Id, time: bool, tracked: bool) -> Id {
    t.begin(); // Block::forward
    let y = transformer_body(t, s, x, time, tracked);
    t.end(&[y]);
    y
}

/// `Block::transformer`: one pre-norm layer of fused ops.
fn transformer_body(t: &mut Tape, s: &Shapes, xs: Id, time: bool, tracked: bool) -> Id {
    t.begin();
    let l = layer(s, time);
    let es = s.es;
    let [g1, wqkv, wo, g2, w1, b1, w2, b2] = layer_param_elems(&l).map(|e| param(t, s, e, tracked));
    // Each intermediate's handle is dropped after its last use (freed when untracked).
    // Attention: the QKV kernel permutes its `[rows, 3·I]` matmul result, made for one chunk
    // of sequences at a time (a temporary).
    let hn = rms_norm(t, xs, g1, l.d);
    let qkv = t.fused(Fused::QkvRope, &[hn, wqkv], 3 * l.rows_inner, l.qkv_scratch);
    t.drop_local(hn);
    let fo = t.fused(Fused::FlashPacked, &[qkv], l.fo, 0);
    t.drop_local(qkv);
    // The output projection gathers `o` into rows (a temporary) for its matmul.
    let xs = t.fused(
        Fused::OutProj {
            rows_inner: l.rows_inner,
        },
        &[fo, wo, xs],
        l.u,
        l.rows_inner * es,
    );
    t.drop_local(fo);
    // Feed-forward: GELU of the hidden layer is a temporary of the second kernel.
    let hn = rms_norm(t, xs, g2, l.d);
    let h = t.fused(Fused::Linear { gelu: false }, &[hn, w1, b1], l.hid, 0);
    t.drop_local(hn);
    let out = t.fused(Fused::Linear { gelu: true }, &[h, w2, b2], l.u, l.hid * es);
    t.drop_local(h);
    let y = t.binary(Bin::Add, xs, out);
    t.end(&[y]);
    y
}

/// What `Block::forward_saved` keeps for `Block::backward_saved` (handles in custody), with
/// the parameters the engine holds from the forward to the backward.
pub(crate) struct Saved {
    time: bool,
    params: [Id; 8],
    kept: Kept1,
}

/// `SavedForward`'s tensors (handles in custody); the norms' outputs and q/k/v only when
/// kept.
struct Kept1 {
    x: Id,
    hn: Option<Id>,
    qkv: Option<Id>,
    fo: Id,
    xs: Id,
    hn2: Option<Id>,
    hid: Id,
}

/// Element counts of a transformer's tensors.
struct Layer {
    u: u64,
    d: u64,
    ffn: u64,
    hid: u64,
    inner: u64,
    rows_inner: u64,
    /// The attention output ‖ log-sum-exp.
    fo: u64,
    /// Bytes of the QKV kernel's temporary: the `[rows, 3·I]` projection of one chunk of
    /// whole sequences (`attn_proj::QKV_CHUNKS`).
    qkv_scratch: u64,
}

/// `attn_proj`'s `QKV_CHUNKS`.
const QKV_CHUNKS: u64 = 8;

fn layer(s: &Shapes, time: bool) -> Layer {
    let u = s.unit();
    let d = s.dim;
    let rows = u / d;
    let ffn = s.ffn[usize::from(!time)];
    let inner = s.heads * s.head_dim;
    // Rows `(a, l, c)`: the time transformer's `a` is the batch, the band transformer's the
    // batch × frames.
    let outer = if time { s.b } else { s.b * s.frames };
    let per_outer = rows / outer.max(1);
    let chunk_rows = outer.div_ceil(QKV_CHUNKS).max(1) * per_outer;
    Layer {
        u,
        d,
        ffn,
        hid: rows * ffn,
        inner,
        rows_inner: rows * inner,
        fo: rows * inner / s.head_dim * (s.head_dim + 1),
        qkv_scratch: chunk_rows * 3 * inner * s.es,
    }
}

/// The element counts of a transformer's parameters, in slot order.
fn layer_param_elems(l: &Layer) -> [u64; 8] {
    let d = l.d;
    [
        d,
        3 * l.inner * d,
        d * l.inner,
        d,
        l.ffn * d,
        l.ffn,
        d * l.ffn,
        d,
    ]
}

/// `Block::forward_kept` without a graph on the (detached) input `xd` with the detached
/// parameters `pd`: the saved tensors in custody; the norms' outputs and q/k/v dropped after
/// their use unless `keep`.
fn forward_kept(
    t: &mut Tape,
    l: &Layer,
    s: &Shapes,
    xd: Id,
    pd: &[Id; 8],
    keep_all: bool,
) -> Kept1 {
    let hn = rms_norm(t, xd, pd[0], l.d);
    let qkv = qkv_projection(t, l, hn, pd);
    let hn = keep(t, hn, keep_all);
    let fo = t.fused(Fused::FlashPacked, &[qkv], l.fo, 0);
    let qkv = keep(t, qkv, keep_all);
    let xs = t.fused(
        Fused::OutProj {
            rows_inner: l.rows_inner,
        },
        &[fo, pd[2], xd],
        l.u,
        l.rows_inner * s.es,
    );
    let hn2 = rms_norm(t, xs, pd[3], l.d);
    let hid = t.fused(
        Fused::Linear { gelu: false },
        &[hn2, pd[4], pd[5]],
        l.hid,
        0,
    );
    let hn2 = keep(t, hn2, keep_all);
    Kept1 {
        x: t.take(xd),
        hn,
        qkv,
        fo: t.take(fo),
        xs: t.take(xs),
        hn2,
        hid: t.take(hid),
    }
}

/// The fused QKV projection of the norm's output `hn` (a scope handle).
fn qkv_projection(t: &mut Tape, l: &Layer, hn: Id, pd: &[Id; 8]) -> Id {
    t.fused(
        Fused::QkvRope,
        &[hn, pd[1]],
        3 * l.rows_inner,
        l.qkv_scratch,
    )
}

/// A scope handle moved into custody when `keep`, else dropped.
fn keep(t: &mut Tape, id: Id, keep: bool) -> Option<Id> {
    if keep {
        Some(t.take(id))
    } else {
        t.drop_local(id);
        None
    }
}

/// The engine's fetch of a transformer's parameters (untracked, in custody) and
/// `Block::layer_params`' detached copies (scope handles).
fn layer_params(t: &mut Tape, s: &Shapes, l: &Layer) -> ([Id; 8], [Id; 8]) {
    let params = layer_param_elems(l).map(|e| {
        let p = param(t, s, e, false);
        t.take(p)
    });
    let pd = params.map(|p| t.detach(p));
    (params, pd)
}

/// `Block::forward_saved` (keep policy): the saved tensors and the parameters in custody, the
/// output as a handle of the caller's scope.
fn transformer_saved(t: &mut Tape, s: &Shapes, x: Id, time: bool) -> (Id, Saved) {
    t.begin();
    let l = layer(s, time);
    let (params, pd) = layer_params(t, s, &l);
    let xd = t.detach(x);
    let kept = forward_kept(t, &l, s, xd, &pd, true);
    let out = t.fused(
        Fused::Linear { gelu: true },
        &[kept.hid, pd[6], pd[7]],
        l.u,
        l.hid * s.es,
    );
    let y = t.binary(Bin::Add, kept.xs, out);
    t.drop_local(out);
    t.end(&[y]);
    (y, Saved { time, params, kept })
}

/// `rms_norm_backward`: one buffer (dx ‖ dγ), dγ copied out; returns (dx, dγ) handles.
fn rms_norm_backward(t: &mut Tape, l: &Layer, es: u64) -> (Id, Id) {
    let packed = t.leaf(l.u + l.d, es, false);
    let dx = t.narrow(packed, l.u, true);
    let dgamma = t.leaf(l.d, es, false);
    t.drop_local(packed);
    (dx, dgamma)
}

/// `Block::ffn_backward`: takes `xs`, `hid`, `hn2` (recomputed when `None`) and `dy` from
/// custody; returns the gradient of `xs` (a scope handle) and five parameter gradients.
fn ffn_backward(
    t: &mut Tape,
    l: &Layer,
    s: &Shapes,
    pd: &[Id; 8],
    [xs, hid]: [Id; 2],
    hn2: Option<Id>,
    dy: Id,
) -> (Id, [Id; 5]) {
    let es = s.es;
    let leaf = |t: &mut Tape, e: u64| t.leaf(e, es, false);
    // gelu_linear_bias_backward: gelu(hid) for dw2, then da, made dhid = da ∘ gelu'(hid) in
    // place.
    let a = leaf(t, l.hid);
    let dw2 = leaf(t, l.d * l.ffn);
    t.drop_local(a);
    let db2 = leaf(t, l.d);
    let dhid = leaf(t, l.hid);
    t.release(hid);
    let hn2 = match hn2 {
        Some(h) => h,
        None => {
            let h = rms_norm(t, xs, pd[3], l.d);
            t.take(h)
        }
    };
    // linear_bias_backward_owned: dw1, then hn2 dropped, then dx; dhid lives to the end.
    let dw1 = leaf(t, l.ffn * l.d);
    t.release(hn2);
    let db1 = leaf(t, l.ffn);
    let dhn2 = leaf(t, l.u);
    t.drop_local(dhid);
    let (dxs_norm, dg2) = rms_norm_backward(t, l, es);
    t.drop_local(dhn2);
    t.release(xs);
    let dxs = t.binary(Bin::Add, dy, dxs_norm);
    t.release(dy);
    t.drop_local(dxs_norm);
    (dxs, [dg2, dw1, db1, dw2, db2])
}

/// `Block::attention_backward`: takes `x`, `hn` and `qkv` (recomputed when `None`) and `fo`
/// from custody and the scope handle `dxs`; returns the gradient of `x` (a scope handle) and
/// three parameter gradients.
#[allow(clippy::too_many_arguments)]
fn attention_backward(
    t: &mut Tape,
    l: &Layer,
    s: &Shapes,
    pd: &[Id; 8],
    x: Id,
    hn: Option<Id>,
    qkv: Option<Id>,
    fo: Id,
    dxs: Id,
) -> (Id, [Id; 3]) {
    let es = s.es;
    let leaf = |t: &mut Tape, e: u64| t.leaf(e, es, false);
    let qkv = match qkv {
        Some(kept) => kept,
        None => {
            let hn = rms_norm(t, x, pd[0], l.d);
            let qkv = qkv_projection(t, l, hn, pd);
            t.drop_local(hn);
            t.take(qkv)
        }
    };
    // out_proj_residual_backward: o gathered for dwo, d_o scattered into dfo.
    let o = leaf(t, l.rows_inner);
    let dwo = leaf(t, l.d * l.inner);
    t.drop_local(o);
    let d_o = leaf(t, l.rows_inner);
    let dfo = leaf(t, l.fo);
    t.drop_local(d_o);
    // The attention backward writes (dq, dk, dv) over q/k/v: `qkv` becomes the gradient.
    t.drop_local(dfo);
    t.release(fo);
    // qkv_rope_backward: the gradient unpacked into rows and dropped, then norm(x) (given or
    // recomputed) and two matmuls.
    let gq = leaf(t, 3 * l.rows_inner);
    t.release(qkv);
    let hn = match hn {
        Some(h) => h,
        None => {
            let h = rms_norm(t, x, pd[0], l.d);
            t.take(h)
        }
    };
    let dwqkv = leaf(t, 3 * l.inner * l.d);
    let dhn = leaf(t, l.u);
    t.release(hn);
    t.drop_local(gq);
    let (dx_norm, dg1) = rms_norm_backward(t, l, es);
    t.drop_local(dhn);
    t.release(x);
    let dx = t.binary(Bin::Add, dxs, dx_norm);
    t.drop_local(dxs);
    t.drop_local(dx_norm);
    (dx, [dg1, dwqkv, dwo])
}

/// `Block::backward_kept` from the output's gradient `dy` (taken), then the engine's part:
/// the parameters dropped, the gradients delivered and dropped. Returns the input's gradient
/// in custody.
fn backward_kept(
    t: &mut Tape,
    l: &Layer,
    s: &Shapes,
    (params, pd): ([Id; 8], [Id; 8]),
    kept: Kept1,
    dy: Id,
    deliver: impl FnOnce(&mut Tape),
) -> Id {
    let (dxs, [dg2, dw1, db1, dw2, db2]) =
        ffn_backward(t, l, s, &pd, [kept.xs, kept.hid], kept.hn2, dy);
    let (dx, [dg1, dwqkv, dwo]) =
        attention_backward(t, l, s, &pd, kept.x, kept.hn, kept.qkv, kept.fo, dxs);
    for p in params {
        t.release(p);
    }
    deliver(t);
    for g in [dg1, dwqkv, dwo, dg2, dw1, db1, dw2, db2] {
        t.drop_local(g);
    }
    t.end(&[dx]);
    t.take(dx)
}

/// `Block::backward_saved` from the output's gradient `dy` (taken), with the engine's
/// delivery of the parameters' gradients: returns the input's gradient in custody.
fn transformer_backward(
    t: &mut Tape,
    s: &Shapes,
    saved: Saved,
    dy: Id,
    deliver: impl FnOnce(&mut Tape),
) -> Id {
    t.begin();
    let l = layer(s, saved.time);
    let pd = saved.params.map(|p| t.detach(p));
    backward_kept(t, &l, s, (saved.params, pd), saved.kept, dy, deliver)
}

/// `Block::backward_recomputed` on the kept input `x` (in custody; the engine drops it after
/// the call, in `deliver`), parameters fetched untracked, the output's gradient `dy` taken:
/// returns the input's gradient in custody.
fn transformer_recomputed_backward(
    t: &mut Tape,
    s: &Shapes,
    x: Id,
    dy: Id,
    time: bool,
    deliver: impl FnOnce(&mut Tape),
) -> Id {
    t.begin();
    let l = layer(s, time);
    let (params, pd) = layer_params(t, s, &l);
    let xd = t.detach(x);
    let kept = forward_kept(t, &l, s, xd, &pd, false);
    backward_kept(t, &l, s, (params, pd), kept, dy, deliver)
}

/// Scratch of the iSTFT kernel of the separator's `n_fft` (window envelope in f64 and its
/// cast, frame buffer, one overlap-add buffer per signal), and of its adjoint (envelope and
/// the `[T, F]` complex scratch).
fn istft_scratch(s: &Shapes) -> (u64, u64) {
    let ola = s.n_fft + (s.frames - 1) * s.hop;
    let fwd = s.frames * s.n_fft * 4 + 16 * ola + 4 * ola;
    let adj = 16 * ola + 2 * s.frames * s.bins * 4;
    (fwd, adj)
}

/// `Block::forward` of the head (`masks` then `apply_mask_istft`): `[B, T, K, D]` → estimate
/// `[B, S, 2, N]`. (The engine runs [`head_source`] instead; this is the inference path.)
fn head(t: &mut Tape, s: &Shapes, ctx: &Context, x: Id) -> Id {
    t.begin();
    let mask = masks(t, s, x);
    let est = apply_mask_istft(t, s, ctx, mask, s.sources);
    t.end(&[est]);
    est
}

/// A source's piece of the head, fetched untracked by the engine for the hand-written
/// backward (ZeRO-3: fresh gathered tensors) and held until the piece's backward is done:
/// the final norm's gamma, then per group per layer the weight and the bias.
struct HeadParams {
    gamma: Id,
    layers: Vec<Vec<[Id; 2]>>,
}

fn head_params(t: &mut Tape, s: &Shapes) -> HeadParams {
    let custody = |t: &mut Tape, e: u64| {
        let p = param(t, s, e, false);
        t.take(p)
    };
    let gamma = custody(t, s.dim);
    let layers = s
        .groups
        .iter()
        .zip(&s.mask_widths)
        .map(|(&(n_g, _), widths)| {
            widths
                .windows(2)
                .map(|w| [custody(t, n_g * w[0] * w[1]), custody(t, n_g * w[1])])
                .collect()
        })
        .collect();
    HeadParams { gamma, layers }
}

impl HeadParams {
    fn release(self, t: &mut Tape) {
        t.release(self.gamma);
        for p in self.layers.into_iter().flatten().flatten() {
            t.release(p);
        }
    }
}

/// `Block::group_rows` of the head's input `x` (a band-major view) and the final norm of
/// them, without a graph: group `g`'s normalised inputs `[n_g, BT, D]` (a scope handle).
fn group_inputs(t: &mut Tape, s: &Shapes, x: Id, gamma: Id, g: usize) -> Id {
    let (bt, d) = (s.bt(), s.dim);
    let xr = t.reshape(x);
    let xk = t.transpose(xr, s.bands == 1 || bt == 1);
    let parts: Vec<Id> = s
        .runs
        .iter()
        .filter(|r| r.group == g)
        .map(|r| t.narrow(xk, r.len * bt * d, s.bands == 1 || bt == 1))
        .collect();
    let rows = t.cat(&parts);
    for p in parts {
        t.drop_local(p);
    }
    t.drop_local(xk);
    t.drop_local(xr);
    let rows_c = t.contiguous(rows); // rms_norm's `contiguous()`
    let e = t.elems(rows_c);
    let h = t.fused(Fused::RmsNorm, &[rows_c, gamma], e, 0);
    t.drop_local(rows_c);
    t.drop_local(rows);
    h
}

/// `Block::head_source_saved`: the mask `[B, 1, 2, F, T, 2]` (a scope handle) and, per group,
/// the mask-estimator layers' outputs (in custody).
fn head_source_saved(t: &mut Tape, s: &Shapes, x: Id, p: &HeadParams) -> (Id, Vec<Vec<Id>>) {
    t.begin();
    let bt = s.bt();
    let mut saved = Vec::new();
    let mut outs = Vec::new();
    for (g, &(n_g, width)) in s.groups.iter().enumerate() {
        let widths = &s.mask_widths[g];
        let mut h = group_inputs(t, s, x, p.gamma, g);
        let mut kept = Vec::new();
        for (l, [w, b]) in p.layers[g].iter().enumerate() {
            let tanh = l + 2 < widths.len();
            let e = n_g * bt * widths[l + 1];
            let next = t.fused(Fused::GroupedLinear { tanh }, &[h, *w, *b], e, 0);
            if l == 0 {
                t.drop_local(h); // the normalised input
            }
            kept.push(t.take(next));
            h = next;
        }
        outs.push(t.fused(Fused::Glu, &[h], n_g * bt * 4 * width, 0));
        saved.push(kept);
    }
    let mask = assemble_mask(t, s, &outs);
    let mask = t.squeeze(mask); // unsqueeze(1)
    t.end(&[mask]);
    (mask, saved)
}

/// `Block::head_source_backward` from the mask's gradient `dmask` (in custody; taken), the
/// saved layer outputs taken: the gradients of the head's input and of the parameters (scope
/// handles).
fn head_source_backward(
    t: &mut Tape,
    s: &Shapes,
    x: Id,
    p: &HeadParams,
    saved: Vec<Vec<Id>>,
    dmask: Id,
) -> (Id, Vec<Id>) {
    t.begin();
    let (bt, d, es) = (s.bt(), s.dim, s.es);
    let leaf = |t: &mut Tape, e: u64| t.leaf(e, es, false);
    let sq = t.squeeze(dmask);
    let dm = frame_features(t, sq);
    t.drop_local(sq);
    t.release(dmask);
    let dxn = leaf(t, bt * s.bands * d);
    let mut grads = Vec::new();
    for (g, (&(n_g, width), mut outs)) in s.groups.iter().zip(saved).enumerate() {
        let widths = &s.mask_widths[g];
        let di = 4 * width;
        let dglu = group_features(t, s, dm, g);
        let mut dh = leaf(t, n_g * bt * 2 * di); // glu_tanh_backward
        t.drop_local(dglu);
        let input = group_inputs(t, s, x, p.gamma, g);
        for l in (0..widths.len() - 1).rev() {
            let tanh = l + 2 < widths.len();
            let y = outs.pop();
            // grouped_linear_backward: gz (tanh: a new buffer, then `dh` dropped), dw, db, dx.
            let gz = if tanh {
                let gz = leaf(t, t.elems(dh));
                t.drop_local(dh);
                gz
            } else {
                dh
            };
            grads.push(leaf(t, n_g * widths[l] * widths[l + 1]));
            grads.push(leaf(t, n_g * widths[l + 1]));
            let dx = leaf(t, n_g * bt * widths[l]);
            t.drop_local(gz);
            if let Some(y) = y {
                t.release(y);
            }
            dh = dx;
        }
        t.drop_local(input);
        // Scattered into `dxn` run by run: a transposed copy of each.
        for r in s.runs.iter().filter(|r| r.group == g) {
            let part = leaf(t, r.len * bt * d);
            t.drop_local(part);
        }
        t.drop_local(dh);
    }
    t.drop_local(dm);
    // rms_norm_backward(x, gamma, dxn): dx ‖ dγ in one buffer, dγ copied out.
    let packed = leaf(t, bt * s.bands * d + d);
    let dx = t.narrow(packed, bt * s.bands * d, true);
    grads.push(leaf(t, d));
    t.drop_local(packed);
    t.drop_local(dxn);
    let kept: Vec<Id> = std::iter::once(dx).chain(grads.iter().copied()).collect();
    t.end(&kept);
    (dx, grads)
}

/// `Block::assemble_mask`: the groups' GLU outputs (scope handles, dropped) → the complex mask
/// `[B, 2, F, T, 2]` (a permuted view of the concatenation).
fn assemble_mask(t: &mut Tape, s: &Shapes, outs: &[Id]) -> Id {
    let bt = s.bt();
    let parts: Vec<Id> = s
        .runs
        .iter()
        .map(|r| {
            let di = 4 * s.groups[r.group].1;
            let v = t.narrow(outs[r.group], r.len * bt * di, true);
            // transpose(0, 1) is contiguous only for a single band (or frame).
            let v = t.transpose(v, r.len == 1 || bt == 1);
            t.reshape(v)
        })
        .collect();
    let m = t.cat(&parts); // [BT, 4F]
    let m = t.reshape(m);
    t.transpose(m, false) // permute to [B, 2, F, T, 2]
}

/// `Block::masks`: `[B, T, K, D]` → complex masks `[B, S, 2, F, T, 2]`.
fn masks(t: &mut Tape, s: &Shapes, x: Id) -> Id {
    t.begin();
    let gamma = param(t, s, s.dim, true);
    let inputs = mask_inputs(t, s, x, gamma);
    let per_source: Vec<Id> = (0..s.sources).map(|_| source_mask(t, s, &inputs)).collect();
    // Tensor::stack(_, 1): unsqueeze each; the permuted tensors are not copy2d-compatible, so
    // cat transposes them to dim 0, copies (cat0) and transposes back.
    let unsq: Vec<Id> = per_source.iter().map(|&m| t.squeeze(m)).collect();
    let mask = if unsq.len() == 1 {
        t.retain(unsq[0])
    } else {
        let tr: Vec<Id> = unsq.iter().map(|&m| t.transpose(m, false)).collect();
        let c = t.cat(&tr);
        t.transpose(c, false)
    };
    t.end(&[mask]);
    mask
}

/// `Block::mask_inputs`: the final RMSNorm, then per band group its bands' features
/// `[n_g, BT, D]`.
fn mask_inputs(t: &mut Tape, s: &Shapes, x: Id, gamma: Id) -> Vec<Id> {
    t.begin();
    let bt = s.bt();
    let d = s.dim;
    let xn = rms_norm(t, x, gamma, d);
    let xn = t.reshape(xn);
    let xk = t.transpose(xn, s.bands == 1 || bt == 1);
    let xk = t.contiguous(xk); // [K, BT, D]
    let inputs: Vec<Id> = (0..s.groups.len())
        .map(|g| {
            t.begin(); // the closure
            let parts: Vec<Id> = s
                .runs
                .iter()
                .filter(|r| r.group == g)
                .map(|r| t.narrow(xk, r.len * bt * d, true))
                .collect();
            let c = t.cat(&parts);
            t.end(&[c]);
            c
        })
        .collect();
    t.end(&inputs);
    inputs
}

/// `Block::source_mask`: one source's mask estimator on the group inputs → its complex mask
/// `[B, 2, F, T, 2]`.
fn source_mask(t: &mut Tape, s: &Shapes, inputs: &[Id]) -> Id {
    t.begin();
    let bt = s.bt();
    let mut outs = Vec::new();
    for (g, &(n_g, width)) in s.groups.iter().enumerate() {
        t.begin(); // loop body over groups
        let widths = &s.mask_widths[g];
        let mut h = t.retain(inputs[g]);
        for l in 0..widths.len() - 1 {
            // One fused layer (tanh between layers) keeping its input and output.
            let w = param(t, s, n_g * widths[l] * widths[l + 1], true);
            let bias = param(t, s, n_g * widths[l + 1], true);
            let tanh = l + 2 < widths.len();
            let e = n_g * bt * widths[l + 1];
            let next = t.fused(Fused::GroupedLinear { tanh }, &[h, w, bias], e, 0);
            t.drop_local(w);
            t.drop_local(bias);
            t.drop_local(h); // `h = ...` drops the previous value
            h = next;
        }
        // GLU: one fused op keeping `h`.
        let out = t.fused(Fused::Glu, &[h], n_g * bt * 4 * width, 0);
        t.end(&[out]);
        outs.push(out);
    }
    let m = assemble_mask(t, s, &outs);
    t.end(&[m]);
    m
}

/// `apply_mask_istft` (`Stft::inverse_masked`): the iSTFT of the complex product of the masks
/// of `sources` sources with the (untracked) mixture STFT, one fused op keeping both. Its
/// kernel copies the (strided) mask into the product's buffer, then runs the iSTFT.
fn apply_mask_istft(t: &mut Tape, s: &Shapes, ctx: &Context, mask: Id, sources: u64) -> Id {
    t.begin();
    let product = t.elems(mask) * s.es;
    let out = s.b * sources * 2 * s.n;
    let (scratch, adjoint_scratch, product_scratch) = if s.gpu {
        // DFT matmuls (`ops::stft_dft`): the product, its frame-major copy and the matmul's
        // input; the result's copy attached to the graph. Backward: the adjoint's spectra
        // being reordered next to `dy`, then half of `dmask`'s partial products.
        (3 * product + out * s.es, 2 * product, 3 * product / 2)
    } else {
        let (fwd, adj) = istft_scratch(s);
        (product + fwd, adj, 0)
    };
    let est = t.fused(
        Fused::MaskedIstft {
            adjoint_scratch,
            product_scratch,
        },
        &[mask, ctx.spec],
        out,
        scratch,
    );
    t.end(&[est]);
    est
}

/// `mean_all` = `sum_all` (a reduction, squeezed) / count (an affine).
fn mean_all(t: &mut Tape, x: Id) -> Id {
    let sm = t.sum(x, 1);
    let sq = t.squeeze(sm);
    let m = t.affine(sq);
    t.drop_local(sm);
    t.drop_local(sq);
    m
}

/// A part times a scale other than 1 (an affine); the part itself for 1.
fn scaled(t: &mut Tape, x: Id, is_one: bool) -> Id {
    if is_one {
        x
    } else {
        let y = t.affine(x);
        t.drop_local(x);
        y
    }
}

/// `SeparationLoss::multi_stft` of the difference `d`: the fused sum over the resolutions of
/// the mean absolute STFT (`stft_l1::multi_stft_l1`, keeping only `d`), scaled; zeros when its
/// weight is 0.
fn multi_stft(t: &mut Tape, s: &Shapes, d: Id, scale_is_one: bool) -> Id {
    if s.loss.multi_weight == 0.0 {
        return t.leaf(1, s.es, false); // zeros_like
    }
    let multi = if s.loss_res.is_empty() {
        t.leaf(1, s.es, false) // no resolutions: zeros
    } else if s.gpu {
        // DFT matmuls in chunks of frames: the gradient (d's size, f32) is computed with the
        // value and held by the op until the backward returns it scaled; the chunks' spectra
        // come and go meanwhile.
        let signals = (t.elems(d) / s.n.max(1)) as usize;
        let (_, working, _) =
            sepdist_model::ops::stft_dft::device_bytes(&s.loss_stfts, signals, s.n as usize, 4);
        let grad = t.leaf(t.elems(d), 4, false);
        let out = t.fused(Fused::MultiStftL1 { scratch: 0 }, &[d, grad], 1, working);
        t.drop_local(grad);
        out
    } else {
        // Per resolution (one at a time), the forward holds a window, a frame's buffers and an
        // f64 sum per frame; the backward a `[T, n_fft]` frame buffer and the padded
        // overlap-add of one signal, on top of `dx`.
        let (mut fwd, mut bwd) = (0, 0);
        for &(nf, frames) in &s.loss_res {
            let buffers = 4 * nf * s.es;
            fwd = fwd.max(frames * 8 + buffers);
            bwd = bwd.max((frames * nf + s.n + nf) * s.es + buffers);
        }
        t.fused(Fused::MultiStftL1 { scratch: bwd }, &[d], 1, fwd)
    };
    scaled(t, multi, scale_is_one)
}

/// `SeparationLoss::parts`: the total of the parts with a non-zero weight; weight 1 adds the
/// part itself.
fn loss_parts(t: &mut Tape, s: &Shapes, waveform: Id, mse: Id, multi: Id) -> [Id; 4] {
    let l = &s.loss;
    let mut total: Option<Id> = None;
    for (part, w) in [
        (waveform, l.l1_weight),
        (mse, l.mse_weight),
        (multi, l.multi_weight),
    ] {
        if w != 0.0 {
            let term = if w == 1.0 {
                t.retain(part)
            } else {
                t.affine(part)
            };
            total = Some(match total {
                None => term,
                Some(acc) => {
                    let sum = t.binary(Bin::Add, acc, term);
                    t.drop_local(acc);
                    t.drop_local(term);
                    sum
                }
            });
        }
    }
    let total = total.unwrap_or_else(|| t.leaf(1, s.es, false));
    [total, waveform, mse, multi]
}

/// `SeparationLoss::compute_source(estimate, target)` of one source (`estimate` and `target`
/// `[B, 1, 2, N]`): the nodes of its `LossParts`, alive until the engine drops them after the
/// source's backward.
fn loss_source(t: &mut Tape, s: &Shapes, source: usize, estimate: Id, target: Id) -> [Id; 4] {
    t.begin();
    // The source's share `w_s / Σw` (`1 / S`) scales each mean unless it is 1.
    let one = s.loss.share_is_one.get(source).copied().unwrap_or(false);
    let diff = t.binary(Bin::Sub, estimate, target);
    let abs = t.unary(Un::Abs, diff);
    let waveform = mean_all(t, abs);
    t.drop_local(abs);
    let waveform = scaled(t, waveform, one);
    let squared = t.unary(Un::Sqr, diff);
    let mse = mean_all(t, squared);
    t.drop_local(squared);
    let mse = scaled(t, mse, one);
    let multi = multi_stft(t, s, diff, one);
    let parts = loss_parts(t, s, waveform, mse, multi);
    t.end(&parts);
    parts
}

/// What one micro-batch costs, in bytes above the level at the start of its forward.
#[derive(Debug, Clone, Default)]
pub(crate) struct MicroCost {
    /// Highest level during the forward (context, blocks, head and loss).
    pub forward_peak: u64,
    pub forward_peak_at: String,
    /// Level once the loss is computed: everything the forward keeps for the backward.
    pub kept: u64,
    /// Highest level during the backward.
    pub backward_peak: u64,
    /// Communication buffers in flight at the backward's peak.
    pub comm_at_backward_peak: u64,
    pub backward_peak_at: String,
    /// Bytes each block's forward adds to the kept level.
    pub kept_per_block: Vec<(String, u64)>,
    /// The head's input Var and the first source's head and loss graphs (the head runs one
    /// source at a time).
    pub head_and_loss: u64,
    /// Bytes of the communication buffers started during the backward and still in flight
    /// at its end.
    pub comm_in_flight: u64,
    /// Level when the micro-batch returns (what outlives it: communication buffers).
    pub end: u64,
}

/// Block descriptions the micro-batch needs from the separator.
pub(crate) struct BlockInfo {
    pub name: String,
    pub kind: BlockKind,
    /// Largest parameter (elements), for the gradient copy into the flat buffer.
    pub largest_param: u64,
}

pub(crate) fn block_infos(sep: &Separator) -> Vec<BlockInfo> {
    sep.blocks()
        .iter()
        .map(|b| BlockInfo {
            name: b.name().to_string(),
            kind: b.kind(),
            largest_param: b
                .param_specs()
                .iter()
                .map(|p| p.numel() as u64)
                .max()
                .unwrap_or(0),
        })
        .collect()
}

fn forward_block(
    t: &mut Tape,
    s: &Shapes,
    ctx: &Context,
    kind: BlockKind,
    x: Id,
    tracked: bool,
) -> Id {
    match kind {
        BlockKind::BandSplit => band_split(t, s, x, tracked),
        BlockKind::Time { .. } => transformer(t, s, x, true, tracked),
        BlockKind::Band { .. } => transformer(t, s, x, false, tracked),
        BlockKind::Head => head(t, s, ctx, x),
    }
}

/// `engine::Kept`: a block's graph (its input `Var`, none for block 0, and its output), or
/// only its untracked input.
enum Kept {
    Graph(Option<Id>, Id),
    Saved(Saved),
    Input(Id),
}

/// For the transformers, which run their hand-written backward (`Block::has_own_backward`):
/// whether it is the time transformer.
fn transformer_time(kind: BlockKind) -> Option<bool> {
    match kind {
        BlockKind::Time { .. } => Some(true),
        BlockKind::Band { .. } => Some(false),
        _ => None,
    }
}

/// `Engine::forward_backward_with` for one micro-batch of `s` (the batch's target tensor
/// included). `buckets_after[i]`: bytes of communication buffers the trainer starts once block
/// `i`'s backward is done (empty: none). Levels are bytes above the level at the forward's
/// start, the target excluded.
pub(crate) fn micro_batch(
    s: &Shapes,
    blocks: &[BlockInfo],
    recompute: bool,
    buckets_after: &[u64],
    gathers: Option<&Gathers>,
) -> MicroCost {
    let gather = |t: &mut Tape, piece: Option<(u64, u64)>| {
        if let (Some(g), Some(p)) = (gathers, piece) {
            t.mem.spike(g.gather(p));
        }
    };
    // The gradient's copy out of the store: into the flat buffer, or (ZeRO-3) the piece's.
    let deliver = |t: &mut Tape, piece: Option<(u64, u64)>, largest: u64| match (gathers, piece) {
        (Some(g), Some(p)) => t.mem.spike(g.deliver(p, largest)),
        _ => t.mem.spike(largest * 4),
    };
    let block_piece = |i: usize| gathers.and_then(|g| g.blocks.get(i).copied());
    let head_piece = |src: usize| gathers.and_then(|g| g.head.get(src).copied());
    let mut t = Tape::new();
    let mut cost = MicroCost::default();
    // The trainer's batch tensors: the stems are the loss' target.
    let target = t.leaf(s.b * s.sources * 2 * s.n, s.es, false);
    let data = t.mem.live;
    t.begin(); // forward_backward_with
    t.mem.at = "forward: mixture STFT".into();
    let ctx = context(&mut t, s);
    let last = blocks.len() - 1;
    let mut kept: Vec<Kept> = Vec::new();
    let mut x = t.retain(ctx.spec);
    for (i, block) in blocks[..last].iter().enumerate() {
        t.mem.at = format!("forward: {}", block.name);
        let before = t.mem.live;
        if recompute {
            gather(&mut t, block_piece(i));
            let y = forward_block(&mut t, s, &ctx, block.kind, x, false);
            kept.push(Kept::Input(x));
            x = y;
        } else if let Some(time) = transformer_time(block.kind) {
            gather(&mut t, block_piece(i));
            let (y, saved) = transformer_saved(&mut t, s, x, time);
            kept.push(Kept::Saved(saved));
            t.drop_local(x);
            x = y;
        } else {
            // The first block's input is data; later inputs are copied into a Var.
            let input = (i > 0).then(|| t.leaf(t.elems(x), s.es, true));
            gather(&mut t, block_piece(i));
            let y = forward_block(&mut t, s, &ctx, block.kind, input.unwrap_or(x), true);
            let detached = t.detach(y);
            t.drop_local(x);
            x = detached;
            kept.push(Kept::Graph(input, y));
        }
        cost.kept_per_block
            .push((block.name.clone(), t.mem.live.saturating_sub(before)));
    }
    // The head and the loss, one source at a time: the mask without a graph, the iSTFT and
    // the loss with one from the mask's Var, their backward, the head's hand-written backward,
    // gradients added. The backward starts (the kept level) once the first source's loss is
    // computed.
    let head_start = t.mem.live;
    // x.detach(); drop(x).
    let head_in = t.detach(x);
    t.drop_local(x);
    let source_elems = s.b * 2 * s.n;
    let mut g: Option<Id> = None;
    for src in 0..s.sources {
        let name = &blocks[last].name;
        t.mem.at = if src == 0 {
            format!("forward: {name}, source 0")
        } else {
            format!("backward: {name}, forward of source {src}")
        };
        t.begin(); // the loop body
        gather(&mut t, head_piece(src as usize));
        let params = head_params(&mut t, s);
        let (mask, saved) = head_source_saved(&mut t, s, head_in, &params);
        // Var::from_tensor: a copy of the (permuted) mask.
        let var = t.leaf(t.elems(mask), s.es, true);
        let estimate = apply_mask_istft(&mut t, s, &ctx, var, 1);
        t.drop_local(mask);
        if src == 0 {
            t.mem.at = "forward: loss, source 0".into();
        }
        let target_s = t.narrow(target, source_elems, s.b == 1 || s.sources == 1);
        let parts = loss_source(&mut t, s, src as usize, estimate, target_s);
        t.drop_local(target_s); // a temporary of the statement
        if src == 0 {
            cost.head_and_loss = t.mem.live - head_start;
            cost.forward_peak = t.mem.peak - data;
            cost.forward_peak_at.clone_from(&t.mem.peak_at);
            cost.kept = t.mem.live - data;
            t.mem.peak = 0;
        }
        t.mem.at = format!("backward: {name} and loss, source {src}");
        let store = t.backward(parts[0]);
        for p in parts {
            t.drop_local(p); // drop((parts, estimate))
        }
        t.drop_local(estimate);
        // The mask's gradient (detached) kept, the rest of the store and the Var dropped.
        let dmask = t
            .drop_store(store, Some(var))
            .unwrap_or_else(|| t.leaf(t.elems(var), s.es, false));
        t.drop_local(var);
        t.mem.at = format!("backward: {name}, source {src}");
        let (dx, grads) = head_source_backward(&mut t, s, head_in, &params, saved, dmask);
        params.release(&mut t);
        // to_vec1 of each of the piece's gradients into the flat buffer.
        deliver(&mut t, head_piece(src as usize), blocks[last].largest_param);
        for gr in grads {
            t.drop_local(gr);
        }
        // The trunk output's gradient added to the sum of the previous sources'.
        g = Some(match g {
            None => t.take(dx),
            Some(acc) => {
                let sum = t.binary(Bin::Add, acc, dx);
                t.release(acc);
                t.drop_local(dx);
                t.take(sum)
            }
        });
        t.end(&[]);
    }
    let mut comm = 0;
    let comm_after = |t: &mut Tape, i: usize, comm: &mut u64| {
        if let Some(&b) = buckets_after.get(i) {
            *comm += t.mem.alloc_comm(b);
        }
    };
    comm_after(&mut t, last, &mut comm);
    // drop(head_in): the trunk's output.
    t.drop_local(head_in);
    for i in (0..last).rev() {
        t.mem.at = format!("backward: {}", blocks[i].name);
        let (input, y) = match kept.pop() {
            Some(Kept::Graph(input, y)) => (input, y),
            Some(Kept::Saved(saved)) => {
                let Some(gid) = g else { break };
                g = Some(transformer_backward(&mut t, s, saved, gid, |t| {
                    deliver(t, block_piece(i), blocks[i].largest_param)
                }));
                comm_after(&mut t, i, &mut comm);
                continue;
            }
            Some(Kept::Input(xi)) if transformer_time(blocks[i].kind).is_some() => {
                let Some(gid) = g else { break };
                let time = transformer_time(blocks[i].kind) == Some(true);
                gather(&mut t, block_piece(i));
                // The engine drops its kept input after the call, before the delivery.
                let xi = t.take(xi);
                g = Some(transformer_recomputed_backward(
                    &mut t,
                    s,
                    xi,
                    gid,
                    time,
                    |t| {
                        t.release(xi);
                        deliver(t, block_piece(i), blocks[i].largest_param)
                    },
                ));
                comm_after(&mut t, i, &mut comm);
                continue;
            }
            Some(Kept::Input(xi)) => {
                // Recompute: the same forward, now tracked; the popped input dies at the arm's
                // end (its copy is the Var).
                let input = (i > 0).then(|| t.leaf(t.elems(xi), s.es, true));
                gather(&mut t, block_piece(i));
                let y = forward_block(&mut t, s, &ctx, blocks[i].kind, input.unwrap_or(xi), true);
                t.drop_local(xi);
                (input, y)
            }
            None => break,
        };
        // (y * &g)?.sum_all()?.backward()?: y moves into the product; the temporaries (and
        // with them the block's graph) are dropped after the statement.
        let Some(gid) = g else { break };
        let prod = t.binary(Bin::Mul, y, gid);
        t.drop_local(y);
        let sum = t.sum(prod, 1);
        let root = t.squeeze(sum);
        let store = t.backward(root);
        t.drop_local(root);
        t.drop_local(sum);
        t.drop_local(prod);
        deliver(&mut t, block_piece(i), blocks[i].largest_param);
        comm_after(&mut t, i, &mut comm);
        if let Some(v) = input {
            // The input's gradient, detached (its chain of temporaries is freed with the store).
            let kept = store.get(&v).copied();
            let new_g = kept.map(|k| {
                let d = t.detach(k);
                t.take(d)
            });
            t.release(gid);
            t.drop_store(store, None);
            g = new_g;
            t.drop_local(v);
        } else {
            t.drop_store(store, None);
        }
    }
    if let Some(gid) = g {
        t.release(gid);
    }
    t.end(&[]);
    cost.backward_peak = t.mem.peak.saturating_sub(data);
    cost.backward_peak_at.clone_from(&t.mem.peak_at);
    cost.comm_at_backward_peak = t.mem.comm_at_peak;
    cost.comm_in_flight = comm;
    cost.end = t.mem.live.saturating_sub(data);
    cost
}
