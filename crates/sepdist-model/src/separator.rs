//! The BS-RoFormer separator of MODEL.md as a chain of pure blocks.
//!
//! Layouts:
//! - mixture `[B, 2, N]`; its STFT (the input of `band_split`) `[B, 2, F, T, 2]` with (re, im)
//!   last;
//! - between blocks `[B, T, K, D]` (frames, bands, embedding);
//! - output of `head` `[B, S, 2, N]`.
//!
//! Band-split features of band `k` (width `f_k`, first bin `s_k`) are ordered
//! `(bin, channel, re/im)`, re/im fastest: feature `(j·2 + c)·2 + r` is bin `s_k + j`, channel
//! `c`, part `r` (the `b t (f s c)` order of lucidrains' BS-RoFormer). Mask-estimator outputs use
//! the same order.
//!
//! Parameter names and shapes (`g` = band group, see [`crate::bands`], `n_g` bands of width
//! `w_g`, `d_g = 4·w_g`, `I = H·Dh`):
//! - `band_split.groups.{g}.norm.gamma` `[n_g, d_g]`, `band_split.groups.{g}.linear.weight`
//!   `[n_g, d_g, D]` (in × out, so a band's map is `x · W[j] + b[j]`), `.linear.bias` `[n_g, D]`;
//! - `layers.{i}.{time|band}.attn.norm.gamma` `[D]`, `.attn.qkv.weight` `[3·I, D]` (PyTorch
//!   out × in; output features ordered (q|k|v, head, dh)), `.attn.out.weight` `[D, I]`,
//!   `.ff.norm.gamma` `[D]`, `.ff.fc1.weight` `[h, D]`, `.ff.fc1.bias` `[h]`, `.ff.fc2.weight`
//!   `[D, h]`, `.ff.fc2.bias` `[D]`;
//! - `final_norm.gamma` `[D]`;
//! - `mask_estimators.{s}.groups.{g}.layers.{l}.weight` `[n_g, in_l, out_l]` (`s` the source
//!   name, or its index with [`Separator::new`]), `.bias`
//!   `[n_g, out_l]`, `l < mask_depth`, widths `D → mask_hidden → … → 2·d_g`.

use crate::bands::BandLayout;
use crate::error::{ModelError, Result};
use crate::ops::{self, SeqLayout, attention, attn_proj, ffn, norm, rope::Rope, stft::Stft};
use crate::params::{Init, ParamSpec, count_scalars, select_params};
use candle_core::{DType, Device, Tensor};
use sepdist_config::ModelConfig;
use std::collections::BTreeMap;
use std::sync::Arc;

/// RMSNorm epsilon (inside the square root). A config key may come later.
pub const RMS_EPS: f64 = 1e-6;
/// RoPE frequency base (lucidrains' rotary-embedding-torch default).
pub const ROPE_BASE: f64 = 10_000.0;

/// Sizes the blocks need, derived from a validated [`ModelConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct Dims {
    pub n_fft: usize,
    pub hop: usize,
    pub layout: BandLayout,
    pub n_layers: usize,
    pub dim: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// `[time, band]` feed-forward hidden widths.
    pub ffn: [usize; 2],
    pub mask_hidden: usize,
    pub mask_depth: usize,
    pub n_sources: usize,
    /// Names of the mask estimators' parameters (`mask_estimators.{name}`): the source names,
    /// so that a checkpoint's heads load by source, whatever the order or subset of sources.
    pub source_names: Vec<String>,
}

impl Dims {
    /// Checks every rule the model itself relies on.
    pub fn new(cfg: &ModelConfig, n_sources: usize) -> Result<Self> {
        let bad = |m: String| Err(ModelError::Config(m));
        if cfg.n_fft < 4 || cfg.n_fft % 2 != 0 {
            return bad(format!("n_fft must be even and >= 4, got {}", cfg.n_fft));
        }
        if cfg.hop_length == 0 {
            return bad("hop_length must be positive".into());
        }
        if cfg.emb_dim == 0 || cfg.n_heads == 0 || cfg.emb_dim % cfg.n_heads != 0 {
            return bad(format!(
                "emb_dim ({}) must be a positive multiple of n_heads ({})",
                cfg.emb_dim, cfg.n_heads
            ));
        }
        let head_dim = cfg.emb_dim / cfg.n_heads;
        if head_dim % 2 != 0 {
            return bad(format!(
                "head dim {head_dim} must be even for rotary embeddings"
            ));
        }
        if cfg.ffn_hidden_dim.contains(&0) || cfg.mask_hidden() == 0 {
            return bad("hidden widths must be positive".into());
        }
        if cfg.mask_depth == 0 {
            return bad("mask_depth must be at least 1".into());
        }
        if n_sources == 0 {
            return bad("at least one source is needed".into());
        }
        Ok(Self {
            n_fft: cfg.n_fft,
            hop: cfg.hop_length,
            layout: BandLayout::new(&cfg.bands.widths(), cfg.freq_bins())?,
            n_layers: cfg.n_layers,
            dim: cfg.emb_dim,
            heads: cfg.n_heads,
            head_dim,
            ffn: cfg.ffn_hidden_dim,
            mask_hidden: cfg.mask_hidden(),
            mask_depth: cfg.mask_depth,
            n_sources,
            source_names: (0..n_sources).map(|s| s.to_string()).collect(),
        })
    }

    /// Widths of the mask-estimator MLP of a band with `d_in` input features.
    fn mask_widths(&self, d_in: usize) -> Vec<usize> {
        let mut w = vec![self.dim];
        w.extend(std::iter::repeat_n(self.mask_hidden, self.mask_depth - 1));
        w.push(2 * d_in);
        w
    }
}

/// Which attention kernel the transformer blocks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKind {
    /// Memory-lean FlashAttention op (training and inference).
    #[default]
    Flash,
    /// Composed softmax attention (materialises scores; for tests).
    Reference,
}

/// Per-batch data that is not a function of the parameters.
#[derive(Debug, Clone)]
pub struct ForwardContext {
    /// Mixture STFT `[B, 2, F, T, 2]` in the mixture's dtype: the signal the head masks.
    pub spec: Tensor,
    /// `spec` in the compute dtype: the input of `band_split` (the same tensor in fp32).
    input: Tensor,
    /// Output length `N` in samples.
    pub length: usize,
    pub attention: AttentionKind,
    time_rope: Rope,
    band_rope: Rope,
}

