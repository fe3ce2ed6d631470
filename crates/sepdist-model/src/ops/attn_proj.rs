//! The projections around attention as fused ops: QKV projection with RoPE, and output
//! projection with the residual add. Both read and write the transformer's activation in its
//! own row order, so the time transformer needs no transposed copies of its input or output.
//!
//! Composed from candle ops ([`qkv_rope_composed`], [`out_proj_residual_composed`]), these
//! keep the `[rows, 3·I]` projection, three head-major copies, four tensors per RoPE and a
//! head-major copy of the attention output for the backward. The fused ops keep their inputs
//! and output only; their backwards are one matmul pair each plus a layout kernel.

use candle_core::Tensor;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Error, Layout, Result, Shape};
use rayon::prelude::*;

use super::cpu::{
    Real, contiguous_offset, kernel_takes, map_tensor, matmul_cpu, unsupported_dtype,
};
use super::rope::Rope;

/// How the rows of an activation `[rows, D]` form attention sequences: rows are ordered
/// `(a, l, c)` (`a < outer`, `l < len`, `c < inner`), and sequence `s = a·inner + c` holds rows
/// `l = 0..len` at positions `l`. The time transformer on `[B, T, K, D]` is
/// `(B, T, K)`; the band transformer is `(B·T, K, 1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqLayout {
    pub outer: usize,
    pub len: usize,
    pub inner: usize,
}

impl SeqLayout {
    pub fn rows(&self) -> usize {
        self.outer * self.len * self.inner
    }

    /// Number of sequences (the attention batch).
    pub fn sequences(&self) -> usize {
        self.outer * self.inner
    }

    /// Row of position `l` of sequence `s`.
    #[inline]
    fn row(&self, s: usize, l: usize) -> usize {
        let (a, c) = (s / self.inner, s % self.inner);
        (a * self.len + l) * self.inner + c
    }
}

/// Shapes shared by both ops.
#[derive(Debug, Clone, Copy)]
struct Heads {
    seq: SeqLayout,
    heads: usize,
    head_dim: usize,
}

impl Heads {
    fn inner(&self) -> usize {
        self.heads * self.head_dim
    }
}

fn check_rows(what: &str, x: &Tensor, seq: SeqLayout, d: usize) -> Result<()> {
    let last = x.dims().last().copied().unwrap_or(0);
    if last != d || x.elem_count() != seq.rows() * d || seq.rows() == 0 {
        return Err(Error::Msg(format!(
            "{what}: input {:?} does not hold {:?} rows of width {d}",
            x.dims(),
            seq
        )));
    }
    Ok(())
}

/// `hn · wᵀ` split into q, k, v (output features ordered (q|k|v, head, dh)), RoPE applied to
/// q and k at each row's position in its sequence: `hn` `[.., D]` with `seq.rows()` rows,
/// `w` `[3·H·Dh, D]`; returns `[3, S, H, L, Dh]` (S = `seq.sequences()`, L = `seq.len`).
/// Differentiable in `hn` and `w`.
pub fn qkv_rope(
    hn: &Tensor,
    w: &Tensor,
    rope: &Rope,
    seq: SeqLayout,
    heads: usize,
) -> Result<Tensor> {
    let dh = rope.head_dim();
    let d = w.dim(1)?;
    if w.dims() != [3 * heads * dh, d] {
        return Err(Error::Msg(format!(
            "qkv_rope: weight {:?}, expected [{}, D] for {heads} heads of {dh}",
            w.dims(),
            3 * heads * dh
        )));
    }
    check_rows("qkv_rope", hn, seq, d)?;
    if seq.len > rope.max_len() {
        return Err(Error::Msg(format!(
            "qkv_rope: sequence length {} exceeds the RoPE tables' {}",
            seq.len,
            rope.max_len()
        )));
    }
    if !kernel_takes(&[hn, w, rope.tables().0]) {
        return qkv_rope_composed(hn, w, rope, seq, heads);
    }
    let op = QkvRope::new(rope, seq, heads)?;
    hn.contiguous()?.apply_op2(&w.contiguous()?, op)
}

