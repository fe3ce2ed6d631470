//! Differentiable RMSNorm: a fused op with its own backward, and the composed reference.
//!
//! candle-nn's fused `rms_norm` has no backward. The composition of basic candle ops
//! ([`rms_norm_composed`]) trains on every device but keeps three activation-sized tensors per
//! call for the backward (`x²`, `x / rms`, the output) plus the gradient chains candle's
//! backward builds through them. [`rms_norm`] is one custom op on the CPU: the graph keeps only
//! its input and output, and its backward (one kernel) returns `dx` and `dγ` in one buffer.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, D, DType, Error, Layout, Result};
use candle_core::{Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{Real, cast, contiguous_slice, is_half, kernel_takes, unsupported_dtype};

/// Rows per work item of the kernels (and per partial sum of `dγ`, so the sums do not depend
/// on the thread count).
const ROWS: usize = 64;

/// `x / sqrt(mean(x², last dim) + eps) · gamma`, with `gamma` of shape `[D]` where `D` is the
/// last dimension of `x`. Differentiable in `x` and `gamma`. A fused op on the CPU in f32 and
/// f64, the composition ([`rms_norm_composed`]) elsewhere.
pub fn rms_norm(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if gamma.dims() != [d] {
        return Err(Error::Msg(format!(
            "rms_norm: gamma has shape {:?}, expected [{d}] (the last dim of x {:?})",
            gamma.dims(),
            x.dims()
        )));
    }
    check_eps(eps)?;
    fused(x, gamma, 1, eps, |x, gamma| {
        rms_norm_composed(x, gamma, eps)
    })
}

/// RMSNorm of `G` groups of rows with a gain per group: `x` `[G, M, D]`, `gamma` `[G, D]`;
/// row `m` of group `g` is normalised and scaled by `gamma[g]`. Differentiable in both.
pub fn rms_norm_groups(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
    let (g, _, d) = x.dims3()?;
    if gamma.dims() != [g, d] {
        return Err(Error::Msg(format!(
            "rms_norm_groups: gamma has shape {:?}, expected [{g}, {d}] for x {:?}",
            gamma.dims(),
            x.dims()
        )));
    }
    check_eps(eps)?;
    fused(x, gamma, g, eps, |x, gamma| {
        let ones = Tensor::ones(d, x.dtype(), x.device())?;
        rms_norm_composed(x, &ones, eps)?.broadcast_mul(&gamma.unsqueeze(1)?)
    })
}

/// The composition of basic candle ops (each with a backward): the reference of the tests and
/// the path on devices and dtypes without a kernel. A 16-bit `x` is normalised in f32 (the
/// mean of squares would accumulate in bf16 on the CPU) and the result cast back.
pub fn rms_norm_composed(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
    if is_half(x.dtype()) {
        let (xf, gf) = (x.to_dtype(DType::F32)?, gamma.to_dtype(DType::F32)?);
        return rms_norm_composed(&xf, &gf, eps)?.to_dtype(x.dtype());
    }
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_rms = (mean_sq + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)?.broadcast_mul(gamma)
}

fn check_eps(eps: f64) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(Error::Msg(format!(
            "rms_norm: eps must be finite and >= 0, got {eps}"
        )))
    }
}

/// The fused op where a kernel takes `x` and `gamma`, else `composed(x, gamma)`. A 16-bit `x`
/// is normalised in f32 (the mean of squares and the gain's gradient sum), then cast back.
fn fused(
    x: &Tensor,
    gamma: &Tensor,
    groups: usize,
    eps: f64,
    composed: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if is_half(x.dtype()) {
        let (xf, gf) = (x.to_dtype(DType::F32)?, gamma.to_dtype(DType::F32)?);
        return fused(&xf, &gf, groups, eps, composed)?.to_dtype(x.dtype());
    }
    if !kernel_takes(&[x, gamma]) || x.elem_count() == 0 {
        return composed(x, gamma);
    }
    x.contiguous()?
        .apply_op2(&gamma.contiguous()?, RmsNorm { eps, groups })
}

