//! The separator's blocks, the loss and the engine's micro-batch as tapes (see [`super::tape`]):
//! every op of `sepdist_model::separator`, `loss` and `ops::{norm, rope, attention, stft}` in
//! the order the code runs it, with the same views, copies and broadcasts. A change to those
//! files needs the same change here; `tests/plan.rs` compares the result with the counting
//! allocator and fails when they drift apart.

use super::tape::{Bin, Id, Spectral, Tape, Un};
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
    /// Per band group: (bands, bins per band).
    groups: Vec<(u64, u64)>,
    runs: Vec<Run>,
    /// Mask-estimator widths per group: `D → hidden … → 2·d_g`.
    mask_widths: Vec<Vec<u64>>,
    /// Loss resolutions: (n_fft, frames at the loss hop).
    loss_res: Vec<(u64, u64)>,
    loss: LossShape,
}

/// The loss' weights as far as they change its graph.
#[derive(Debug, Clone)]
struct LossShape {
    l1_weight: f64,
    mse_weight: f64,
    multi_weight: f64,
    /// Source weights other than all 1 (`for_sources`): a weighted difference.
    source_weighted: bool,
    /// `S / Σw == 1`: no rescaling of the parts.
    norm_is_one: bool,
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
        let source_weighted = weights.iter().any(|&w| w != 1.0);
        let norm = if source_weighted {
            weights.len() as f64 / weights.iter().sum::<f64>()
        } else {
            1.0
        };
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
            groups,
            runs: runs
                .into_iter()
                .map(|(g, _, len)| Run { group: g, len })
                .collect(),
            mask_widths,
            loss_res,
            loss: LossShape {
                l1_weight: loss.l1_weight,
                mse_weight: loss.mse_weight,
                multi_weight: loss.multi_stft_resolution_loss_weight,
                source_weighted,
                norm_is_one: norm == 1.0,
            },
        }
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
    t.external(elems, s.es, tracked)
}

/// `ops::norm::rms_norm(x, gamma)` over the last dim of width `d`: `x²`, its mean (a sum and
/// an affine), `+ eps`, `sqrt`, `recip`, and two broadcast products.
fn rms_norm(t: &mut Tape, x: Id, gamma: Id, d: u64) -> Id {
    t.begin();
    let e = t.elems(x);
    let sq = t.unary(Un::Sqr, x);
    let sum = t.sum(sq, e / d);
    let mean = t.affine(sum);
    let eps = t.affine(mean);
    let root = t.unary(Un::Sqrt, eps);
    let inv = t.unary(Un::Recip, root);
    let xn = t.bbinary(Bin::Mul, x, inv, e);
    let out = t.bbinary(Bin::Mul, xn, gamma, e);
    t.end(&[out]);
    out
}

/// `Rope::apply` on a contiguous `[B, H, T, Dh]` tensor with the tables `cos`, `sin`.
fn rope(t: &mut Tape, x: Id, cos: Id, sin: Id) -> Id {
    t.begin();
    let e = t.elems(x);
    let pairs = t.reshape(x);
    let x0 = t.narrow(pairs, e / 2, false);
    let x1 = t.narrow(pairs, e / 2, false);
    let neg = t.unary(Un::Neg, x1);
    // cat along the last dim: both arguments are copy2d-compatible, one new tensor.
    let rotated = t.cat(&[neg, x0]);
    let rotated = t.reshape(rotated);
    let a = t.bbinary(Bin::Mul, x, cos, e);
    let b = t.bbinary(Bin::Mul, rotated, sin, e);
    let out = t.binary(Bin::Add, a, b);
    t.end(&[out]);
    out
}

/// The tensors a micro-batch shares between blocks: the mixture STFT and the RoPE tables.
pub(crate) struct Context {
    pub spec: Id,
    time_cos: Id,
    time_sin: Id,
    band_cos: Id,
    band_sin: Id,
}