/// [`qkv_rope`] composed from candle ops (matmul, permute, [`Rope::apply`], stack).
pub fn qkv_rope_composed(
    hn: &Tensor,
    w: &Tensor,
    rope: &Rope,
    seq: SeqLayout,
    heads: usize,
) -> Result<Tensor> {
    let dh = rope.head_dim();
    let d = w.dim(1)?;
    let qkv = hn
        .reshape((seq.rows(), d))?
        .matmul(&w.t()?)?
        .reshape((seq.outer, seq.len, seq.inner, 3, heads, dh))?
        .permute((3, 0, 2, 4, 1, 5))?
        .contiguous()?
        .reshape((3, seq.sequences(), heads, seq.len, dh))?;
    let q = rope.apply(&qkv.get(0)?)?;
    let k = rope.apply(&qkv.get(1)?)?;
    Tensor::stack(&[q, k, qkv.get(2)?], 0)
}

/// `x + o · woᵀ` where `o` is the attention output in head-major layout `fo` `[S, H, L, E]`
/// (its first `Dh` of `E` columns: `E = Dh + 1` for the output ‖ lse of
/// [`super::attention::flash_attention_packed`], `E = Dh` for a plain output) put back in the
/// rows of `x` (`[.., D]`, `seq.rows()` rows); `wo` `[D, H·Dh]`. Returns the shape of `x`.
/// Differentiable in all three (the gradient of `fo`'s extra column is zero).
pub fn out_proj_residual(
    fo: &Tensor,
    wo: &Tensor,
    x: &Tensor,
    seq: SeqLayout,
    head_dim: usize,
) -> Result<Tensor> {
    let (s, heads, len, e) = fo.dims4()?;
    let d = wo.dim(0)?;
    if s != seq.sequences() || len != seq.len || e < head_dim || wo.dims() != [d, heads * head_dim]
    {
        return Err(Error::Msg(format!(
            "out_proj_residual: attention output {:?} and weight {:?} do not match {:?} with \
             head dim {head_dim}",
            fo.dims(),
            wo.dims(),
            seq
        )));
    }
    check_rows("out_proj_residual", x, seq, d)?;
    if !kernel_takes(&[x, fo, wo]) {
        return out_proj_residual_composed(fo, wo, x, seq, head_dim);
    }
    let op = OutProj::new(fo, wo, seq, head_dim)?;
    fo.contiguous()?
        .apply_op3(&wo.contiguous()?, &x.contiguous()?, op)
}

/// [`out_proj_residual`] composed from candle ops (narrow, permute, copy, matmul, add).
pub fn out_proj_residual_composed(
    fo: &Tensor,
    wo: &Tensor,
    x: &Tensor,
    seq: SeqLayout,
    head_dim: usize,
) -> Result<Tensor> {
    let o = heads_to_rows(&fo.narrow(3, 0, head_dim)?, seq)?;
    x + o.matmul(&wo.t()?)?.reshape(x.shape())?
}

/// A head-major `[S, H, L, Dh]` tensor (S = outer·inner) in the activation's row order:
/// `[rows, H·Dh]`, rows `(outer, len, inner)`.
fn heads_to_rows(t: &Tensor, seq: SeqLayout) -> Result<Tensor> {
    let (_, heads, _, dh) = t.dims4()?;
    t.reshape((seq.outer, seq.inner, heads, seq.len, dh))?
        .permute((0, 3, 1, 2, 4))?
        .contiguous()?
        .reshape((seq.rows(), heads * dh))
}

/// The backward of [`qkv_rope`] without a graph (the fused op's, on the CPU): `(d hn, d w)`
/// for the gradient `grad` of its `[3, S, H, L, Dh]` output. For a block's hand-written
/// backward: `grad` is dropped once unpacked into the projection's rows, and `hn` is asked for
/// only then (it may be recomputed), so the two are never held together.
pub fn qkv_rope_backward(
    hn: impl FnOnce() -> Result<Tensor>,
    w: &Tensor,
    rope: &Rope,
    seq: SeqLayout,
    heads: usize,
    grad: Tensor,
) -> Result<(Tensor, Tensor)> {
    if !kernel_takes(&[&grad, w, rope.tables().0]) {
        return qkv_rope_backward_composed(hn, w, rope, seq, heads, grad);
    }
    let gq = QkvRope::new(rope, seq, heads)?.unpack(&grad)?;
    drop(grad);
    match QkvRope::project_back(&gq, &hn()?, w, true, true)? {
        (Some(dhn), Some(dw)) => Ok((dhn, dw)),
        _ => Err(Error::Msg("qkv_rope_backward: no gradient".into())),
    }
}