impl ForwardContext {
    /// Batch size and STFT frames.
    pub fn batch_frames(&self) -> Result<(usize, usize)> {
        let (b, _, _, t, _) = self.spec.dims5()?;
        Ok((b, t))
    }
}

/// Kind of a block, in chain order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Mixture STFT `[B, 2, F, T, 2]` → `[B, T, K, D]`.
    BandSplit,
    /// Transformer over frames (sequence T, batch B·K): `[B, T, K, D]` → same.
    Time { layer: usize },
    /// Transformer over bands (sequence K, batch B·T): `[B, T, K, D]` → same.
    Band { layer: usize },
    /// Final norm, mask estimators, complex masking, iSTFT: `[B, T, K, D]` → `[B, S, 2, N]`.
    Head,
}

/// Parameter slots of a block, in construction order (mapped to name-sorted positions).
#[derive(Debug, Clone)]
enum Slots {
    /// Per group: (gamma, weight, bias).
    BandSplit(Vec<[usize; 3]>),
    Transformer([usize; 8]),
    /// Final norm gamma; per source, per group, per layer: (weight, bias).
    Head(usize, Vec<Vec<Vec<[usize; 2]>>>),
}

/// What a transformer's [`Block::forward_saved`] keeps for [`Block::backward_saved`]: its
/// input, the two norms' outputs, q/k/v, the attention output ‖ log-sum-exp, the residual
/// stream after attention and the feed-forward's hidden pre-activation.
#[derive(Debug)]
pub struct SavedForward {
    x: Tensor,
    /// The norms' outputs: `None` under checkpointing (recomputed where used).
    hn: Option<Tensor>,
    /// q/k/v: `None` under checkpointing (projected again after the feed-forward's backward,
    /// so that they are not held through it).
    qkv: Option<Tensor>,
    fo: Tensor,
    xs: Tensor,
    hn2: Option<Tensor>,
    hid: Tensor,
}

/// What the head's [`Block::head_source_saved`] keeps for [`Block::head_source_backward`]:
/// per band group, the outputs of the source's mask-estimator layers (the hidden layers' tanh
/// outputs, the last one's GLU input).
#[derive(Debug)]
pub struct HeadSaved {
    outputs: Vec<Vec<Tensor>>,
}

/// A transformer's parameters by role.
struct LayerParams {
    g1: Tensor,
    wqkv: Tensor,
    wo: Tensor,
    g2: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
}

/// One block: a pure function of (its parameters, its input, the context).
#[derive(Debug, Clone)]
pub struct Block {
    kind: BlockKind,
    name: String,
    /// Name-sorted.
    specs: Vec<ParamSpec>,
    /// `pos[slot]`: index into `specs` / the `params` slice.
    pos: Vec<usize>,
    slots: Slots,
    dims: Arc<Dims>,
    stft: Arc<Stft>,
}

struct SpecBuilder(Vec<ParamSpec>);

impl SpecBuilder {
    fn add(&mut self, name: String, shape: &[usize], init: Init) -> usize {
        self.0.push(ParamSpec::new(name, shape, init));
        self.0.len() - 1
    }
}

impl Block {
    fn build(kind: BlockKind, dims: Arc<Dims>, stft: Arc<Stft>) -> Self {
        let mut b = SpecBuilder(Vec::new());
        let d = dims.dim;
        let lin = |fan_in| Init::LinearUniform { fan_in };
        let (name, slots) = match kind {
            BlockKind::BandSplit => {
                let mut s = Vec::new();
                for (g, grp) in dims.layout.groups.iter().enumerate() {
                    let (n, di) = (grp.bands.len(), grp.dim_in());
                    let p = format!("band_split.groups.{g}");
                    s.push([
                        b.add(format!("{p}.norm.gamma"), &[n, di], Init::Ones),
                        b.add(format!("{p}.linear.weight"), &[n, di, d], lin(di)),
                        b.add(format!("{p}.linear.bias"), &[n, d], lin(di)),
                    ]);
                }
                ("band_split".to_string(), Slots::BandSplit(s))
            }
            BlockKind::Time { layer } | BlockKind::Band { layer } => {
                let (axis, h) = match kind {
                    BlockKind::Time { .. } => ("time", dims.ffn[0]),
                    _ => ("band", dims.ffn[1]),
                };
                let p = format!("layers.{layer}.{axis}");
                let inner = dims.heads * dims.head_dim;
                let s = [
                    b.add(format!("{p}.attn.norm.gamma"), &[d], Init::Ones),
                    b.add(format!("{p}.attn.qkv.weight"), &[3 * inner, d], lin(d)),
                    b.add(format!("{p}.attn.out.weight"), &[d, inner], lin(inner)),
                    b.add(format!("{p}.ff.norm.gamma"), &[d], Init::Ones),
                    b.add(format!("{p}.ff.fc1.weight"), &[h, d], lin(d)),
                    b.add(format!("{p}.ff.fc1.bias"), &[h], lin(d)),
                    b.add(format!("{p}.ff.fc2.weight"), &[d, h], lin(h)),
                    b.add(format!("{p}.ff.fc2.bias"), &[d], lin(h)),
                ];
                (p, Slots::Transformer(s))
            }
            BlockKind::Head => {
                let fin = b.add("final_norm.gamma".into(), &[d], Init::Ones);
                let mut per_source = Vec::new();
                for s in 0..dims.n_sources {
                    let mut per_group = Vec::new();
                    for (g, grp) in dims.layout.groups.iter().enumerate() {
                        let n = grp.bands.len();
                        let w = dims.mask_widths(grp.dim_in());
                        let p =
                            format!("mask_estimators.{}.groups.{g}.layers", dims.source_names[s]);
                        let layers = (0..w.len() - 1)
                            .map(|l| {
                                [
                                    b.add(
                                        format!("{p}.{l}.weight"),
                                        &[n, w[l], w[l + 1]],
                                        lin(w[l]),
                                    ),
                                    b.add(format!("{p}.{l}.bias"), &[n, w[l + 1]], lin(w[l])),
                                ]
                            })
                            .collect();
                        per_group.push(layers);
                    }
                    per_source.push(per_group);
                }
                ("head".to_string(), Slots::Head(fin, per_source))
            }
        };
        let mut order: Vec<usize> = (0..b.0.len()).collect();
        order.sort_by(|&i, &j| b.0[i].name.cmp(&b.0[j].name));
        let mut pos = vec![0; order.len()];
        for (sorted, &slot) in order.iter().enumerate() {
            pos[slot] = sorted;
        }
        let specs = order.iter().map(|&i| b.0[i].clone()).collect();
        Self {
            kind,
            name,
            specs,
            pos,
            slots,
            dims,
            stft,
        }
    }