/// `Separator::prepare_context`: the mixture STFT (its kernel's `[T, F]` complex scratch is
/// transient) and two RoPE tables of cos and sin (built in f64, then cast).
pub(crate) fn context(t: &mut Tape, s: &Shapes) -> Context {
    let scratch = 2 * s.frames * s.bins * 4;
    t.mem.alloc(scratch);
    let spec = t.leaf(s.spec_elems(), s.es, false);
    t.mem.free(scratch);
    let mut table = |len: u64| {
        let f64s = 2 * len * s.head_dim * 8;
        t.mem.alloc(f64s);
        let cos = t.leaf(len * s.head_dim, s.es, false);
        let sin = t.leaf(len * s.head_dim, s.es, false);
        t.mem.free(f64s);
        (cos, sin)
    };
    let (time_cos, time_sin) = table(s.frames);
    let (band_cos, band_sin) = table(s.bands);
    Context {
        spec,
        time_cos,
        time_sin,
        band_cos,
        band_sin,
    }
}

/// `Block::band_split`: `[B, 2, F, T, 2]` → `[B, T, K, D]`.
fn band_split(t: &mut Tape, s: &Shapes, x: Id, tracked: bool) -> Id {
    t.begin();
    let bt = s.bt();
    let d = s.dim;
    // permute + contiguous + reshape: (bin, channel, re/im) features per frame.
    let perm = t.transpose(x, false);
    let feats = t.contiguous(perm);
    let feats = t.reshape(feats);
    let mut outs = Vec::new();
    for (g, &(n_g, width)) in s.groups.iter().enumerate() {
        t.begin(); // the loop body
        let di = 4 * width;
        let parts: Vec<Id> = s
            .runs
            .iter()
            .filter(|r| r.group == g)
            .map(|r| {
                // A narrow of the feature axis is strided: its reshape copies.
                let v = t.narrow(feats, bt * r.len * di, false);
                t.reshape(v)
            })
            .collect();
        let cat = t.cat(&parts);
        let xg = t.transpose(cat, n_g == 1); // [n_g, BT, d_g]
        let xg = t.contiguous(xg);
        let e = n_g * bt * di;
        let ones = t.leaf(di, s.es, false);
        let xn = rms_norm(t, xg, ones, di);
        let gamma = param(t, s, n_g * di, tracked);
        let gamma = t.squeeze(gamma);
        let xn = t.bbinary(Bin::Mul, xn, gamma, e);
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

/// `Block::forward` of a time (`time == true`) or band transformer.
fn transformer(t: &mut Tape, s: &Shapes, ctx: &Context, x: Id, time: bool, tracked: bool) -> Id {
    t.begin(); // Block::forward
    let u = s.unit();
    let xs = if time {
        // x.transpose(1, 2).contiguous().reshape((B·K, T, D))
        let tr = t.transpose(x, s.frames == 1 || s.bands == 1);
        let c = t.contiguous(tr);
        t.reshape(c)
    } else {
        t.reshape(x)
    };
    let (cos, sin) = if time {
        (ctx.time_cos, ctx.time_sin)
    } else {
        (ctx.band_cos, ctx.band_sin)
    };
    let y = transformer_body(t, s, xs, cos, sin, time, tracked);
    let y = if time {
        let y = t.reshape(y);
        let y = t.transpose(y, s.frames == 1 || s.bands == 1);
        t.contiguous(y)
    } else {
        t.reshape(y)
    };
    let _ = u;
    t.end(&[y]);
    y
}

/// `Block::transformer`: one pre-norm layer over `[N, L, D]`.
fn transformer_body(
    t: &mut Tape,
    s: &Shapes,
    xs: Id,
    cos: Id,
    sin: Id,
    time: bool,
    tracked: bool,
) -> Id {
    t.begin();
    let u = s.unit();
    let d = s.dim;
    let hid = s.ffn[usize::from(!time)];
    let inner = s.heads * s.head_dim;
    let p = |t: &mut Tape, e: u64| param(t, s, e, tracked);
    let g1 = p(t, d);
    let wqkv = p(t, 3 * inner * d);
    let wo = p(t, d * inner);
    let g2 = p(t, d);
    let w1 = p(t, hid * d);
    let b1 = p(t, hid);
    let w2 = p(t, d * hid);
    let b2 = p(t, d);
    // Attention.
    let hn = rms_norm(t, xs, g1, d);
    let hn = t.reshape(hn);
    let wt = t.transpose(wqkv, false);
    let qkv = t.matmul(hn, wt, 3 * u);
    let qkv = t.reshape(qkv);
    let qkv = t.transpose(qkv, false); // permute to [3, N, H, L, Dh]
    let get = |t: &mut Tape| {
        // get(i) = narrow(0, i, 1) + reshape: the narrow of the permuted tensor is strided, so
        // the reshape copies (and the following .contiguous() is free).
        let v = t.narrow(qkv, u, false);
        let v = t.reshape(v);
        t.contiguous(v)
    };
    let q = get(t);
    let q = rope(t, q, cos, sin);
    let k = get(t);
    let k = rope(t, k, cos, sin);
    let v = get(t);
    let fo = t.flash(q, k, v, s.head_dim);
    let o = t.narrow(fo, u, false);
    let o = t.transpose(o, false);
    let o = t.contiguous(o);
    let o = t.reshape(o);
    let wot = t.transpose(wo, false);
    let proj = t.matmul(o, wot, u);
    let proj = t.reshape(proj);
    let xs = t.binary(Bin::Add, xs, proj);
    // Feed-forward.
    let hn = rms_norm(t, xs, g2, d);
    let hn = t.reshape(hn);
    let w1t = t.transpose(w1, false);
    let h = t.matmul(hn, w1t, u / d * hid);
    let h = t.bbinary(Bin::Add, h, b1, u / d * hid);
    let h = t.unary(Un::GeluErf, h);
    let w2t = t.transpose(w2, false);
    let out = t.matmul(h, w2t, u);
    let out = t.bbinary(Bin::Add, out, b2, u);
    let out = t.reshape(out);
    let y = t.binary(Bin::Add, xs, out);
    t.end(&[y]);
    y
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
/// `[B, S, 2, N]`.
fn head(t: &mut Tape, s: &Shapes, ctx: &Context, x: Id) -> Id {
    t.begin();
    let mask = masks(t, s, x);
    let est = apply_mask_istft(t, s, ctx, mask);
    t.end(&[est]);
    est
}

/// `Block::masks`: `[B, T, K, D]` → complex masks `[B, S, 2, F, T, 2]`.
fn masks(t: &mut Tape, s: &Shapes, x: Id) -> Id {
    t.begin();
    let bt = s.bt();
    let d = s.dim;
    let gamma = param(t, s, d, true);
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
    let mut per_source = Vec::new();
    for _ in 0..s.sources {
        t.begin(); // loop body over sources
        let mut outs = Vec::new();
        for (g, &(n_g, width)) in s.groups.iter().enumerate() {
            t.begin(); // loop body over groups
            let widths = &s.mask_widths[g];
            let mut h = t.retain(inputs[g]);
            for l in 0..widths.len() - 1 {
                let w = param(t, s, n_g * widths[l] * widths[l + 1], true);
                let e = n_g * bt * widths[l + 1];
                let m = t.matmul(h, w, e);
                let bias = param(t, s, n_g * widths[l + 1], true);
                let bias = t.squeeze(bias);
                let mut next = t.bbinary(Bin::Add, m, bias, e);
                t.drop_local(m);
                t.drop_local(bias);
                t.drop_local(w);
                if l + 2 < widths.len() {
                    let th = t.unary(Un::Tanh, next);
                    t.drop_local(next);
                    next = th;
                }
                t.drop_local(h); // `h = ...` drops the previous value
                h = next;
            }
            // GLU: first half × sigmoid(second half), sigmoid = (tanh(z/2) + 1)/2.
            let half = n_g * bt * 4 * width;
            let z = t.narrow(h, half, false);
            let z = t.affine(z);
            let z = t.unary(Un::Tanh, z);
            let z = t.affine(z);
            let gate = t.affine(z);
            let a = t.narrow(h, half, false);
            let out = t.binary(Bin::Mul, a, gate);
            t.end(&[out]);
            outs.push(out);
        }
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
        let m = t.transpose(m, false); // permute to [B, 2, F, T, 2]
        t.end(&[m]);
        per_source.push(m);
    }
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

/// `apply_mask_istft`: complex product of the masks with the (untracked) mixture STFT, then
/// the iSTFT.
fn apply_mask_istft(t: &mut Tape, s: &Shapes, ctx: &Context, mask: Id) -> Id {
    t.begin();
    let e_m = t.elems(mask) / 2;
    let e_s = s.spec_elems() / 2;
    let spec = t.squeeze(ctx.spec);
    let mr = t.narrow(mask, e_m, false);
    let mi = t.narrow(mask, e_m, false);
    let sr = t.narrow(spec, e_s, false);
    let si = t.narrow(spec, e_s, false);
    let a = t.bbinary(Bin::Mul, mr, sr, e_m);
    let b = t.bbinary(Bin::Mul, mi, si, e_m);
    let re = t.binary(Bin::Sub, a, b);
    let a = t.bbinary(Bin::Mul, mr, si, e_m);
    let b = t.bbinary(Bin::Mul, mi, sr, e_m);
    let im = t.binary(Bin::Add, a, b);
    let y = t.cat(&[re, im]);
    let (fwd, adj) = istft_scratch(s);
    let est = t.spectral(
        y,
        s.b * s.sources * 2 * s.n,
        fwd,
        Spectral {
            adjoint_scratch: adj,
        },
    );
    t.end(&[est]);
    est
}

/// `SeparationLoss::compute(estimate, target)`: the nodes of `LossParts` (total, waveform,
/// MSE, multi-STFT), all alive until the engine drops the parts after the backward.
fn loss(t: &mut Tape, s: &Shapes, estimate: Id, target: Id) -> [Id; 4] {
    t.begin();
    let l = &s.loss;
    let e = t.elems(estimate);
    let diff = t.binary(Bin::Sub, estimate, target);
    let (weighted, wt) = if l.source_weighted {
        let wt = t.leaf(s.sources, s.es, false);
        (t.bbinary(Bin::Mul, diff, wt, e), Some(wt))
    } else {
        (t.retain(diff), None)
    };
    let scale = |t: &mut Tape, x: Id| {
        if l.norm_is_one {
            x
        } else {
            let y = t.affine(x);
            t.drop_local(x);
            y
        }
    };
    // mean_all = sum_all (a reduction, squeezed) / count (an affine).
    let mean_all = |t: &mut Tape, x: Id| {
        let sm = t.sum(x, 1);
        let sq = t.squeeze(sm);
        let m = t.affine(sq);
        t.drop_local(sm);
        t.drop_local(sq);
        m
    };
    let abs = t.unary(Un::Abs, weighted);
    let waveform = mean_all(t, abs);
    t.drop_local(abs);
    let waveform = scale(t, waveform);
    // The MSE is always computed (its graph lives in the parts even at weight 0).
    let squared = t.unary(Un::Sqr, diff);
    let squared = match wt {
        Some(wt) => t.bbinary(Bin::Mul, squared, wt, e),
        None => squared,
    };
    let mse = mean_all(t, squared);
    let mse = scale(t, mse);
    let mut multi = t.leaf(1, s.es, false); // waveform.zeros_like()
    if l.multi_weight != 0.0 {
        let signals = s.b * s.sources * 2;
        for &(nf, frames) in &s.loss_res {
            let bins = nf / 2 + 1;
            // stft_cpu: a `[T, F]` complex scratch per call; its adjoint a `[T, n_fft]` frame
            // buffer per call and the padded overlap-add buffer per signal.
            let fwd = 2 * frames * bins * 4;
            let adj = frames * nf * 4 + (s.n + nf) * 4;
            let spec = t.spectral(
                weighted,
                signals * bins * frames * 2,
                fwd,
                Spectral {
                    adjoint_scratch: adj,
                },
            );
            let a = t.unary(Un::Abs, spec);
            t.drop_local(spec);
            let m = mean_all(t, a);
            t.drop_local(a);
            let next = t.binary(Bin::Add, multi, m);
            t.drop_local(m);
            t.drop_local(multi);
            multi = next;
        }
        multi = scale(t, multi);
    }
    // Only the parts with a non-zero weight join the total; weight 1 adds the part itself.
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
    let parts = [total, waveform, mse, multi];
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
    /// The head's graph with the loss's.
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
        BlockKind::Time { .. } => transformer(t, s, ctx, x, true, tracked),
        BlockKind::Band { .. } => transformer(t, s, ctx, x, false, tracked),
        BlockKind::Head => head(t, s, ctx, x),
    }
}

/// `engine::Kept`: a block's graph (its input `Var`, none for block 0, and its output), or
/// only its untracked input.
#[derive(Clone, Copy)]
enum Kept {
    Graph(Option<Id>, Id),
    Input(Id),
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
) -> MicroCost {
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
            let y = forward_block(&mut t, s, &ctx, block.kind, x, false);
            kept.push(Kept::Input(x));
            x = y;
        } else {
            // The first block's input is data; later inputs are copied into a Var.
            let input = (i > 0).then(|| t.leaf(t.elems(x), s.es, true));
            let y = forward_block(&mut t, s, &ctx, block.kind, input.unwrap_or(x), true);
            let detached = t.detach(y);
            t.drop_local(x);
            x = detached;
            kept.push(Kept::Graph(input, y));
        }
        cost.kept_per_block
            .push((block.name.clone(), t.mem.live.saturating_sub(before)));
    }
    t.mem.at = format!("forward: {}", blocks[last].name);
    let before = t.mem.live;
    let head_in = t.leaf(t.elems(x), s.es, true);
    let estimate = forward_block(&mut t, s, &ctx, blocks[last].kind, head_in, true);
    t.mem.at = "forward: loss".into();
    let parts = loss(&mut t, s, estimate, target);
    cost.head_and_loss = t.mem.live - before;
    cost.forward_peak = t.mem.peak - data;
    cost.forward_peak_at.clone_from(&t.mem.peak_at);
    cost.kept = t.mem.live - data;
    // Backward of the head and the loss: one backward from the loss.
    t.mem.peak = 0;
    t.mem.at = format!("backward: {} and loss", blocks[last].name);
    let store = t.backward(parts[0]);
    for p in parts {
        t.drop_local(p); // drop((parts, estimate))
    }
    t.drop_local(estimate);
    let mut comm = 0;
    let hook = |t: &mut Tape, i: usize, comm: &mut u64| {
        t.mem.spike(blocks[i].largest_param * 4); // to_vec1 of a gradient into the flat buffer
        if let Some(&b) = buckets_after.get(i) {
            *comm += t.mem.alloc_comm(b);
        }
    };
    hook(&mut t, last, &mut comm);
    t.mem.spike(t.bytes(x)); // `unwrap_or(x.zeros_like()?)` is evaluated eagerly
    let mut g = t.drop_store(store, Some(head_in));
    for i in (0..last).rev() {
        t.mem.at = format!("backward: {}", blocks[i].name);
        let (input, y) = match kept.pop() {
            Some(Kept::Graph(input, y)) => (input, y),
            Some(Kept::Input(xi)) => {
                // Recompute: the same forward, now tracked; the popped input dies at the arm's
                // end (its copy is the Var).
                let input = (i > 0).then(|| t.leaf(t.elems(xi), s.es, true));
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
        hook(&mut t, i, &mut comm);
        if let Some(v) = input {
            t.mem.spike(t.bytes(v)); // `unwrap_or(v.zeros_like()?)`
            let new_g = t.drop_store(store, Some(v));
            t.release(gid);
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