/// [`qkv_rope_backward`] from candle ops, on any device (the GPU's path): RoPE's transpose on
/// the gradients of q and k, the three parts put back one at a time into the projection's rows
/// `[rows, 3·H·Dh]` (about six activations above `grad` at the most), then `d w = gᵀ·hn` and
/// `d hn = g·w`, with `hn` asked for once `grad` is gone.
pub fn qkv_rope_backward_composed(
    hn: impl FnOnce() -> Result<Tensor>,
    w: &Tensor,
    rope: &Rope,
    seq: SeqLayout,
    heads: usize,
    grad: Tensor,
) -> Result<(Tensor, Tensor)> {
    let dh = rope.head_dim();
    // The rows as `[outer, len, inner, 3, H, Dh]`; part i of `[3, S, H, L, Dh]` (S = outer·
    // inner) goes to index i of dim 3.
    let rows = Tensor::zeros(
        (seq.outer, seq.len, seq.inner, 3, heads, dh),
        grad.dtype(),
        grad.device(),
    )?;
    for part in [2, 0, 1] {
        let g = grad.get(part)?;
        let g = if part == 2 {
            g
        } else {
            rope.apply_transposed(&g)?
        };
        let g = heads_to_rows(&g, seq)?.reshape((seq.outer, seq.len, seq.inner, 1, heads, dh))?;
        rows.slice_set(&g, 3, part)?;
    }
    drop(grad);
    let rows = rows.reshape((seq.rows(), 3 * heads * dh))?;
    let hn = hn()?;
    let d = w.dim(1)?;
    let dw = rows.t()?.matmul(&hn.reshape((seq.rows(), d))?)?;
    let dhn = rows.matmul(w)?.reshape(hn.shape())?;
    Ok((dhn, dw))
}

/// The backward of [`out_proj_residual`] without a graph (the fused op's, on the CPU):
/// `(d fo, d wo)`; the residual input's gradient is `grad` itself.
pub fn out_proj_residual_backward(
    fo: &Tensor,
    wo: &Tensor,
    seq: SeqLayout,
    head_dim: usize,
    grad: &Tensor,
) -> Result<(Tensor, Tensor)> {
    if !kernel_takes(&[fo, wo, grad]) {
        return out_proj_residual_backward_composed(fo, wo, seq, head_dim, grad);
    }
    match OutProj::new(fo, wo, seq, head_dim)?.backward(fo, wo, grad, true, true)? {
        (Some(dfo), Some(dwo)) => Ok((dfo, dwo)),
        _ => Err(Error::Msg("out_proj_residual_backward: no gradient".into())),
    }
}

/// [`out_proj_residual_backward`] from candle ops, on any device (the GPU's path): `d wo =
/// gᵀ·o` with `o` the attention output in rows, `d o = g·wo` put back in `fo`'s head-major
/// layout `[S, H, L, E]` (a zero log-sum-exp column when `E = Dh + 1`).
pub fn out_proj_residual_backward_composed(
    fo: &Tensor,
    wo: &Tensor,
    seq: SeqLayout,
    head_dim: usize,
    grad: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (s, heads, len, e) = fo.dims4()?;
    let d = wo.dim(0)?;
    let g2 = grad.reshape((seq.rows(), d))?;
    let o = heads_to_rows(&fo.narrow(3, 0, head_dim)?, seq)?;
    let dwo = g2.t()?.matmul(&o)?;
    drop(o);
    let mut dfo = g2
        .matmul(wo)?
        .reshape((seq.outer, seq.len, seq.inner, heads, head_dim))?
        .permute((0, 2, 3, 1, 4))?
        .contiguous()?
        .reshape((s, heads, len, head_dim))?;
    if e > head_dim {
        let pad = Tensor::zeros((s, heads, len, e - head_dim), dfo.dtype(), dfo.device())?;
        dfo = Tensor::cat(&[&dfo, &pad], 3)?;
    }
    Ok((dfo, dwo))
}

/// Forward op of [`qkv_rope`]: `(hn, w)` → `[3, S, H, L, Dh]`.
struct QkvRope {
    shape: Heads,
    /// RoPE tables `[max_len, Dh]` (each pair's value twice).
    cos: Tensor,
    sin: Tensor,
}

impl QkvRope {
    fn new(rope: &Rope, seq: SeqLayout, heads: usize) -> Result<Self> {
        let (cos, sin) = rope.tables();
        Ok(QkvRope {
            shape: Heads {
                seq,
                heads,
                head_dim: rope.head_dim(),
            },
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
        })
    }
}

