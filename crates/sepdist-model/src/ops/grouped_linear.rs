//! The mask estimators' per-band linear layers as one op: `act(x[g]·w[g] + b[g])` for every
//! band `g` of a group, `act` the identity or tanh.
//!
//! Composed from candle ops ([`grouped_linear_composed`]) a layer keeps the matmul output and
//! its sum with the bias (and, for a hidden layer, its tanh): two or three tensors of the
//! output's size. Fused, the graph keeps the input and the output only (tanh's derivative is
//! `1 − y²` of the output).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{Real, contiguous_offset, contiguous_slice, kernel_takes, unsupported_dtype};

/// Rows per work item of the bias and activation pass.
const ROWS: usize = 64;

/// `act(x · w + b)` per group member: `x` `[G, R, I]`, `w` `[G, I, O]` (in × out), `b`
/// `[G, O]`; returns `[G, R, O]`, with `act = tanh` when `tanh`, else the identity.
/// Differentiable in all three. One op on the CPU (f32, f64), the composition elsewhere.
pub fn grouped_linear(x: &Tensor, w: &Tensor, b: &Tensor, tanh: bool) -> Result<Tensor> {
    let (g, r, i, o) = dims(x, w, b)?;
    if !kernel_takes(&[x, w, b]) {
        return grouped_linear_composed(x, w, b, tanh);
    }
    let op = GroupedLinear {
        groups: g,
        rows: r,
        din: i,
        dout: o,
        tanh,
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

/// [`grouped_linear`] composed from candle ops (as the mask estimators wrote it).
pub fn grouped_linear_composed(x: &Tensor, w: &Tensor, b: &Tensor, tanh: bool) -> Result<Tensor> {
    dims(x, w, b)?;
    // candle's CUDA batched matmul takes no batch stride other than the contiguous one (a
    // narrow or transpose of the band features is copied first; free when contiguous).
    let y = super::bias::add_bias(&x.contiguous()?.matmul(w)?, &b.unsqueeze(1)?)?;
    if tanh { y.tanh() } else { Ok(y) }
}

/// `(G, R, I, O)` after checking the shapes.
fn dims(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let bad = || {
        Error::Msg(format!(
            "grouped linear: input {:?}, weight {:?} and bias {:?} must be [G, R, I], \
             [G, I, O] and [G, O]",
            x.dims(),
            w.dims(),
            b.dims()
        ))
    };
    let (g, r, i) = x.dims3().map_err(|_| bad())?;
    let (wg, wi, o) = w.dims3().map_err(|_| bad())?;
    if wg != g || wi != i || b.dims() != [g, o] || x.elem_count() == 0 {
        return Err(bad());
    }
    Ok((g, r, i, o))
}

struct GroupedLinear {
    groups: usize,
    rows: usize,
    din: usize,
    dout: usize,
    tanh: bool,
}

impl GroupedLinear {
    /// Adds the bias of each row's group (and applies tanh) in place.
    fn bias_act<T: Real>(&self, y: &mut [T], b: &[T]) {
        let (rows, o) = (self.rows, self.dout);
        y.par_chunks_mut(ROWS * o)
            .enumerate()
            .for_each(|(chunk, block)| {
                for (j, row) in block.chunks_mut(o).enumerate() {
                    let g = (chunk * ROWS + j) / rows;
                    for (v, &c) in row.iter_mut().zip(&b[g * o..(g + 1) * o]) {
                        *v += c;
                        if self.tanh {
                            *v = v.tanh();
                        }
                    }
                }
            });
    }

    fn forward<T: Real>(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &[T],
    ) -> Result<Vec<T>> {
        let name = "grouped-linear";
        let (g, r, i, o) = (self.groups, self.rows, self.din, self.dout);
        let xl = Layout::contiguous_with_offset((g, r, i), contiguous_offset(xl, name)?);
        let wl = Layout::contiguous_with_offset((g, i, o), contiguous_offset(wl, name)?);
        // candle's batched CPU matmul, the one the composition runs.
        let mut y = T::cpu_storage_data(x.matmul(w, (g, r, o, i), &xl, &wl)?)?;
        self.bias_act(&mut y, b);
        Ok(y)
    }
}

/// `g · (1 − y²)`, tanh's backward (rounded as candle's: `y²` first).
fn times_tanh_grad<T: Real>(g: &[T], y: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); g.len()];
    out.par_iter_mut()
        .zip(g.par_iter().zip(y.par_iter()))
        .for_each(|(o, (&g, &y))| *o = g * (T::one() - y * y));
    out
}

impl CustomOp3 for GroupedLinear {
    fn name(&self) -> &'static str {
        if self.tanh {
            "grouped-linear-tanh"
        } else {
            "grouped-linear"
        }
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
        Ok((out, Shape::from((self.groups, self.rows, self.dout))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        backward_parts(
            x,
            w,
            res,
            grad.contiguous()?,
            self.tanh,
            [x.track_op(), w.track_op(), b.track_op()],
        )
    }
}

/// The backward of [`grouped_linear`] without a graph, on the CPU: `(dx, dw, db)` from the
/// input `x`, the weight `w`, the output `y` (used for tanh's derivative) and the output's
/// gradient `grad` (taken: freed once the pre-activation's gradient exists). The head's
/// hand-written backward calls it; the op's own backward computes the same sums.
pub fn grouped_linear_backward(
    x: &Tensor,
    w: &Tensor,
    y: &Tensor,
    grad: Tensor,
    tanh: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    if grad.dims() != y.dims() {
        return Err(Error::Msg(format!(
            "grouped linear backward: gradient {:?} for an output {:?}",
            grad.dims(),
            y.dims()
        )));
    }
    match backward_parts(x, w, y, grad.contiguous()?, tanh, [true; 3])? {
        (Some(dx), Some(dw), Some(db)) => Ok((dx, dw, db)),
        _ => Err(Error::Msg("grouped linear backward: no gradient".into())),
    }
}

/// `(dx, dw, db)`, each when `want` says so.
fn backward_parts(
    x: &Tensor,
    w: &Tensor,
    y: &Tensor,
    grad: Tensor,
    tanh: bool,
    want: [bool; 3],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let name = "grouped-linear-bwd";
    // The gradient of the pre-activation: a new buffer for tanh.
    let gz = if tanh && !kernel_takes(&[y, &grad]) {
        // Candle ops on any device (the GPU's path): `g ⊙ (1 − y²)`.
        let gz = (&grad * (y.detach().sqr()?.neg()? + 1.0)?)?;
        drop(grad);
        gz
    } else if tanh {
        let y = y.detach();
        let prod =
            |g: &[f32]| super::cpu::with_slice::<f32, _>(&y, name, |y| Ok(times_tanh_grad(g, y)));
        let prod64 =
            |g: &[f64]| super::cpu::with_slice::<f64, _>(&y, name, |y| Ok(times_tanh_grad(g, y)));
        let gz = super::cpu::map_tensor(&grad, grad.shape(), name, prod, prod64)?;
        drop(grad);
        gz
    } else {
        grad
    };
    // candle's CUDA batched matmul takes a transposed operand only with the contiguous batch
    // stride (a copy if `x` is a view; free when contiguous).
    let dw = want[1]
        .then(|| x.detach().contiguous()?.t()?.matmul(&gz))
        .transpose()?;
    let db = want[2].then(|| gz.sum(1)).transpose()?;
    let dx = want[0].then(|| gz.matmul(&w.detach().t()?)).transpose()?;
    Ok((dx, dw, db))
}