    pub fn kind(&self) -> BlockKind {
        self.kind
    }

    /// `band_split`, `layers.{i}.time`, `layers.{i}.band` or `head`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This block's parameters, name-sorted: the order `forward` takes them in.
    pub fn param_specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// Scalars over this block's parameters.
    pub fn num_params(&self) -> u64 {
        count_scalars(&self.specs)
    }

    /// Runs the block. `params` in [`Block::param_specs`] order; `x` as documented on
    /// [`BlockKind`]. Pure: the output depends only on `params`, `x` and `ctx`.
    pub fn forward(&self, params: &[Tensor], x: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
        if params.len() != self.specs.len() {
            return Err(ModelError::Input(format!(
                "block {} takes {} parameters, got {}",
                self.name,
                self.specs.len(),
                params.len()
            )));
        }
        let p = |slot: usize| &params[self.pos[slot]];
        match &self.slots {
            Slots::BandSplit(s) => self.band_split(s, &p, x),
            Slots::Transformer(s) => {
                let ps: Vec<&Tensor> = s.iter().map(|&i| p(i)).collect();
                let (seq, rope) = self.sequences(x, ctx)?;
                self.transformer(&ps, x, rope, seq, ctx.attention)
            }
            Slots::Head(fin, mlps) => {
                let mask = self.masks(p(*fin), mlps, &p, x)?;
                apply_mask_istft(&self.stft, &mask, &ctx.spec, ctx.length)
            }
        }
    }