/// Row chunks of the QKV projection: its `[rows, 3·I]` matmul result is a temporary of the
/// kernel, made for about this fraction of the rows at a time.
const QKV_CHUNKS: usize = 8;

impl QkvRope {
    /// The projection `hn · wᵀ` rotated and packed into `[3, S, H, L, Dh]`, computed for
    /// groups of whole sequences at a time (rows `(a, l, c)` for a range of `a`), so that the
    /// unpacked projection never exists for all rows at once.
    fn forward<T: Real>(
        &self,
        hn: &CpuStorage,
        hn_offset: usize,
        w: &CpuStorage,
        w_offset: usize,
        d: usize,
    ) -> Result<Vec<T>> {
        let name = "qkv-rope";
        let Heads {
            seq,
            heads,
            head_dim: dh,
        } = self.shape;
        let i = self.shape.inner();
        let per_outer = seq.len * seq.inner;
        let block = seq.inner * heads * seq.len * dh; // one `a`'s elements in each part
        let part_len = seq.outer * block;
        let mut out = vec![T::zero(); 3 * part_len];
        let step = seq.outer.div_ceil(QKV_CHUNKS).max(1);
        super::cpu::with_slice::<T, _>(&self.cos, name, |cos| {
            super::cpu::with_slice::<T, _>(&self.sin, name, |sin| {
                for a0 in (0..seq.outer).step_by(step) {
                    let a1 = (a0 + step).min(seq.outer);
                    let rows = (a1 - a0) * per_outer;
                    let chunk = matmul_cpu(
                        hn,
                        hn_offset + a0 * per_outer * d,
                        w,
                        w_offset,
                        true,
                        rows,
                        3 * i,
                        d,
                    )?;
                    let src = chunk.as_slice::<T>()?;
                    let sub = Heads {
                        seq: SeqLayout {
                            outer: a1 - a0,
                            ..seq
                        },
                        ..self.shape
                    };
                    for part in 0..3 {
                        let at = part * part_len;
                        let dst = &mut out[at + a0 * block..at + a1 * block];
                        rope_pack_part(src, cos, sin, sub, part, dst);
                    }
                }
                Ok(())
            })
        })?;
        Ok(out)
    }
}

/// Part `part` (q, k or v) of the rotated and packed projection `src` (`[rows, 3·I]` of
/// `shape`'s rows) into `dst` (`[S, H, L, Dh]`): RoPE on q and k, v copied.
fn rope_pack_part<T: Real>(
    src: &[T],
    cos: &[T],
    sin: &[T],
    shape: Heads,
    part: usize,
    dst: &mut [T],
) {
    let Heads {
        seq,
        heads,
        head_dim: dh,
    } = shape;
    let i = heads * dh;
    // One (sequence, head) block of `[L, Dh]` per work item.
    dst.par_chunks_mut(seq.len * dh)
        .enumerate()
        .for_each(|(idx, dst)| {
            let head = idx % heads;
            let s = idx / heads;
            for l in 0..seq.len {
                let at = seq.row(s, l) * 3 * i + part * i + head * dh;
                let x = &src[at..at + dh];
                let y = &mut dst[l * dh..(l + 1) * dh];
                if part == 2 {
                    y.copy_from_slice(x);
                } else {
                    let (c, sn) = (&cos[l * dh..(l + 1) * dh], &sin[l * dh..(l + 1) * dh]);
                    for p in 0..dh / 2 {
                        let (x0, x1) = (x[2 * p], x[2 * p + 1]);
                        y[2 * p] = x0 * c[2 * p] - x1 * sn[2 * p];
                        y[2 * p + 1] = x1 * c[2 * p + 1] + x0 * sn[2 * p + 1];
                    }
                }
            }
        });
}

impl CustomOp2 for QkvRope {
    fn name(&self) -> &'static str {
        "qkv-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let Heads {
            seq,
            heads,
            head_dim,
        } = self.shape;
        let d = l2.dims()[1];
        let (o1, o2) = (contiguous_offset(l1, name)?, contiguous_offset(l2, name)?);
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(self.forward::<f32>(s1, o1, s2, o2, d)?),
            DType::F64 => CpuStorage::F64(self.forward::<f64>(s1, o1, s2, o2, d)?),
            dt => return Err(unsupported_dtype(name, dt)),
        };
        Ok((
            out,
            Shape::from((3, seq.sequences(), heads, seq.len, head_dim)),
        ))
    }

    fn bwd(
        &self,
        hn: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.backward(hn, w, grad, hn.track_op(), w.track_op())
    }
}