/// Forward op: `(x, gamma)` → normalised `x`, `groups` groups of rows with one gain row each.
struct RmsNorm {
    eps: f64,
    groups: usize,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = l2.shape().dims().last().copied().unwrap_or(1);
        let name = self.name();
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(forward(
                contiguous_slice(s1, l1, name)?,
                contiguous_slice(s2, l2, name)?,
                self.groups,
                d,
                cast(self.eps),
            )),
            DType::F64 => CpuStorage::F64(forward(
                contiguous_slice(s1, l1, name)?,
                contiguous_slice(s2, l2, name)?,
                self.groups,
                d,
                self.eps,
            )),
            dt => return Err(unsupported_dtype(name, dt)),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        backward_tensors(
            x,
            gamma,
            grad,
            self.eps,
            self.groups,
            x.track_op(),
            gamma.track_op(),
        )
    }
}

/// The backward of [`rms_norm`] without a graph: `(dx, dγ)` for the output's gradient `grad`
/// (on the CPU, where the fused op runs; a block's hand-written backward calls it).
pub fn rms_norm_backward(
    x: &Tensor,
    gamma: &Tensor,
    grad: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    if !kernel_takes(&[x, gamma, grad]) {
        return rms_norm_backward_composed(x, gamma, grad, eps);
    }
    match backward_tensors(x, gamma, grad, eps, 1, true, true)? {
        (Some(dx), Some(dgamma)) => Ok((dx, dgamma)),
        _ => Err(Error::Msg("rms_norm_backward: no gradient".into())),
    }
}

/// [`rms_norm_backward`] from candle ops, on any device (16-bit inputs in f32): with
/// `y = γ ⊙ x·r`, `r = (mean(x²) + ε)^(-1/2)`, `dγ = Σ_rows g ⊙ x·r` and
/// `dx = r·(g⊙γ − x·r · mean(g⊙γ ⊙ x·r))`. About four activations above its inputs.
pub fn rms_norm_backward_composed(
    x: &Tensor,
    gamma: &Tensor,
    grad: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    if is_half(x.dtype()) {
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let (dx, dg) = rms_norm_backward_composed(&f(x)?, &f(gamma)?, &f(grad)?, eps)?;
        return Ok((dx.to_dtype(x.dtype())?, dg.to_dtype(gamma.dtype())?));
    }
    let d = x.dim(D::Minus1)?;
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let xr = x.broadcast_mul(&r)?;
    let dgamma = (grad * &xr)?.reshape(((), d))?.sum(0)?;
    let g_gamma = grad.broadcast_mul(gamma)?;
    let m = (&g_gamma * &xr)?.mean_keepdim(D::Minus1)?;
    let dx = (g_gamma - xr.broadcast_mul(&m)?)?.broadcast_mul(&r)?;
    Ok((dx, dgamma))
}

fn backward_tensors(
    x: &Tensor,
    gamma: &Tensor,
    grad: &Tensor,
    eps: f64,
    groups: usize,
    want_dx: bool,
    want_dgamma: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let op = RmsNormBwd { eps, groups };
    // One buffer: dx then dγ.
    let packed = x.apply_op3_no_bwd(gamma, &grad.contiguous()?, &op)?;
    let n = x.elem_count();
    let dx = want_dx
        .then(|| packed.narrow(0, 0, n)?.reshape(x.shape()))
        .transpose()?;
    // dγ copied out: a view would keep the whole buffer (dx's size) alive as long as dγ
    // (and `Tensor::copy` clones the whole buffer a view lives in).
    let dgamma = want_dgamma
        .then(|| {
            let view = packed.narrow(0, n, gamma.elem_count())?;
            let own = Tensor::zeros(view.shape(), view.dtype(), view.device())?;
            own.slice_set(&view, 0, 0)?;
            own.reshape(gamma.shape())
        })
        .transpose()?;
    Ok((dx, dgamma))
}

