//! The feed-forward's linear layers as fused ops: `x·wᵀ + b`, and `gelu(h)·wᵀ + b` (GELU with
//! erf, recomputed in the backward instead of kept).
//!
//! Composed from candle ops, `gelu(x·w1ᵀ + b1)·w2ᵀ + b2` keeps the `[rows, hidden]` matmul
//! output, its sum with the bias and its GELU (three hidden-sized tensors), and the output
//! projection before its bias. Fused, the graph keeps the pre-activation `h` and the output.

use candle_core::backend::BackendStorage;
use candle_core::op::{GeluErf, UnaryOpT};
use candle_core::{CpuStorage, CustomOp3, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{
    Real, contiguous_offset, contiguous_slice, in_f32, kernel_takes, map_tensor, matmul_cpu,
};
use super::cpu::{contiguous_slice_mut, unsupported_dtype};

/// `x · wᵀ + b`: `x` `[.., Din]`, `w` `[Dout, Din]` (PyTorch's out × in), `b` `[Dout]`;
/// returns `[.., Dout]`. Differentiable in all three.
pub fn linear_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    fused(x, w, b, false)
}

/// `gelu_erf(h) · wᵀ + b` (shapes as [`linear_bias`]). Differentiable in all three; the
/// backward recomputes `gelu(h)` from `h`.
pub fn gelu_linear_bias(h: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    fused(h, w, b, true)
}

/// [`linear_bias`] composed from candle ops.
pub fn linear_bias_composed(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (rows, din, dout) = dims(x, w, b)?;
    let mut shape = x.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = dout;
    }
    let y = x.reshape((rows, din))?.matmul(&w.t()?)?;
    super::bias::add_bias(&y, b)?.reshape(shape)
}

/// [`gelu_linear_bias`] composed from candle ops.
pub fn gelu_linear_bias_composed(h: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    linear_bias_composed(&h.gelu_erf()?, w, b)
}

/// The backward of [`linear_bias`] without a graph (the fused op's, on the CPU): `(dx, dw,
/// db)` for the output's gradient `grad`. For a block's hand-written backward: `x` is taken
/// and dropped once `dw` is computed, so that it is gone before `dx` is allocated.
pub fn linear_bias_backward(
    x: Tensor,
    w: &Tensor,
    b: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    fused_backward(x, w, b, grad, false)
}

/// The backward of [`gelu_linear_bias`] without a graph, as [`linear_bias_backward`] (`h` is
/// needed to the end: `dh` uses `gelu'(h)`).
pub fn gelu_linear_bias_backward(
    h: &Tensor,
    w: &Tensor,
    b: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    fused_backward(h.clone(), w, b, grad, true)
}

fn fused_backward(
    x: Tensor,
    w: &Tensor,
    b: &Tensor,
    grad: &Tensor,
    gelu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (rows, din, dout) = dims(&x, w, b)?;
    if !kernel_takes(&[&x, w, b, grad]) {
        return composed_backward(x, w, grad, gelu, (rows, din, dout));
    }
    let op = Linear {
        rows,
        din,
        dout,
        gelu,
        shape: grad.shape().clone(),
    };
    match op.backward(x, w, grad, [true; 3])? {
        (Some(dx), Some(dw), Some(db)) => Ok((dx, dw, db)),
        _ => Err(Error::Msg("linear_bias_backward: no gradient".into())),
    }
}

/// Row chunks of the composed GELU backward: its temporaries are a quarter of the hidden
/// activation each, not a whole one.
const GELU_BACKWARD_CHUNKS: usize = 4;