impl QkvRope {
    fn backward(
        &self,
        hn: &Tensor,
        w: &Tensor,
        grad: &Tensor,
        want_dhn: bool,
        want_dw: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gq = self.unpack(grad)?;
        Self::project_back(&gq, hn, w, want_dhn, want_dw)
    }

    /// The gradient of the projection, `[rows, 3·I]`: inverse rotation, rows order.
    fn unpack(&self, grad: &Tensor) -> Result<Tensor> {
        let name = "qkv-rope-bwd";
        let i = self.shape.inner();
        let rows = self.shape.seq.rows();
        let grad = grad.contiguous()?;
        let (cos, sin) = (&self.cos, &self.sin);
        map_tensor(
            &grad,
            (rows, 3 * i),
            name,
            |g| {
                super::cpu::with_slice::<f32, _>(cos, name, |c| {
                    super::cpu::with_slice::<f32, _>(sin, name, |s| {
                        Ok(rope_unpack(g, c, s, self.shape))
                    })
                })
            },
            |g| {
                super::cpu::with_slice::<f64, _>(cos, name, |c| {
                    super::cpu::with_slice::<f64, _>(sin, name, |s| {
                        Ok(rope_unpack(g, c, s, self.shape))
                    })
                })
            },
        )
    }

    /// `(d hn, d w)` from the projection's gradient `gq` `[rows, 3·I]`.
    fn project_back(
        gq: &Tensor,
        hn: &Tensor,
        w: &Tensor,
        want_dhn: bool,
        want_dw: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, d) = (gq.dim(0)?, w.dim(1)?);
        let hn2 = hn.detach().reshape((rows, d))?;
        let dw = want_dw.then(|| gq.t()?.matmul(&hn2)).transpose()?;
        let dhn = want_dhn
            .then(|| gq.matmul(&w.detach())?.reshape(hn.shape()))
            .transpose()?;
        Ok((dhn, dw))
    }
}

/// The backward of the packing: the gradient `[3, S, H, L, Dh]` → `[rows, 3·I]` through the
/// transposed rotation (the forward is [`rope_pack_part`]).
fn rope_unpack<T: Real>(src: &[T], cos: &[T], sin: &[T], shape: Heads) -> Vec<T> {
    let Heads {
        seq,
        heads,
        head_dim: dh,
    } = shape;
    let i = heads * dh;
    let n = seq.sequences();
    let mut out = vec![T::zero(); src.len()];
    // One row of `[3·I]` per work item.
    let (len, inner) = (seq.len, seq.inner);
    out.par_chunks_mut(3 * i)
        .enumerate()
        .for_each(|(row, dst)| {
            let c = row % inner;
            let l = (row / inner) % len;
            let s = (row / (inner * len)) * inner + c;
            for part in 0..3 {
                for head in 0..heads {
                    let at = (((part * n + s) * heads + head) * len + l) * dh;
                    let g = &src[at..at + dh];
                    let y = &mut dst[part * i + head * dh..part * i + (head + 1) * dh];
                    if part == 2 {
                        y.copy_from_slice(g);
                    } else {
                        let (cs, sn) = (&cos[l * dh..(l + 1) * dh], &sin[l * dh..(l + 1) * dh]);
                        // Rotation by the opposite angle.
                        for p in 0..dh / 2 {
                            let (x0, x1) = (g[2 * p], g[2 * p + 1]);
                            y[2 * p] = x0 * cs[2 * p] + x1 * sn[2 * p + 1];
                            y[2 * p + 1] = x1 * cs[2 * p + 1] - x0 * sn[2 * p];
                        }
                    }
                }
            }
        });
    out
}

/// Forward op of [`out_proj_residual`]: `(fo, wo, x)` → `x + o·woᵀ`.
struct OutProj {
    shape: Heads,
    /// Columns of `fo` per (sequence, head, position): `Dh` or `Dh + 1`.
    width: usize,
    d: usize,
}

impl OutProj {
    fn new(fo: &Tensor, wo: &Tensor, seq: SeqLayout, head_dim: usize) -> Result<Self> {
        let (_, heads, _, width) = fo.dims4()?;
        Ok(OutProj {
            shape: Heads {
                seq,
                heads,
                head_dim,
            },
            width,
            d: wo.dim(0)?,
        })
    }