    /// How a transformer's rows `[B, T, K]` form its attention sequences, and their RoPE.
    /// Rows stay in that order: the fused projections gather and scatter the sequences
    /// (frames of a band, or bands of a frame) themselves.
    fn sequences<'c>(&self, x: &Tensor, ctx: &'c ForwardContext) -> Result<(SeqLayout, &'c Rope)> {
        let (b, t, k, _) = x.dims4()?;
        Ok(match self.kind {
            BlockKind::Time { .. } => (
                SeqLayout {
                    outer: b,
                    len: t,
                    inner: k,
                },
                &ctx.time_rope,
            ),
            _ => (
                SeqLayout {
                    outer: b * t,
                    len: k,
                    inner: 1,
                },
                &ctx.band_rope,
            ),
        })
    }

    /// Whether this block has a hand-written backward ([`Block::forward_saved`] with
    /// [`Block::backward_saved`], and [`Block::backward_recomputed`]) for this input: a
    /// transformer whose fused ops run (the CPU, f32 or f64, the flash attention; parameters
    /// of the input's dtype), or the head on the CPU in f32 or f64 (per source:
    /// [`Block::head_source_saved`] with [`Block::head_source_backward`]). Elsewhere candle's
    /// backward of [`Block::forward`]'s (or [`Block::head_source`]'s) graph is the way.
    pub fn has_own_backward(&self, x: &Tensor, ctx: &ForwardContext) -> bool {
        let cpu_kernels = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
        // A transformer's backward needs the attention's kernel (the CPU's, or CUDA's in f32:
        // its bf16 forward hands a bf16 copy on, not the f32 result its backward reads); the
        // other ops have composed backwards on every device. The head follows the transformers
        // (its ops would take bf16, but bf16 keeps candle's graph throughout for now).
        let attention_kernel = cpu_kernels || (x.device().is_cuda() && x.dtype() == DType::F32);
        match self.slots {
            Slots::Transformer(_) => attention_kernel && ctx.attention == AttentionKind::Flash,
            Slots::Head(..) => attention_kernel,
            Slots::BandSplit(_) => false,
        }
    }

    /// A transformer's forward without candle's graph, keeping what
    /// [`Block::backward_saved`] needs (the fused ops' inputs and the attention's output),
    /// with the block's output. Candle's graph of [`Block::forward`] would also keep the
    /// feed-forward's output, and its backward would hold the graph and a zeroed buffer plus
    /// a sum per gradient.
    pub fn forward_saved(
        &self,
        params: &[Tensor],
        x: &Tensor,
        ctx: &ForwardContext,
    ) -> Result<(Tensor, SavedForward)> {
        let p = self.layer_params(params)?;
        let (seq, rope) = self.sequences(x, ctx)?;
        let saved = self.forward_kept(&p, x.detach(), seq, rope, true)?;
        let y = (&saved.xs + ffn::gelu_linear_bias(&saved.hid, &p.w2, &p.b2)?)?;
        Ok((y, saved))
    }

    /// The hand-written backward of a transformer from its output's gradient `dy` (taken, so
    /// that it is freed once used): the gradient of its input and of its parameters (in
    /// `params` order). Every saved tensor and intermediate gradient is dropped after its last
    /// use; each sum of two gradients is the one candle's backward forms, so the results are
    /// the same.
    pub fn backward_saved(
        &self,
        params: &[Tensor],
        saved: SavedForward,
        dy: Tensor,
        ctx: &ForwardContext,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let p = self.layer_params(params)?;
        let (seq, rope) = self.sequences(&saved.x, ctx)?;
        let (dx, grads) = self.backward_kept(&p, saved, dy, seq, rope)?;
        self.assemble(params.len(), grads, dx)
    }

    /// Activation checkpointing's backward of a transformer from its input `x` alone: the
    /// forward is rerun without a graph, keeping neither the two norms' outputs nor q/k/v
    /// (each is recomputed where the backward uses it: the QKV projection runs a third time,
    /// after the feed-forward's backward; the attention itself is not rerun), then
    /// [`Block::backward_saved`]'s steps run. Results as [`Block::backward_saved`]'s.
    pub fn backward_recomputed(
        &self,
        params: &[Tensor],
        x: &Tensor,
        dy: Tensor,
        ctx: &ForwardContext,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let p = self.layer_params(params)?;
        let (seq, rope) = self.sequences(x, ctx)?;
        let saved = self.forward_kept(&p, x.detach(), seq, rope, false)?;
        let (dx, grads) = self.backward_kept(&p, saved, dy, seq, rope)?;
        self.assemble(params.len(), grads, dx)
    }

    /// The forward up to what the backward needs (the feed-forward's hidden pre-activation);
    /// the norms' outputs and q/k/v are kept only when `keep`, else dropped after their use.
    fn forward_kept(
        &self,
        p: &LayerParams,
        x: Tensor,
        seq: SeqLayout,
        rope: &Rope,
        keep: bool,
    ) -> Result<SavedForward> {
        let hn = norm::rms_norm(&x, &p.g1, RMS_EPS)?;
        let qkv = attn_proj::qkv_rope(&hn, &p.wqkv, rope, seq, self.dims.heads)?;
        let hn = keep.then_some(hn);
        let fo = attention::flash_attention_packed(&qkv, self.attention_scale())?;
        let qkv = keep.then_some(qkv);
        let xs = attn_proj::out_proj_residual(&fo, &p.wo, &x, seq, self.dims.head_dim)?;
        let hn2 = norm::rms_norm(&xs, &p.g2, RMS_EPS)?;
        let hid = ffn::linear_bias(&hn2, &p.w1, &p.b1)?;
        let hn2 = keep.then_some(hn2);
        Ok(SavedForward {
            x,
            hn,
            qkv,
            fo,
            xs,
            hn2,
            hid,
        })
    }

    /// The feed-forward's backward, then the attention's: the gradient of the block's input
    /// and the parameters' in slot order.
    fn backward_kept(
        &self,
        p: &LayerParams,
        saved: SavedForward,
        dy: Tensor,
        seq: SeqLayout,
        rope: &Rope,
    ) -> Result<(Tensor, [Tensor; 8])> {
        let SavedForward {
            x,
            hn,
            qkv,
            fo,
            xs,
            hn2,
            hid,
        } = saved;
        let (dxs, [dg2, dw1, db1, dw2, db2]) = Self::ffn_backward(p, xs, hid, hn2, dy)?;
        let (dx, [dg1, dwqkv, dwo]) = self.attention_backward(p, x, hn, qkv, fo, dxs, seq, rope)?;
        Ok((dx, [dg1, dwqkv, dwo, dg2, dw1, db1, dw2, db2]))
    }

    fn attention_scale(&self) -> f64 {
        (self.dims.head_dim as f64).powf(-0.5)
    }

    /// Feed-forward part: y = xs + gelu(hid)·w2ᵀ + b2, hid = hn2·w1ᵀ + b1, hn2 = norm(xs)
    /// (recomputed when not given). Returns the gradient of `xs` and `[dg2, dw1, db1, dw2,
    /// db2]`.
    fn ffn_backward(
        p: &LayerParams,
        xs: Tensor,
        hid: Tensor,
        hn2: Option<Tensor>,
        dy: Tensor,
    ) -> Result<(Tensor, [Tensor; 5])> {
        let (dhid, dw2, db2) = ffn::gelu_linear_bias_backward(&hid, &p.w2, &p.b2, &dy)?;
        drop(hid);
        let hn2 = match hn2 {
            Some(hn2) => hn2,
            None => norm::rms_norm(&xs, &p.g2, RMS_EPS)?,
        };
        let (dhn2, dw1, db1) = ffn::linear_bias_backward(hn2, &p.w1, &p.b1, &dhid)?;
        drop(dhid);
        let (dxs_norm, dg2) = norm::rms_norm_backward(&xs, &p.g2, &dhn2, RMS_EPS)?;
        drop((dhn2, xs));
        let dxs = (dy + dxs_norm)?;
        Ok((dxs, [dg2, dw1, db1, dw2, db2]))
    }

    /// Attention part: xs = x + fo·woᵀ, fo = attention(qkv), qkv = rope(hn·wqkvᵀ), hn =
    /// norm(x) (qkv and hn recomputed when not given). Returns the gradient of `x` and `[dg1,
    /// dwqkv, dwo]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        p: &LayerParams,
        x: Tensor,
        hn: Option<Tensor>,
        qkv: Option<Tensor>,
        fo: Tensor,
        dxs: Tensor,
        seq: SeqLayout,
        rope: &Rope,
    ) -> Result<(Tensor, [Tensor; 3])> {
        let dh = self.dims.head_dim;
        let qkv = match qkv {
            Some(kept) => kept,
            None => {
                let hn = norm::rms_norm(&x, &p.g1, RMS_EPS)?;
                attn_proj::qkv_rope(&hn, &p.wqkv, rope, seq, self.dims.heads)?
            }
        };
        let (dfo, dwo) = attn_proj::out_proj_residual_backward(&fo, &p.wo, seq, dh, &dxs)?;
        let dqkv = if qkv.device().is_cpu() {
            attention::flash_attention_packed_backward_in_place(
                qkv,
                &fo,
                &dfo,
                self.attention_scale(),
            )?
        } else {
            attention::flash_attention_packed_backward(&qkv, &fo, &dfo, self.attention_scale())?
        };
        drop((dfo, fo));
        let (dhn, dwqkv) = attn_proj::qkv_rope_backward(
            || match hn {
                Some(hn) => Ok(hn),
                None => norm::rms_norm(&x, &p.g1, RMS_EPS),
            },
            &p.wqkv,
            rope,
            seq,
            self.dims.heads,
            dqkv,
        )?;
        let (dx_norm, dg1) = norm::rms_norm_backward(&x, &p.g1, &dhn, RMS_EPS)?;
        drop((dhn, x));
        let dx = (dxs + dx_norm)?;
        Ok((dx, [dg1, dwqkv, dwo]))
    }

    /// The gradients in `params` order, from slot order (g1, wqkv, wo, g2, w1, b1, w2, b2).
    fn assemble(
        &self,
        n_params: usize,
        grads: [Tensor; 8],
        dx: Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let Slots::Transformer(slots) = &self.slots else {
            return Err(self.not_a_transformer());
        };
        let mut by_param: Vec<Option<Tensor>> = vec![None; n_params];
        for (slot, g) in slots.iter().zip(grads) {
            by_param[self.pos[*slot]] = Some(g);
        }
        Ok((dx, by_param.into_iter().flatten().collect()))
    }

    /// A transformer's parameters, detached (the hand-written backward builds no graph).
    fn layer_params(&self, params: &[Tensor]) -> Result<LayerParams> {
        let Slots::Transformer(slots) = &self.slots else {
            return Err(self.not_a_transformer());
        };
        if params.len() != self.specs.len() {
            return Err(ModelError::Input(format!(
                "block {} takes {} parameters, got {}",
                self.name,
                self.specs.len(),
                params.len()
            )));
        }
        let [g1, wqkv, wo, g2, w1, b1, w2, b2] = slots.map(|slot| params[self.pos[slot]].detach());
        Ok(LayerParams {
            g1,
            wqkv,
            wo,
            g2,
            w1,
            b1,
            w2,
            b2,
        })
    }

    fn not_a_transformer(&self) -> ModelError {
        ModelError::Input(format!(
            "block {} has no hand-written backward (not a transformer)",
            self.name
        ))
    }

    /// `[B, 2, F, T, 2]` → `[B, T, K, D]`: per band RMSNorm(d_k) and Linear(d_k → D), batched
    /// per band group.
    fn band_split<'a>(
        &self,
        slots: &[[usize; 3]],
        p: &dyn Fn(usize) -> &'a Tensor,
        x: &Tensor,
    ) -> Result<Tensor> {
        let l = &self.dims.layout;
        let (b, c, f, t, two) = x.dims5()?;
        if c != 2 || two != 2 || f != l.freq_bins() {
            return Err(ModelError::Input(format!(
                "band_split expects [B, 2, {}, T, 2], got {:?}",
                l.freq_bins(),
                x.dims()
            )));
        }
        let feats = frame_features(x)?;
        let mut outs = Vec::with_capacity(l.groups.len());
        for (g, slot) in slots.iter().enumerate() {
            let xg = self.group_features(&feats, g)?; // [n_g, BT, d_g]
            let [gamma, w, bias] = slot.map(p);
            let xn = norm::rms_norm_groups(&xg, gamma, RMS_EPS)?;
            // [n_g, BT, D]; the bias' gradient summed in f32 in bf16 on the CPU too.
            outs.push(ops::bias::add_bias(&xn.matmul(w)?, &bias.unsqueeze(1)?)?);
        }
        let parts = l
            .runs
            .iter()
            .map(|r| outs[r.group].narrow(0, r.member, r.len))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let y = Tensor::cat(&parts, 0)?.transpose(0, 1)?.contiguous()?; // [BT, K, D]
        Ok(y.reshape((b, t, l.n_bands(), self.dims.dim))?)
    }

    /// One pre-norm transformer layer over `xs` `[B, T, K, D]`, attending along the sequences
    /// of `seq`. Fused ops (see [`crate::ops`]), so that the graph keeps per layer the input,
    /// two norms, q/k/v, the attention output ‖ lse, the residual stream, the FFN's hidden
    /// pre-activation and its output.
    fn transformer(
        &self,
        p: &[&Tensor],
        xs: &Tensor,
        rope: &Rope,
        seq: SeqLayout,
        kind: AttentionKind,
    ) -> Result<Tensor> {
        let (h, dh) = (self.dims.heads, self.dims.head_dim);
        let [g1, wqkv, wo, g2, w1, b1, w2, b2] = [p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]];
        // Each intermediate is dropped after its last use: without a graph (the first forward
        // under checkpointing, inference) that frees it; with one, the graph keeps it anyway.
        let hn = norm::rms_norm(xs, g1, RMS_EPS)?;
        let qkv = attn_proj::qkv_rope(&hn, wqkv, rope, seq, h)?; // [3, S, H, L, Dh]
        drop(hn);
        let scale = (dh as f64).powf(-0.5);
        let o = match kind {
            AttentionKind::Flash => attention::flash_attention_packed(&qkv, scale)?,
            AttentionKind::Reference => {
                attention::reference_attention(&qkv.get(0)?, &qkv.get(1)?, &qkv.get(2)?, scale)?
            }
        };
        drop(qkv);
        let xs = attn_proj::out_proj_residual(&o, wo, xs, seq, dh)?;
        drop(o);
        let hn2 = norm::rms_norm(&xs, g2, RMS_EPS)?;
        let hid = ffn::linear_bias(&hn2, w1, b1)?;
        drop(hn2);
        let out = ffn::gelu_linear_bias(&hid, w2, b2)?;
        drop(hid);
        Ok((xs + out)?)
    }

    /// `[B, T, K, D]` → complex masks `[B, S, 2, F, T, 2]`.
    fn masks<'a>(
        &self,
        gamma: &Tensor,
        mlps: &[Vec<Vec<[usize; 2]>>],
        p: &dyn Fn(usize) -> &'a Tensor,
        x: &Tensor,
    ) -> Result<Tensor> {
        let inputs = self.mask_inputs(gamma, x)?;
        let per_source = mlps
            .iter()
            .map(|src| self.source_mask(&inputs, src, p, x))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&per_source, 1)?)
    }

    /// The final RMSNorm of `x` `[B, T, K, D]` and the mask estimators' inputs: per band
    /// group, its bands' features `[n_g, BT, D]`.
    fn mask_inputs(&self, gamma: &Tensor, x: &Tensor) -> Result<Vec<Tensor>> {
        let l = &self.dims.layout;
        let (b, t, k, d) = x.dims4()?;
        let xn = norm::rms_norm(x, gamma, RMS_EPS)?.reshape((b * t, k, d))?;
        let xk = xn.transpose(0, 1)?.contiguous()?; // [K, BT, D]
        (0..l.groups.len())
            .map(|g| self.group_rows(&xk, g))
            .collect()
    }

    /// Group `g`'s bands of the frame features `feats` `[BT, 4F]` ([`frame_features`]), in
    /// member order: `[n_g, BT, d_g]`.
    fn group_features(&self, feats: &Tensor, g: usize) -> Result<Tensor> {
        let l = &self.dims.layout;
        let (bt, di) = (feats.dim(0)?, l.groups[g].dim_in());
        let parts = l
            .runs
            .iter()
            .filter(|r| r.group == g)
            .map(|r| {
                feats
                    .narrow(1, 4 * r.bin, r.len * di)?
                    .reshape((bt, r.len, di))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 1)?.transpose(0, 1)?.contiguous()?)
    }

    /// Group `g`'s bands of `xk` `[K, BT, D]` (any layout), in member order: `[n_g, BT, D]`.
    fn group_rows(&self, xk: &Tensor, g: usize) -> Result<Tensor> {
        let parts = self
            .dims
            .layout
            .runs
            .iter()
            .filter(|r| r.group == g)
            .map(|r| xk.narrow(0, r.band, r.len))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// One source's mask estimator (`layers`: per group, per layer (weight, bias)) on the
    /// [`Block::mask_inputs`] of `x`: its complex mask `[B, 2, F, T, 2]`.
    fn source_mask<'a>(
        &self,
        inputs: &[Tensor],
        layers: &[Vec<[usize; 2]>],
        p: &dyn Fn(usize) -> &'a Tensor,
        x: &Tensor,
    ) -> Result<Tensor> {
        let l = &self.dims.layout;
        let (b, t, _, _) = x.dims4()?;
        let mut outs = Vec::with_capacity(l.groups.len());
        for (g, group_layers) in layers.iter().enumerate() {
            let mut h = inputs[g].clone();
            for (i, [w, bias]) in group_layers.iter().enumerate() {
                // Per band `h·W + b`, tanh between layers: one fused op per layer, keeping
                // only its input and output.
                let tanh = i + 1 < group_layers.len();
                h = ops::grouped_linear(&h, p(*w), p(*bias), tanh)?;
            }
            let di = l.groups[g].dim_in();
            // GLU: first half times sigmoid of the second, one fused op (it keeps only `h`).
            outs.push(ops::glu::glu_tanh(&h, di)?); // [n_g, BT, d_g]
        }
        self.assemble_mask(&outs, b, t)
    }

    /// The complex mask `[B, 2, F, T, 2]` from the groups' mask-estimator outputs
    /// `[n_g, BT, d_g]`.
    fn assemble_mask(&self, outs: &[Tensor], b: usize, t: usize) -> Result<Tensor> {
        let l = &self.dims.layout;
        let (bt, f) = (b * t, l.freq_bins());
        let parts = l
            .runs
            .iter()
            .map(|r| {
                let di = l.groups[r.group].dim_in();
                outs[r.group]
                    .narrow(0, r.member, r.len)?
                    .transpose(0, 1)?
                    .reshape((bt, r.len * di))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let m = Tensor::cat(&parts, 1)?.reshape((b, t, f, 2, 2))?;
        Ok(m.permute((0, 3, 2, 1, 4))?) // [B, 2, F, T, 2]
    }

    /// Number of per-source pieces of the head ([`Block::head_source`]): the sources; 0 for
    /// the other blocks.
    pub fn head_sources(&self) -> usize {
        match &self.slots {
            Slots::Head(_, mlps) => mlps.len(),
            _ => 0,
        }
    }

    /// Which of the head's parameters (indices into [`Block::param_specs`], ascending) source
    /// `source`'s piece uses: the final norm's gamma, shared by every piece, and the source's
    /// mask estimator. The order [`Block::head_source`] takes them in.
    pub fn head_source_params(&self, source: usize) -> Result<Vec<usize>> {
        let Slots::Head(fin, mlps) = &self.slots else {
            return Err(ModelError::Input(format!(
                "block {} is not the head: it has no per-source pieces",
                self.name
            )));
        };
        let src = mlps.get(source).ok_or_else(|| {
            ModelError::Input(format!(
                "source {source} out of range for a head of {} sources",
                mlps.len()
            ))
        })?;
        let mut ids: Vec<usize> = std::iter::once(*fin)
            .chain(src.iter().flatten().flatten().copied())
            .map(|slot| self.pos[slot])
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// The head for one source: final norm, that source's mask estimator, complex masking and
    /// iSTFT, `[B, T, K, D]` → `[B, 1, 2, N]`, equal to source `source` of the head's
    /// [`Block::forward`]. `params`: the tensors of [`Block::head_source_params`], in that
    /// order. Run per source (each with its own backward) so that only one source's graph is
    /// alive at a time; the final norm is recomputed per source, a small cost next to the mask
    /// estimator.
    pub fn head_source(
        &self,
        params: &[Tensor],
        source: usize,
        x: &Tensor,
        ctx: &ForwardContext,
    ) -> Result<Tensor> {
        let (fin, layers, at) = self.head_piece(params, source)?;
        let p = |slot: usize| &params[at[slot]];
        let inputs = self.mask_inputs(p(fin), x)?;
        let mask = self.source_mask(&inputs, layers, &p, x)?.unsqueeze(1)?;
        self.head_estimate(&mask, ctx)
    }

    /// Source `source`'s piece of the head for `params` (the tensors of
    /// [`Block::head_source_params`]): the final norm's slot, the source's mask-estimator
    /// slots (per group, per layer: weight, bias) and, per slot, its position in `params`.
    #[allow(clippy::type_complexity)]
    fn head_piece(
        &self,
        params: &[Tensor],
        source: usize,
    ) -> Result<(usize, &[Vec<[usize; 2]>], Vec<usize>)> {
        let ids = self.head_source_params(source)?;
        let Slots::Head(fin, mlps) = &self.slots else {
            return Err(ModelError::Input(format!(
                "block {} is not the head",
                self.name
            )));
        };
        if params.len() != ids.len() {
            return Err(ModelError::Input(format!(
                "the head's piece of source {source} takes {} parameters, got {}",
                ids.len(),
                params.len()
            )));
        }
        // Block parameter index → position in `params`, then slot → position.
        let mut at = vec![usize::MAX; self.specs.len()];
        for (j, &i) in ids.iter().enumerate() {
            at[i] = j;
        }
        let slot_at = self.pos.iter().map(|&i| at[i]).collect();
        Ok((*fin, &mlps[source], slot_at))
    }

    /// The estimate `[B, S, 2, N]` of masks `[B, S, 2, F, T, 2]`: complex masking and iSTFT
    /// ([`apply_mask_istft`]).
    pub fn head_estimate(&self, mask: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
        apply_mask_istft(&self.stft, mask, &ctx.spec, ctx.length)
    }

    /// The head for one source without candle's graph, up to its mask: returns source
    /// `source`'s complex mask `[B, 1, 2, F, T, 2]` (its estimate is
    /// [`Block::head_estimate`] of it) and what [`Block::head_source_backward`] needs, the
    /// mask-estimator layers' outputs. Candle's graph of [`Block::head_source`] would also
    /// keep the final norm's output, its band-major copy, the groups' inputs, the GLU outputs
    /// and the mask's assembly; its backward holds them all with a gradient of each.
    pub fn head_source_saved(
        &self,
        params: &[Tensor],
        source: usize,
        x: &Tensor,
    ) -> Result<(Tensor, HeadSaved)> {
        let (fin, layers, at) = self.head_piece(params, source)?;
        let p = |slot: usize| params[at[slot]].detach();
        let (b, t, k, d) = x.dims4()?;
        let xk = x.detach().reshape((b * t, k, d))?.transpose(0, 1)?; // [K, BT, D], a view
        let gamma = p(fin);
        let mut outputs = Vec::with_capacity(layers.len());
        let mut glu_outs = Vec::with_capacity(layers.len());
        for (g, group_layers) in layers.iter().enumerate() {
            // The final norm of the group's rows only: each row is normalised on its own.
            let mut h = norm::rms_norm(&self.group_rows(&xk, g)?, &gamma, RMS_EPS)?;
            let mut outs = Vec::with_capacity(group_layers.len());
            for (i, [w, bias]) in group_layers.iter().enumerate() {
                let tanh = i + 1 < group_layers.len();
                h = ops::grouped_linear(&h, &p(*w), &p(*bias), tanh)?;
                outs.push(h.clone());
            }
            let di = self.dims.layout.groups[g].dim_in();
            glu_outs.push(ops::glu::glu_tanh(&h, di)?);
            outputs.push(outs);
        }
        let mask = self.assemble_mask(&glu_outs, b, t)?.unsqueeze(1)?;
        Ok((mask, HeadSaved { outputs }))
    }

    /// The hand-written backward of source `source`'s head piece from its mask's gradient
    /// `dmask` `[B, 1, 2, F, T, 2]` (taken): the gradient of the head's input `x` and of
    /// `params` (in their order). Group by group, each saved output is dropped after its last
    /// use; the groups' normalised inputs are recomputed from `x`. The sums are candle's for
    /// [`Block::head_source`]'s graph (the final norm's backward runs once over the whole
    /// input's gradient), so the results are the same.
    pub fn head_source_backward(
        &self,
        params: &[Tensor],
        source: usize,
        saved: HeadSaved,
        dmask: Tensor,
        x: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (fin, layers, at) = self.head_piece(params, source)?;
        let p = |slot: usize| params[at[slot]].detach();
        let l = &self.dims.layout;
        let (b, t, k, d) = x.dims4()?;
        let (bt, f) = (b * t, l.freq_bins());
        if dmask.dims() != [b, 1, 2, f, t, 2] || saved.outputs.len() != layers.len() {
            return Err(ModelError::Input(format!(
                "head backward: mask gradient {:?} for an input {:?}",
                dmask.dims(),
                x.dims()
            )));
        }
        // The mask's gradient per frame in the band features' (bin, channel, re/im) order.
        let dm = frame_features(&dmask.squeeze(1)?)?;
        drop(dmask);
        let x = x.detach();
        let xk = x.reshape((bt, k, d))?.transpose(0, 1)?;
        let gamma = p(fin);
        // The gradient of the final norm's output, band by band as the groups produce it.
        let dxn = Tensor::zeros((bt, k, d), x.dtype(), x.device())?;
        let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
        for (g, (group_layers, mut outs)) in layers.iter().zip(saved.outputs).enumerate() {
            let di = l.groups[g].dim_in();
            let dglu = self.group_features(&dm, g)?; // [n_g, BT, d_g]
            let mut dh = match outs.last() {
                Some(h) => ops::glu::glu_tanh_backward(h, &dglu, di)?,
                None => return Err(ModelError::Input("head backward: no saved layer".into())),
            };
            drop(dglu);
            let input = norm::rms_norm(&self.group_rows(&xk, g)?, &gamma, RMS_EPS)?;
            for (i, [w, bias]) in group_layers.iter().enumerate().rev() {
                let tanh = i + 1 < group_layers.len();
                let y = outs
                    .pop()
                    .ok_or_else(|| ModelError::Input("head backward: saved layers".into()))?;
                let below = outs.last().unwrap_or(&input);
                let (dx, dw, db) =
                    ops::grouped_linear::grouped_linear_backward(below, &p(*w), &y, dh, tanh)?;
                grads[at[*w]] = Some(dw);
                grads[at[*bias]] = Some(db);
                dh = dx;
            }
            drop(input);
            for r in l.runs.iter().filter(|r| r.group == g) {
                let part = dh
                    .narrow(0, r.member, r.len)?
                    .transpose(0, 1)?
                    .contiguous()?;
                dxn.slice_set(&part, 1, r.band)?;
            }
        }
        drop(dm);
        let dxn = dxn.reshape((b, t, k, d))?;
        let (dx, dgamma) = norm::rms_norm_backward(&x, &gamma, &dxn, RMS_EPS)?;
        grads[at[fin]] = Some(dgamma);
        let grads = grads
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ModelError::Input("head backward: a parameter got no gradient".into())
            })?;
        Ok((dx, grads))
    }
}