/// The backward of `act(x)·wᵀ + b` from candle ops, on any device (the GPU's path): `dw = gᵀ·a`,
/// `db = Σ_rows g`, `dx = (g·w) ⊙ act'(x)`, `a = act(x)`. With GELU, row chunk by row chunk
/// into one preallocated `dx`, so that `a`, `g·w` and `gelu'(x)` exist a chunk at a time.
fn composed_backward(
    x: Tensor,
    w: &Tensor,
    grad: &Tensor,
    gelu: bool,
    (rows, din, dout): (usize, usize, usize),
) -> Result<(Tensor, Tensor, Tensor)> {
    let shape = x.shape().clone();
    let x2 = x.reshape((rows, din))?;
    drop(x);
    let g2 = grad.reshape((rows, dout))?;
    // The bias' gradient summed in f32 for bf16 (see `bias`).
    let db = in_f32(&g2, |g| g.sum(0))?;
    if !gelu {
        let dw = g2.t()?.matmul(&x2)?;
        drop(x2);
        let dx = g2.matmul(w)?.reshape(shape)?;
        return Ok((dx, dw, db));
    }
    let dx = Tensor::zeros((rows, din), x2.dtype(), x2.device())?;
    let chunk = rows.div_ceil(GELU_BACKWARD_CHUNKS).max(1);
    let mut dw: Option<Tensor> = None;
    for start in (0..rows).step_by(chunk) {
        let n = chunk.min(rows - start);
        let (xc, gc) = (x2.narrow(0, start, n)?, g2.narrow(0, start, n)?);
        let part = gc.t()?.matmul(&xc.gelu_erf()?)?;
        dw = Some(match dw {
            Some(acc) => (acc + part)?,
            None => part,
        });
        let dxc = (gc.matmul(w)? * gelu_erf_derivative(&xc)?)?;
        dx.slice_set(&dxc, 0, start)?;
    }
    let dw = dw.ok_or_else(|| Error::Msg("gelu_linear_bias_backward: no rows".into()))?;
    Ok((dx.reshape(shape)?, dw, db))
}

/// `d/dx gelu_erf(x) = ½(1 + erf(x/√2)) + x·exp(−x²/2)/√(2π)` as candle's backward writes it
/// (`0.398942` for `1/√(2π)`), so that the gradients stay the composition's and the fused
/// kernel's.
fn gelu_erf_derivative(x: &Tensor) -> Result<Tensor> {
    let half_erf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? * 0.5)?;
    let slope = ((x.sqr()? * -0.5)?.exp()? * x)? * 0.398942;
    (slope? + 0.5)? + half_erf
}