/// Backward op: `(x, gamma, grad)` → `[numel(x) + numel(gamma)]` = (dx, dγ) flattened.
struct RmsNormBwd {
    eps: f64,
    groups: usize,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
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
        let d = l2.shape().dims().last().copied().unwrap_or(1);
        let name = self.name();
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(backward(
                contiguous_slice(s1, l1, name)?,
                contiguous_slice(s2, l2, name)?,
                contiguous_slice(s3, l3, name)?,
                self.groups,
                d,
                cast(self.eps),
            )),
            DType::F64 => CpuStorage::F64(backward(
                contiguous_slice(s1, l1, name)?,
                contiguous_slice(s2, l2, name)?,
                contiguous_slice(s3, l3, name)?,
                self.groups,
                d,
                self.eps,
            )),
            dt => return Err(unsupported_dtype(name, dt)),
        };
        let len = l1.shape().elem_count() + l2.shape().elem_count();
        Ok((out, Shape::from(len)))
    }
}

/// `1 / sqrt(mean(row²) + eps)`.
#[inline]
fn inv_rms<T: Real>(row: &[T], eps: T) -> T {
    let ss = row.iter().fold(T::zero(), |a, &v| a + v * v);
    let n: T = cast(row.len() as f64);
    (ss / n + eps).sqrt().recip()
}

fn forward<T: Real>(x: &[T], gamma: &[T], groups: usize, d: usize, eps: T) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    let per_group = x.len() / groups.max(1);
    out.par_chunks_mut(ROWS * d)
        .zip(x.par_chunks(ROWS * d))
        .enumerate()
        .for_each(|(c, (ob, xb))| {
            for (r, (orow, xrow)) in ob.chunks_mut(d).zip(xb.chunks(d)).enumerate() {
                let g = (c * ROWS + r) * d / per_group.max(1);
                let gam = &gamma[g * d..(g + 1) * d];
                let inv = inv_rms(xrow, eps);
                for ((o, &v), &w) in orow.iter_mut().zip(xrow).zip(gam) {
                    *o = v * inv * w;
                }
            }
        });
    out
}

/// Per row: `x̂ = x·r`, `dx = r·(g∘γ − x̂·mean(g∘γ∘x̂))`; `dγ = Σ_rows g∘x̂` per group, summed in
/// fixed chunks of [`ROWS`] rows.
fn backward<T: Real>(x: &[T], gamma: &[T], grad: &[T], groups: usize, d: usize, eps: T) -> Vec<T> {
    let mut out = vec![T::zero(); x.len() + gamma.len()];
    let (dx, dgamma) = out.split_at_mut(x.len());
    let per_group = x.len() / groups.max(1);
    let n: T = cast(d as f64);
    for (g, ((dxg, xg), gg)) in dx
        .chunks_mut(per_group.max(1))
        .zip(x.chunks(per_group.max(1)))
        .zip(grad.chunks(per_group.max(1)))
        .enumerate()
    {
        let gam = &gamma[g * d..(g + 1) * d];
        let partials: Vec<Vec<T>> = dxg
            .par_chunks_mut(ROWS * d)
            .zip(xg.par_chunks(ROWS * d))
            .zip(gg.par_chunks(ROWS * d))
            .map(|((db, xb), gb)| {
                let mut dgam = vec![T::zero(); d];
                for ((drow, xrow), grow) in db.chunks_mut(d).zip(xb.chunks(d)).zip(gb.chunks(d)) {
                    let inv = inv_rms(xrow, eps);
                    let mut dot = T::zero();
                    for ((&v, &gv), &w) in xrow.iter().zip(grow).zip(gam) {
                        dot += gv * w * v * inv;
                    }
                    let dot = dot / n;
                    for ((((o, &v), &gv), &w), dg) in drow
                        .iter_mut()
                        .zip(xrow)
                        .zip(grow)
                        .zip(gam)
                        .zip(dgam.iter_mut())
                    {
                        let xhat = v * inv;
                        *o = inv * (gv * w - xhat * dot);
                        *dg += gv * xhat;
                    }
                }
                dgam
            })
            .collect();
        let dst = &mut dgamma[g * d..(g + 1) * d];
        for p in partials {
            for (a, b) in dst.iter_mut().zip(p) {
                *a += b;
            }
        }
    }
    out
}