/// `[B, 2, F, T, 2]` → `[BT, 4F]`: each frame's (bin, channel, re/im) features, the order of
/// the band split's inputs and of the mask estimators' outputs.
fn frame_features(x: &Tensor) -> Result<Tensor> {
    let (b, _, f, t, _) = x.dims5()?;
    Ok(x.permute((0, 3, 2, 1, 4))?
        .contiguous()?
        .reshape((b * t, 4 * f))?)
}

/// Complex masking and inverse STFT: `mask` `[B, S, 2, F, T, 2]` times the mixture STFT `spec`
/// `[B, 2, F, T, 2]` (complex product, (re, im) last), then iSTFT trimmed to `length`:
/// `[B, S, 2, length]`. One fused op ([`Stft::inverse_masked`]): the graph keeps the mask and
/// the spectrogram, not the product's partial products. A mask of another dtype (bf16, mixed
/// precision) is cast to the spectrogram's first: the masking, the iSTFT and what follows run
/// in the spectrogram's dtype (f32).
pub fn apply_mask_istft(
    stft: &Stft,
    mask: &Tensor,
    spec: &Tensor,
    length: usize,
) -> Result<Tensor> {
    Ok(stft.inverse_masked(&mask.to_dtype(spec.dtype())?, spec, length)?)
}