fn dims(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<(usize, usize, usize)> {
    let (dout, din) = w.dims2()?;
    if x.dims().last() != Some(&din) || b.dims() != [dout] || x.elem_count() == 0 {
        return Err(Error::Msg(format!(
            "linear: input {:?}, weight {:?} and bias {:?} do not fit (weight is [out, in])",
            x.dims(),
            w.dims(),
            b.dims()
        )));
    }
    Ok((x.elem_count() / din, din, dout))
}

fn fused(x: &Tensor, w: &Tensor, b: &Tensor, gelu: bool) -> Result<Tensor> {
    let (rows, din, dout) = dims(x, w, b)?;
    if !kernel_takes(&[x, w, b]) {
        return if gelu {
            gelu_linear_bias_composed(x, w, b)
        } else {
            linear_bias_composed(x, w, b)
        };
    }
    let mut shape = x.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = dout;
    }
    let op = Linear {
        rows,
        din,
        dout,
        gelu,
        shape: Shape::from(shape),
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

/// `(x, w, b)` → `act(x)·wᵀ + b`, `act` the identity or GELU(erf).
struct Linear {
    rows: usize,
    din: usize,
    dout: usize,
    gelu: bool,
    /// Output shape: `x`'s with the last dim `dout`.
    shape: Shape,
}

/// `gelu_erf` as candle computes it (the same function, so fused and composed agree).
trait Gelu: Real {
    fn gelu(self) -> Self;
    /// `d/dx gelu_erf(x)` by candle's backward formula, `0.5 + 0.398942·x·exp(−x²/2) +
    /// 0.5·erf(x/√2)` with its constant, so that the gradients stay the composition's.
    fn gelu_grad(self) -> Self;
}

impl Gelu for f32 {
    fn gelu(self) -> f32 {
        GeluErf::f32(self)
    }
    fn gelu_grad(self) -> f32 {
        let erf = candle_core::cpu::erf::erf_f32(self * std::f32::consts::FRAC_1_SQRT_2);
        0.5 + 0.398942 * (-self * self / 2.0).exp() * self + 0.5 * erf
    }
}

impl Gelu for f64 {
    fn gelu(self) -> f64 {
        GeluErf::f64(self)
    }
    fn gelu_grad(self) -> f64 {
        let erf = candle_core::cpu::erf::erf_f64(self * std::f64::consts::FRAC_1_SQRT_2);
        0.5 + 0.398942 * (-self * self / 2.0).exp() * self + 0.5 * erf
    }
}

fn gelu_all<T: Gelu>(x: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_iter_mut()
        .zip(x.par_iter())
        .for_each(|(o, &v)| *o = v.gelu());
    out
}

impl Linear {
    fn forward<T: Gelu>(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &[T],
    ) -> Result<Vec<T>> {
        let name = "linear";
        let w_off = contiguous_offset(wl, name)?;
        let y = if self.gelu {
            // The activation is a temporary of the kernel.
            let a = T::to_cpu_storage_owned(gelu_all(contiguous_slice::<T>(x, xl, name)?));
            matmul_cpu(&a, 0, w, w_off, true, self.rows, self.dout, self.din)?
        } else {
            let x_off = contiguous_offset(xl, name)?;
            matmul_cpu(x, x_off, w, w_off, true, self.rows, self.dout, self.din)?
        };
        let mut y = T::cpu_storage_data(y)?;
        y.par_chunks_mut(self.dout).for_each(|row| {
            for (a, &c) in row.iter_mut().zip(b) {
                *a += c;
            }
        });
        Ok(y)
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        if self.gelu { "gelu-linear" } else { "linear" }
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
        let name = self.name();
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(self.forward::<f32>(
                s1,
                l1,
                s2,
                l2,
                contiguous_slice(s3, l3, name)?,
            )?),
            DType::F64 => CpuStorage::F64(self.forward::<f64>(
                s1,
                l1,
                s2,
                l2,
                contiguous_slice(s3, l3, name)?,
            )?),
            dt => return Err(unsupported_dtype(name, dt)),
        };
        Ok((out, self.shape.clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(
            x.clone(),
            w,
            grad,
            [x.track_op(), w.track_op(), b.track_op()],
        )
    }
}

impl Linear {
    /// `(dx, dw, db)`, each computed when `want` says so. Without GELU, `x` (this handle) is
    /// dropped once `dw` is computed: `dx` does not need it.
    fn backward(
        &self,
        x: Tensor,
        w: &Tensor,
        grad: &Tensor,
        want: [bool; 3],
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = if self.gelu {
            "gelu-linear-bwd"
        } else {
            "linear-bwd"
        };
        let g = grad.contiguous()?.reshape((self.rows, self.dout))?;
        let shape = x.shape().clone();
        let x2 = x.detach().reshape((self.rows, self.din))?;
        drop(x);
        // dw = gᵀ · act(x); the activation is recomputed, a temporary.
        let dw = if want[1] {
            Some(if self.gelu {
                let a = map_tensor(
                    &x2,
                    (self.rows, self.din),
                    name,
                    |v| Ok(gelu_all(v)),
                    |v| Ok(gelu_all(v)),
                )?;
                g.t()?.matmul(&a)?
            } else {
                g.t()?.matmul(&x2)?
            })
        } else {
            None
        };
        let db = want[2].then(|| g.sum(0)).transpose()?;
        // `dx` needs `x` only through GELU's derivative.
        let h = self.gelu.then_some(x2);
        let dx = if want[0] {
            let da = g.matmul(&w.detach())?;
            if let Some(h) = &h {
                // dh = da ∘ gelu'(h), over `da` (a new buffer only this function holds).
                da.inplace_op2(h, &TimesGeluGrad)?;
            }
            Some(da.reshape(shape)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// `d ← d ∘ gelu'(h)` in place (`d` the gradient of GELU's output, `h` its input).
struct TimesGeluGrad;

impl TimesGeluGrad {
    fn run<T: Gelu>(d: &mut [T], l1: &Layout, h: &[T]) -> Result<()> {
        let name = "gelu-grad-in-place";
        let d = contiguous_slice_mut(d, l1, name)?;
        if d.len() != h.len() {
            return Err(Error::Msg(format!(
                "{name}: {} gradients for {} inputs",
                d.len(),
                h.len()
            )));
        }
        d.par_iter_mut()
            .zip(h.par_iter())
            .for_each(|(g, &v)| *g *= v.gelu_grad());
        Ok(())
    }
}

impl candle_core::InplaceOp2 for TimesGeluGrad {
    fn name(&self) -> &'static str {
        "gelu-grad-in-place"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let name = self.name();
        match s1 {
            CpuStorage::F32(d) => Self::run(d, l1, contiguous_slice(s2, l2, name)?),
            CpuStorage::F64(d) => Self::run(d, l1, contiguous_slice(s2, l2, name)?),
            s => Err(unsupported_dtype(name, s.dtype())),
        }
    }
}