    /// The attention output gathered into rows: `[rows, H·Dh]`.
    fn gather<T: Real>(&self, fo: &[T]) -> Vec<T> {
        let Heads {
            seq,
            heads,
            head_dim: dh,
        } = self.shape;
        let (e, len, inner) = (self.width, seq.len, seq.inner);
        let mut o = vec![T::zero(); seq.rows() * heads * dh];
        o.par_chunks_mut(heads * dh)
            .enumerate()
            .for_each(|(row, dst)| {
                let c = row % inner;
                let l = (row / inner) % len;
                let s = (row / (inner * len)) * inner + c;
                for head in 0..heads {
                    let at = ((s * heads + head) * len + l) * e;
                    dst[head * dh..(head + 1) * dh].copy_from_slice(&fo[at..at + dh]);
                }
            });
        o
    }

    /// Rows `[rows, H·Dh]` scattered into the layout of `fo` (extra column zero).
    fn scatter<T: Real>(&self, o: &[T]) -> Vec<T> {
        let Heads {
            seq,
            heads,
            head_dim: dh,
        } = self.shape;
        let (e, i) = (self.width, heads * dh);
        let mut fo = vec![T::zero(); seq.sequences() * heads * seq.len * e];
        fo.par_chunks_mut(seq.len * e)
            .enumerate()
            .for_each(|(idx, dst)| {
                let (s, head) = (idx / heads, idx % heads);
                for l in 0..seq.len {
                    let at = seq.row(s, l) * i + head * dh;
                    dst[l * e..l * e + dh].copy_from_slice(&o[at..at + dh]);
                }
            });
        fo
    }

    fn forward<T: Real>(
        &self,
        fo: &[T],
        wo: &CpuStorage,
        wo_offset: usize,
        x: &[T],
    ) -> Result<Vec<T>> {
        let rows = self.shape.seq.rows();
        let i = self.shape.inner();
        let o = T::to_cpu_storage_owned(self.gather(fo));
        let proj = matmul_cpu(&o, 0, wo, wo_offset, true, rows, self.d, i)?;
        drop(o);
        let mut y = T::cpu_storage_data(proj)?;
        y.par_iter_mut().zip(x.par_iter()).for_each(|(a, &b)| {
            *a = b + *a;
        });
        Ok(y)
    }
}

impl CustomOp3 for OutProj {
    fn name(&self) -> &'static str {
        "out-proj-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use super::cpu::contiguous_slice;
        let name = self.name();
        let off = contiguous_offset(l2, name)?;
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(self.forward::<f32>(
                contiguous_slice(s1, l1, name)?,
                s2,
                off,
                contiguous_slice(s3, l3, name)?,
            )?),
            DType::F64 => CpuStorage::F64(self.forward::<f64>(
                contiguous_slice(s1, l1, name)?,
                s2,
                off,
                contiguous_slice(s3, l3, name)?,
            )?),
            dt => return Err(unsupported_dtype(name, dt)),
        };
        Ok((out, l3.shape().clone()))
    }

    fn bwd(
        &self,
        fo: &Tensor,
        wo: &Tensor,
        x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dfo, dwo) = self.backward(fo, wo, grad, fo.track_op(), wo.track_op())?;
        let dx = x.track_op().then(|| grad.clone());
        Ok((dfo, dwo, dx))
    }
}

impl OutProj {
    /// `(d fo, d wo)`; the residual's gradient is `grad` itself.
    fn backward(
        &self,
        fo: &Tensor,
        wo: &Tensor,
        grad: &Tensor,
        want_dfo: bool,
        want_dwo: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let name = "out-proj-residual-bwd";
        let rows = self.shape.seq.rows();
        let i = self.shape.inner();
        let g2 = grad.contiguous()?.reshape((rows, self.d))?;
        // dwo = gᵀ·o, with o gathered again (a temporary).
        let dwo = if want_dwo {
            let o = map_tensor(
                fo,
                (rows, i),
                name,
                |f| Ok(self.gather(f)),
                |f| Ok(self.gather(f)),
            )?;
            Some(g2.t()?.matmul(&o)?)
        } else {
            None
        };
        let dfo = if want_dfo {
            let d_o = g2.matmul(&wo.detach())?;
            Some(map_tensor(
                &d_o,
                fo.shape(),
                name,
                |g| Ok(self.scatter(g)),
                |g| Ok(self.scatter(g)),
            )?)
        } else {
            None
        };
        Ok((dfo, dwo))
    }
}