/// The separator: `band_split`, `n_layers` × (`time`, `band`), `head`.
#[derive(Debug, Clone)]
pub struct Separator {
    dims: Arc<Dims>,
    stft: Arc<Stft>,
    blocks: Vec<Block>,
}

impl Separator {
    /// Validates `cfg` and lays out the blocks; allocates no parameters. The mask estimators
    /// are named by index (`mask_estimators.0`, ...); see [`Separator::with_sources`].
    pub fn new(cfg: &ModelConfig, n_sources: usize) -> Result<Self> {
        Self::build(Dims::new(cfg, n_sources)?)
    }

    /// [`Separator::new`] with one mask estimator per named source
    /// (`mask_estimators.vocals...`): what training and inference use, so that fine-tuning on
    /// another set of sources finds the heads it shares with the checkpoint by name.
    pub fn with_sources(cfg: &ModelConfig, sources: &[String]) -> Result<Self> {
        let mut dims = Dims::new(cfg, sources.len())?;
        let mut seen = std::collections::HashSet::new();
        for name in sources {
            if name.is_empty() || name.contains(['.', '/']) || !seen.insert(name) {
                return Err(ModelError::Config(format!(
                    "source name `{name}` must be unique, non-empty and free of `.` and `/`"
                )));
            }
        }
        dims.source_names = sources.to_vec();
        Self::build(dims)
    }

