//! The mask estimators' GLU as one op: `a · sigmoid(z)` of the halves `(a, z)` of the last
//! dimension, with `sigmoid(z) = (tanh(z/2) + 1)/2`.
//!
//! Composed from candle ops ([`glu_tanh_composed`]) it keeps `z/2`, its tanh, `tanh + 1` and
//! the gate, four tensors of the output's size, for the backward; fused, only the input and
//! the output.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, D, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{Real, cast, contiguous_slice, kernel_takes, map_tensor, unsupported_dtype};

/// Rows per work item of the kernels.
const ROWS: usize = 64;

/// `h[.., :d] · (tanh(h[.., d:]/2) + 1)/2` for `h` `[.., 2·d]`; returns `[.., d]`.
/// Differentiable in `h`. A fused op on the CPU in f32 and f64, the composition elsewhere.
pub fn glu_tanh(h: &Tensor, d: usize) -> Result<Tensor> {
    let last = h.dim(D::Minus1)?;
    if d == 0 || last != 2 * d {
        return Err(Error::Msg(format!(
            "glu: input {:?} must have a last dim of 2·{d}",
            h.dims()
        )));
    }
    if !kernel_takes(&[h]) {
        return glu_tanh_composed(h, d);
    }
    h.contiguous()?.apply_op1(Glu { d })
}

/// [`glu_tanh`] composed from candle ops (as the mask estimators wrote it).
pub fn glu_tanh_composed(h: &Tensor, d: usize) -> Result<Tensor> {
    let dim = h.rank() - 1;
    let gate = ((((h.narrow(dim, d, d)? * 0.5)?.tanh()? + 1.0)?) * 0.5)?;
    h.narrow(dim, 0, d)? * gate
}

struct Glu {
    d: usize,
}

impl Glu {
    fn forward<T: Real>(&self, h: &[T]) -> Vec<T> {
        let d = self.d;
        let half: T = cast(0.5);
        let mut out = vec![T::zero(); h.len() / 2];
        out.par_chunks_mut(ROWS * d)
            .zip(h.par_chunks(ROWS * 2 * d))
            .for_each(|(ob, hb)| {
                for (orow, hrow) in ob.chunks_mut(d).zip(hb.chunks(2 * d)) {
                    let (a, z) = hrow.split_at(d);
                    for ((o, &a), &z) in orow.iter_mut().zip(a).zip(z) {
                        *o = a * (((z * half).tanh() + T::one()) * half);
                    }
                }
            });
        out
    }

    /// `da = g · gate`, `dz = g · a · (1 − tanh²(z/2))/4`, as `[.., 2·d]`.
    fn backward<T: Real>(&self, h: &[T], g: &[T]) -> Vec<T> {
        let d = self.d;
        let half: T = cast(0.5);
        let mut out = vec![T::zero(); h.len()];
        out.par_chunks_mut(ROWS * 2 * d)
            .zip(h.par_chunks(ROWS * 2 * d))
            .zip(g.par_chunks(ROWS * d))
            .for_each(|((ob, hb), gb)| {
                for ((orow, hrow), grow) in
                    ob.chunks_mut(2 * d).zip(hb.chunks(2 * d)).zip(gb.chunks(d))
                {
                    let (a, z) = hrow.split_at(d);
                    let (da, dz) = orow.split_at_mut(d);
                    for i in 0..d {
                        let t = (z[i] * half).tanh();
                        da[i] = grow[i] * ((t + T::one()) * half);
                        dz[i] = grow[i] * a[i] * half * (T::one() - t * t) * half;
                    }
                }
            });
        out
    }
}

impl CustomOp1 for Glu {
    fn name(&self) -> &'static str {
        "glu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = match s.dtype() {
            DType::F32 => CpuStorage::F32(self.forward(contiguous_slice::<f32>(s, l, name)?)),
            DType::F64 => CpuStorage::F64(self.forward(contiguous_slice::<f64>(s, l, name)?)),
            dt => return Err(unsupported_dtype(name, dt)),
        };
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.d;
        }
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !h.track_op() {
            return Ok(None);
        }
        self.backward_tensor(h, grad).map(Some)
    }
}

impl Glu {
    fn backward_tensor(&self, h: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let name = "glu-bwd";
        let g = grad.contiguous()?;
        let hd = h.detach();
        map_tensor(
            &hd,
            h.shape(),
            name,
            |hv| super::cpu::with_slice::<f32, _>(&g, name, |gv| Ok(self.backward(hv, gv))),
            |hv| super::cpu::with_slice::<f64, _>(&g, name, |gv| Ok(self.backward(hv, gv))),
        )
    }
}

/// The backward of [`glu_tanh`] without a graph, on the CPU: the gradient of its input `h`
/// (contiguous, `[.., 2·d]`) for the output's gradient `grad` (the head's hand-written
/// backward calls it).
pub fn glu_tanh_backward(h: &Tensor, grad: &Tensor, d: usize) -> Result<Tensor> {
    let last = h.dim(D::Minus1)?;
    if d == 0 || last != 2 * d || !h.is_contiguous() || grad.elem_count() * 2 != h.elem_count() {
        return Err(Error::Msg(format!(
            "glu backward: input {:?} (contiguous, last dim 2·{d}) and gradient {:?}",
            h.dims(),
            grad.dims()
        )));
    }
    if !kernel_takes(&[h, grad]) {
        return glu_tanh_backward_composed(h, grad, d);
    }
    Glu { d }.backward_tensor(h, grad)
}

/// [`glu_tanh_backward`] from candle ops, on any device (the GPU's path): with `s = (tanh(z/2)
/// + 1)/2`, `da = g·s` and `dz = g·a·(1 − tanh²(z/2))/4`, concatenated as `h` is.
pub fn glu_tanh_backward_composed(h: &Tensor, grad: &Tensor, d: usize) -> Result<Tensor> {
    let dim = h.rank() - 1;
    let (a, z) = (h.narrow(dim, 0, d)?, h.narrow(dim, d, d)?);
    let th = (z * 0.5)?.tanh()?;
    let da = (grad * ((&th + 1.0)? * 0.5)?)?;
    let dz = ((grad * a)? * ((th.sqr()?.neg()? + 1.0)? * 0.25)?)?;
    Tensor::cat(&[&da, &dz], dim)
}