    fn build(dims: Dims) -> Result<Self> {
        let dims = Arc::new(dims);
        let stft = Arc::new(Stft::new(dims.n_fft, dims.hop, dims.n_fft)?);
        let mut blocks = vec![Block::build(
            BlockKind::BandSplit,
            dims.clone(),
            stft.clone(),
        )];
        for layer in 0..dims.n_layers {
            blocks.push(Block::build(
                BlockKind::Time { layer },
                dims.clone(),
                stft.clone(),
            ));
            blocks.push(Block::build(
                BlockKind::Band { layer },
                dims.clone(),
                stft.clone(),
            ));
        }
        blocks.push(Block::build(BlockKind::Head, dims.clone(), stft.clone()));
        Ok(Self { dims, stft, blocks })
    }

    pub fn dims(&self) -> &Dims {
        &self.dims
    }

    /// The STFT of the model (`n_fft`, `hop_length`, Hann window of `n_fft`).
    pub fn stft(&self) -> &Stft {
        &self.stft
    }

    /// Blocks in execution order.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// All parameters, name-sorted.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let mut v: Vec<ParamSpec> = self
            .blocks
            .iter()
            .flat_map(|b| b.specs.iter().cloned())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Number of scalars over all parameter specs (shapes only).
    pub fn num_params(&self) -> u64 {
        self.blocks.iter().map(Block::num_params).sum()
    }

    /// All parameters initialised from `seed` (PyTorch default Linear init, norm gains 1).
    pub fn init_params(
        &self,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<BTreeMap<String, Tensor>> {
        crate::params::init_params(&self.param_specs(), seed, device, dtype)
    }

    /// The parameters of `block` out of a full map, in the block's order.
    pub fn block_params(
        &self,
        block: &Block,
        params: &BTreeMap<String, Tensor>,
    ) -> Result<Vec<Tensor>> {
        select_params(&block.specs, params)
    }

    /// Mixture STFT and RoPE tables for `mixture` `[B, 2, N]` (dtype and device of the
    /// mixture), using FlashAttention.
    pub fn prepare_context(&self, mixture: &Tensor) -> Result<ForwardContext> {
        self.prepare_context_with(mixture, AttentionKind::Flash)
    }

    pub fn prepare_context_with(
        &self,
        mixture: &Tensor,
        attention: AttentionKind,
    ) -> Result<ForwardContext> {
        self.prepare_context_in(mixture, attention, mixture.dtype())
    }

    /// [`Separator::prepare_context_with`] for blocks computing in `compute` (mixed
    /// precision: bf16 with an f32 mixture). The STFT runs in the mixture's dtype and is cast
    /// to `compute` for `band_split`; the head masks the mixture's-dtype STFT (its mask cast
    /// to it), so the iSTFT, the estimate and the loss stay in the mixture's dtype. The RoPE
    /// tables are in the mixture's dtype too ([`Rope::apply`] rotates in it).
    pub fn prepare_context_in(
        &self,
        mixture: &Tensor,
        attention: AttentionKind,
        compute: DType,
    ) -> Result<ForwardContext> {
        let (_, c, n) = mixture.dims3()?;
        if c != 2 || n <= self.dims.n_fft / 2 {
            return Err(ModelError::Input(format!(
                "mixture must be [B, 2, N] with N > n_fft/2 = {}, got {:?}",
                self.dims.n_fft / 2,
                mixture.dims()
            )));
        }
        let spec = self.stft.forward(&mixture.detach())?;
        let frames = spec.dim(3)?;
        let (dev, dt) = (mixture.device(), mixture.dtype());
        let hd = self.dims.head_dim;
        Ok(ForwardContext {
            input: spec.to_dtype(compute)?,
            spec,
            length: n,
            attention,
            time_rope: Rope::new(frames, hd, ROPE_BASE, dev, dt)?,
            band_rope: Rope::new(self.dims.layout.n_bands(), hd, ROPE_BASE, dev, dt)?,
        })
    }

    /// Chains every block: `[B, 2, N]` → `[B, S, 2, N]`.
    pub fn forward(&self, params: &BTreeMap<String, Tensor>, mixture: &Tensor) -> Result<Tensor> {
        let ctx = self.prepare_context(mixture)?;
        self.forward_ctx(params, &ctx)
    }

    /// Chains every block on a prepared context.
    pub fn forward_ctx(
        &self,
        params: &BTreeMap<String, Tensor>,
        ctx: &ForwardContext,
    ) -> Result<Tensor> {
        let mut x = ctx.first_input().clone();
        for b in &self.blocks {
            x = b.forward(&self.block_params(b, params)?, &x, ctx)?;
        }
        Ok(x)
    }
}

impl ForwardContext {
    /// Input of the first block (`band_split`): the mixture STFT in the compute dtype.
    pub fn first_input(&self) -> &Tensor {
        &self.input
    }
}
