//! Memory-lean attention (FlashAttention-2 algorithm) and the plain reference.
//!
//! [`flash_attention`] never materialises the `T×T` score matrix: the forward streams over
//! blocks of keys with an online softmax and keeps only the output and the log-sum-exp (lse)
//! per query; the backward recomputes the probabilities block by block from the lse.
//!
//! Design: the forward custom op ([`FlashAttn`]) returns `[B, H, T, Dh+1]`, the output in the
//! first `Dh` columns and the lse in the last, so the backward finds the lse in its `res`
//! argument. The public wrapper narrows the lse off; the gradient candle routes into that
//! column is then zero, but the backward still handles a non-zero one exactly
//! (`∂lse_i/∂s_ij = P_ij`, folded into `D_i`). The backward itself is a second custom op
//! ([`FlashAttnBwd`]); both have CUDA kernels in `attention.cu` (see `attention_cuda.rs`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Error, Layout, Result};
use candle_core::{Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{Real, cast, contiguous_slice, contiguous_slice_mut, is_half, unsupported_dtype};
use super::softmax::softmax_last_dim;
use realfft::num_traits::Float;

/// Queries per forward work item.
const BLOCK_Q: usize = 64;
/// Keys per block: the transposed key/value block (`Dh × BLOCK_K`) stays in L1/L2.
const BLOCK_K: usize = 64;

/// Softmax attention `softmax(scale · q kᵀ) v` with memory linear in `T`.
///
/// `q`, `k`, `v`: `[B, H, T, Dh]` with the same shape and dtype; returns `[B, H, T, Dh]`.
/// Differentiable in `q`, `k` and `v`. Kernels on the CPU (f32, f64) and on CUDA (f32, bf16,
/// head size up to 128); elsewhere it falls back to [`reference_attention`], which is correct
/// but quadratic in memory.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (_, _, _, d) = check_qkv(q, k, v, scale)?;
    if !has_kernel(q, d) {
        return reference_attention(q, k, v, scale);
    }
    let out = q
        .contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, FlashAttn { scale })?;
    // The CUDA kernel's result is f32 for bf16 inputs too (see attention_cuda.rs).
    out.narrow(3, 0, d)?.to_dtype(q.dtype())
}

/// Whether a kernel takes q/k/v like `x` with head size `d`: the CPU's (f32, f64) or, in CUDA
/// builds, the GPU's (f32, bf16).
fn has_kernel(x: &Tensor, d: usize) -> bool {
    // Not `kernel_takes`: the attention keeps its kernel under `with_composed_ops`, as on a GPU.
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return true;
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::attention_cuda::takes(x.dtype(), d);
    }
    let _ = d;
    false
}

/// [`flash_attention`] on q, k, v packed in one tensor `[3, B, H, T, Dh]` (as
/// [`super::attn_proj::qkv_rope`] makes them), returning the output ‖ log-sum-exp
/// `[B, H, T, Dh + 1]` (the first `Dh` columns are the attention output). The backward returns
/// the packed (dq, dk, dv) as the gradient of the one input, with no per-part copies. Where no
/// kernel takes them: the reference attention and the log-sum-exp of its scores. With bf16 on
/// CUDA the kernel's f32 result is what the backward keeps; the caller gets a bf16 copy.
pub fn flash_attention_packed(qkv: &Tensor, scale: f64) -> Result<Tensor> {
    let (three, b, h, t, d) = qkv.dims5()?;
    if three != 3 {
        return Err(Error::Msg(format!(
            "attention: packed q, k, v must be [3, B, H, T, Dh], got {:?}",
            qkv.dims()
        )));
    }
    let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
    check_qkv(&q, &k, &v, scale)?;
    if !has_kernel(qkv, d) {
        let scores = scores(&q, &k, scale)?;
        let out = probabilities(&scores, v.dtype())?.matmul(&v.contiguous()?)?;
        let lse = super::softmax::logsumexp_last_dim(&scores)?.to_dtype(v.dtype())?;
        return Tensor::cat(&[&out, &lse], 3);
    }
    let out = qkv.contiguous()?.apply_op1(FlashAttnPacked { scale })?;
    debug_assert_eq!(out.dims(), [b, h, t, d + 1]);
    out.to_dtype(qkv.dtype())
}

/// The backward of [`flash_attention_packed`] without a graph (the fused op's, on the CPU):
/// the packed `[3, B, H, T, Dh]` (dq, dk, dv) from the op's output `res` (output ‖
/// log-sum-exp) and its gradient. For a block's hand-written backward.
pub fn flash_attention_packed_backward(
    qkv: &Tensor,
    res: &Tensor,
    grad: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let op = FlashAttnBwd {
        scale,
        res: res.contiguous()?,
        grad: grad.contiguous()?,
    };
    // `[3, B, H, T, Dh]` = (dq, dk, dv): the packed gradient as is.
    let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
    q.apply_op3_no_bwd(&k, &v, &op)
}

/// The plain composition `softmax(scale · q kᵀ) v` (materialises the scores); for tests and
/// benchmarks. Same shapes as [`flash_attention`]. With 16-bit q, k, v the scores and the
/// softmax are f32 (as in FlashAttention's kernels: bf16 scores would round a logit of 10 by
/// 0.03) and the probabilities meet `v` in its dtype.
pub fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    check_qkv(q, k, v, scale)?;
    probabilities(&scores(q, k, scale)?, v.dtype())?.matmul(&v.contiguous()?)
}

/// `scale · q kᵀ`, in f32 for 16-bit q and k.
fn scores(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    let (q, k) = if is_half(q.dtype()) {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    } else {
        (q.clone(), k.clone())
    };
    q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale
}

/// The softmax of `scores` in `dtype` (v's).
fn probabilities(scores: &Tensor, dtype: DType) -> Result<Tensor> {
    softmax_last_dim(scores)?.to_dtype(dtype)
}

fn check_qkv(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<(usize, usize, usize, usize)> {
    let dims = q.dims4()?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        return Err(Error::Msg(format!(
            "attention: q, k, v must share the shape [B, H, T, Dh], got {:?}, {:?}, {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return Err(Error::Msg(format!(
            "attention: q, k, v must share the dtype, got {:?}, {:?}, {:?}",
            q.dtype(),
            k.dtype(),
            v.dtype()
        )));
    }
    if !scale.is_finite() {
        return Err(Error::Msg(format!(
            "attention: scale must be finite, got {scale}"
        )));
    }
    if dims.2 == 0 || dims.3 == 0 {
        return Err(Error::Msg(format!(
            "attention: T and Dh must be > 0, got {:?}",
            q.dims()
        )));
    }
    Ok(dims)
}

/// Forward op: `(q, k, v)` → `[B, H, T, Dh+1]` (output ‖ lse).
struct FlashAttn {
    scale: f64,
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "flash-attention"
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
        let (b, h, t, d) = l1.shape().dims4()?;
        let name = self.name();
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(flash_fwd_cpu::<f32>(
                contiguous_slice(s1, l1, name)?,
                contiguous_slice(s2, l2, name)?,
                contiguous_slice(s3, l3, name)?,
                t,
                d,
                cast(self.scale),
            )),
            DType::F64 => CpuStorage::F64(flash_fwd_cpu::<f64>(
                contiguous_slice(s1, l1, name)?,
                contiguous_slice(s2, l2, name)?,
                contiguous_slice(s3, l3, name)?,
                t,
                d,
                self.scale,
            )),
            dt => return Err(unsupported_dtype(name, dt)),
        };
        Ok((out, Shape::from((b, h, t, d + 1))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::attention_cuda::{Part, Sizes, forward};
        let (b, h, t, d) = l1.shape().dims4()?;
        let [q, k, v] = Part::three([(s1, l1), (s2, l2), (s3, l3)], self.name())?;
        let out = forward(q, k, v, Sizes::of(l1, self.scale)?)?;
        Ok((out, Shape::from((b, h, t, d + 1))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = FlashAttnBwd {
            scale: self.scale,
            res: res.contiguous()?,
            grad: grad_res.contiguous()?,
        };
        // Gradients are not differentiated again (candle detaches them), so no backward here.
        let packed = q.apply_op3_no_bwd(k, v, &op)?;
        Ok((
            Some(packed.get(0)?),
            Some(packed.get(1)?),
            Some(packed.get(2)?),
        ))
    }
}

/// Forward op of [`flash_attention_packed`]: `[3, B, H, T, Dh]` → `[B, H, T, Dh+1]`.
struct FlashAttnPacked {
    scale: f64,
}

impl CustomOp1 for FlashAttnPacked {
    fn name(&self) -> &'static str {
        "flash-attention-packed"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, b, h, t, d) = l1.shape().dims5()?;
        let name = self.name();
        fn split<T>(x: &[T]) -> (&[T], &[T], &[T]) {
            let n = x.len() / 3;
            (&x[..n], &x[n..2 * n], &x[2 * n..])
        }
        let out = match s1.dtype() {
            DType::F32 => {
                let (q, k, v) = split(contiguous_slice::<f32>(s1, l1, name)?);
                CpuStorage::F32(flash_fwd_cpu(q, k, v, t, d, cast(self.scale)))
            }
            DType::F64 => {
                let (q, k, v) = split(contiguous_slice::<f64>(s1, l1, name)?);
                CpuStorage::F64(flash_fwd_cpu(q, k, v, t, d, self.scale))
            }
            dt => return Err(unsupported_dtype(name, dt)),
        };
        Ok((out, Shape::from((b, h, t, d + 1))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::attention_cuda::{Part, Sizes, forward};
        let (_, b, h, t, d) = l1.shape().dims5()?;
        let n = b * h * t * d;
        let q = Part::of(s1, l1, self.name())?;
        let sizes = Sizes {
            bh: b * h,
            t,
            d,
            scale: self.scale,
        };
        let out = forward(q, q.at(n), q.at(2 * n), sizes)?;
        Ok((out, Shape::from((b, h, t, d + 1))))
    }

    fn bwd(&self, qkv: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        if !qkv.track_op() {
            return Ok(None);
        }
        flash_attention_packed_backward(qkv, res, grad_res, self.scale).map(Some)
    }
}

/// [`flash_attention_packed_backward`] writing (dq, dk, dv) over `qkv`'s own storage and
/// returning it as the gradient: no second `[3, B, H, T, Dh]` buffer. `qkv` is taken because it
/// is overwritten: the caller must hold no other tensor on its storage (a block's hand-written
/// backward, where q/k/v are its own and not needed after this).
pub fn flash_attention_packed_backward_in_place(
    qkv: Tensor,
    res: &Tensor,
    grad: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (_, _, _, t, d) = qkv.dims5()?;
    if !qkv.device().is_cpu() || !qkv.is_contiguous() {
        return Err(Error::Msg(
            "flash attention backward in place: q/k/v must be contiguous on the CPU".into(),
        ));
    }
    let op = FlashAttnBwdInPlace { scale, t, d };
    qkv.inplace_op3(&res.contiguous()?, &grad.contiguous()?, &op)?;
    Ok(qkv)
}

/// In-place backward op: `qkv` (overwritten with (dq, dk, dv)), the forward result and its
/// gradient.
struct FlashAttnBwdInPlace {
    scale: f64,
    t: usize,
    d: usize,
}

impl candle_core::InplaceOp3 for FlashAttnBwdInPlace {
    fn name(&self) -> &'static str {
        "flash-attention-bwd-in-place"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        match s1 {
            CpuStorage::F32(v) => self.run(v, l1, s2, l2, s3, l3),
            CpuStorage::F64(v) => self.run(v, l1, s2, l2, s3, l3),
            s => Err(unsupported_dtype(self.name(), s.dtype())),
        }
    }
}

impl FlashAttnBwdInPlace {
    fn run<T: Real>(
        &self,
        qkv: &mut [T],
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let name = "flash-attention-bwd-in-place";
        let qkv = contiguous_slice_mut(qkv, l1, name)?;
        let o = contiguous_slice::<T>(s2, l2, name)?;
        let g = contiguous_slice::<T>(s3, l3, name)?;
        let d = self.d;
        if o.len() != qkv.len() / 3 / d * (d + 1) || g.len() != o.len() {
            return Err(Error::Msg(format!(
                "{name}: saved tensors have the wrong size"
            )));
        }
        flash_bwd_cpu_in_place(qkv, o, g, self.t, d, cast(self.scale));
        Ok(())
    }
}

/// Backward op: `(q, k, v)` plus the forward result and its gradient (both `[B, H, T, Dh+1]`)
/// → `[3, B, H, T, Dh]` = (dq, dk, dv).
struct FlashAttnBwd {
    scale: f64,
    res: Tensor,
    grad: Tensor,
}

impl FlashAttnBwd {
    fn run<T: Real>(&self, q: &[T], k: &[T], v: &[T], t: usize, d: usize) -> Result<Vec<T>> {
        let name = "flash-attention-bwd";
        let (res_storage, res_layout) = self.res.storage_and_layout();
        let (grad_storage, grad_layout) = self.grad.storage_and_layout();
        let (candle_core::Storage::Cpu(rs), candle_core::Storage::Cpu(gs)) =
            (&*res_storage, &*grad_storage)
        else {
            return Err(Error::Msg(format!(
                "{name}: saved tensors are not on the CPU"
            )));
        };
        let o = contiguous_slice::<T>(rs, res_layout, name)?;
        let g = contiguous_slice::<T>(gs, grad_layout, name)?;
        if o.len() != q.len() / d * (d + 1) || g.len() != o.len() {
            return Err(Error::Msg(format!(
                "{name}: saved tensors have the wrong size"
            )));
        }
        Ok(flash_bwd_cpu(q, k, v, o, g, t, d, cast(self.scale)))
    }
}

impl CustomOp3 for FlashAttnBwd {
    fn name(&self) -> &'static str {
        "flash-attention-bwd"
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
        let (b, h, t, d) = l1.shape().dims4()?;
        let name = self.name();
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(self.run::<f32>(
                contiguous_slice(s1, l1, name)?,
                contiguous_slice(s2, l2, name)?,
                contiguous_slice(s3, l3, name)?,
                t,
                d,
            )?),
            DType::F64 => CpuStorage::F64(self.run::<f64>(
                contiguous_slice(s1, l1, name)?,
                contiguous_slice(s2, l2, name)?,
                contiguous_slice(s3, l3, name)?,
                t,
                d,
            )?),
            dt => return Err(unsupported_dtype(name, dt)),
        };
        Ok((out, Shape::from((3, b, h, t, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::attention_cuda::{Part, Sizes, backward};
        let (b, h, t, d) = l1.shape().dims4()?;
        let name = self.name();
        let (res_storage, res_layout) = self.res.storage_and_layout();
        let (grad_storage, grad_layout) = self.grad.storage_and_layout();
        let (candle_core::Storage::Cuda(rs), candle_core::Storage::Cuda(gs)) =
            (&*res_storage, &*grad_storage)
        else {
            return Err(Error::Msg(format!(
                "{name}: saved tensors are not on the GPU"
            )));
        };
        let out = backward(
            Part::three([(s1, l1), (s2, l2), (s3, l3)], name)?,
            Part::of(rs, res_layout, name)?,
            Part::of(gs, grad_layout, name)?,
            Sizes::of(l1, self.scale)?,
        )?;
        Ok((out, Shape::from((3, b, h, t, d))))
    }
}

/// `dst[c] += a · src[c]`.
#[inline]
fn axpy<T: Real>(dst: &mut [T], a: T, src: &[T]) {
    for (y, x) in dst.iter_mut().zip(src) {
        *y += a * *x;
    }
}

/// Copies rows `k0..k0+nk` of the row-major `[T, d]` matrix `src` into `dst` as `[d, nk]`,
/// so that scores against a query row become contiguous axpy updates (which vectorise).
fn transpose_block<T: Real>(src: &[T], k0: usize, nk: usize, d: usize, dst: &mut [T]) {
    for j in 0..nk {
        let row = &src[(k0 + j) * d..(k0 + j + 1) * d];
        for (c, &x) in row.iter().enumerate() {
            dst[c * nk + j] = x;
        }
    }
}

/// `s[j] = scale · ⟨q_row, k_j⟩` for the transposed key block `kt` (`[d, nk]`).
#[inline]
fn row_scores<T: Real>(q_row: &[T], kt: &[T], nk: usize, scale: T, s: &mut [T]) {
    s.fill(T::zero());
    for (c, &qc) in q_row.iter().enumerate() {
        axpy(s, qc * scale, &kt[c * nk..(c + 1) * nk]);
    }
}

/// Forward over `[BH, T, d]` inputs; output `[BH, T, d+1]` (output ‖ lse), parallel over
/// (batch·head, query block).
fn flash_fwd_cpu<T: Real>(q: &[T], k: &[T], v: &[T], t: usize, d: usize, scale: T) -> Vec<T> {
    let dd = d + 1;
    let bh = q.len() / (t * d);
    let mut out = vec![T::zero(); bh * t * dd];
    out.par_chunks_mut(t * dd).enumerate().for_each(|(b, ob)| {
        let qb = &q[b * t * d..(b + 1) * t * d];
        let kb = &k[b * t * d..(b + 1) * t * d];
        let vb = &v[b * t * d..(b + 1) * t * d];
        ob.par_chunks_mut(BLOCK_Q * dd)
            .enumerate()
            .for_each(|(iq, oblk)| {
                let q0 = iq * BLOCK_Q;
                let nq = oblk.len() / dd;
                let mut kt = vec![T::zero(); d * BLOCK_K];
                let mut s = [T::zero(); BLOCK_K];
                let mut acc = vec![T::zero(); nq * d];
                let mut m = vec![T::neg_infinity(); nq];
                let mut l = vec![T::zero(); nq];
                for k0 in (0..t).step_by(BLOCK_K) {
                    let nk = BLOCK_K.min(t - k0);
                    transpose_block(kb, k0, nk, d, &mut kt[..d * nk]);
                    for i in 0..nq {
                        let s = &mut s[..nk];
                        row_scores(&qb[(q0 + i) * d..(q0 + i + 1) * d], &kt, nk, scale, s);
                        let block_max = s.iter().fold(T::neg_infinity(), |a, &x| Float::max(a, x));
                        let m_new = Float::max(m[i], block_max);
                        // Rescale what was accumulated under the previous running max
                        // (exp(-inf) = 0 on the first block).
                        let alpha = (m[i] - m_new).exp();
                        let mut row_sum = T::zero();
                        for x in s.iter_mut() {
                            *x = (*x - m_new).exp();
                            row_sum += *x;
                        }
                        l[i] = l[i] * alpha + row_sum;
                        m[i] = m_new;
                        let ai = &mut acc[i * d..(i + 1) * d];
                        for a in ai.iter_mut() {
                            *a *= alpha;
                        }
                        for (j, &p) in s.iter().enumerate() {
                            axpy(ai, p, &vb[(k0 + j) * d..(k0 + j + 1) * d]);
                        }
                    }
                }
                for i in 0..nq {
                    let inv = l[i].recip();
                    let row = &mut oblk[i * dd..(i + 1) * dd];
                    for (o, &a) in row[..d].iter_mut().zip(&acc[i * d..(i + 1) * d]) {
                        *o = a * inv;
                    }
                    row[d] = m[i] + l[i].ln();
                }
            });
    });
    out
}

/// Backward over `[BH, T, d]` inputs with the saved `o` (`[BH, T, d+1]`, output ‖ lse) and its
/// gradient `g` (same layout). Returns `[3, BH, T, d]` = (dq, dk, dv).
///
/// Per (batch·head), for each key block and each query row: `P = exp(s − lse)`,
/// `dV += Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP − D)` with `D_i = rowsum(dO ∘ O)_i − g_lse_i`,
/// `dQ += scale · dS K`, `dK += scale · dSᵀ Q`. Parallel over batch·head, which is large in
/// the model (batch × bands × heads), and over key blocks when it is not.
#[allow(clippy::too_many_arguments)]
fn flash_bwd_cpu<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    g: &[T],
    t: usize,
    d: usize,
    scale: T,
) -> Vec<T> {
    let dd = d + 1;
    let n = q.len();
    let bh = n / (t * d);
    let mut out = vec![T::zero(); 3 * n];
    let (dq_all, rest) = out.split_at_mut(n);
    let (dk_all, dv_all) = rest.split_at_mut(n);
    dq_all
        .par_chunks_mut(t * d)
        .zip(dk_all.par_chunks_mut(t * d))
        .zip(dv_all.par_chunks_mut(t * d))
        .enumerate()
        .for_each(|(b, ((dq, dk), dv))| {
            let rows = Rows {
                q: &q[b * t * d..(b + 1) * t * d],
                k: &k[b * t * d..(b + 1) * t * d],
                v: &v[b * t * d..(b + 1) * t * d],
                o: &o[b * t * dd..(b + 1) * t * dd],
                g: &g[b * t * dd..(b + 1) * t * dd],
                delta: &[],
                t,
                d,
                scale,
            };
            rows.backward(bh, dq, dk, dv);
        });
    out
}

/// [`flash_bwd_cpu`] writing (dq, dk, dv) over the packed `qkv` (`[q | k | v]`) it reads: each
/// batch·head row copies its own q, k, v before overwriting them (rows are independent), so
/// the only extra memory is one row's copy per worker.
fn flash_bwd_cpu_in_place<T: Real>(qkv: &mut [T], o: &[T], g: &[T], t: usize, d: usize, scale: T) {
    let dd = d + 1;
    let n = qkv.len() / 3;
    let bh = n / (t * d);
    let (q_all, rest) = qkv.split_at_mut(n);
    let (k_all, v_all) = rest.split_at_mut(n);
    q_all
        .par_chunks_mut(t * d)
        .zip(k_all.par_chunks_mut(t * d))
        .zip(v_all.par_chunks_mut(t * d))
        .enumerate()
        .for_each(|(b, ((q, k), v))| {
            let copy: Vec<T> = q.iter().chain(k.iter()).chain(v.iter()).copied().collect();
            let (qb, rest) = copy.split_at(t * d);
            let (kb, vb) = rest.split_at(t * d);
            for x in q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()) {
                *x = T::zero();
            }
            let rows = Rows {
                q: qb,
                k: kb,
                v: vb,
                o: &o[b * t * dd..(b + 1) * t * dd],
                g: &g[b * t * dd..(b + 1) * t * dd],
                delta: &[],
                t,
                d,
                scale,
            };
            rows.backward(bh, q, k, v);
        });
}

/// One batch·head row of the backward: inputs `[T, d]`, saved output and its gradient
/// `[T, d+1]` (lse / lse gradient in the last column), and `D_i`.
#[derive(Clone, Copy)]
struct Rows<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    o: &'a [T],
    g: &'a [T],
    delta: &'a [T],
    t: usize,
    d: usize,
    scale: T,
}

impl<T: Real> Rows<'_, T> {
    /// The row's whole backward into zeroed `dq`, `dk`, `dv` (`bh` rows in all).
    fn backward(&self, bh: usize, dq: &mut [T], dk: &mut [T], dv: &mut [T]) {
        let (t, d, dd) = (self.t, self.d, self.d + 1);
        let delta: Vec<T> = (0..t)
            .map(|i| {
                let (orow, grow) = (&self.o[i * dd..(i + 1) * dd], &self.g[i * dd..(i + 1) * dd]);
                let dot = orow[..d]
                    .iter()
                    .zip(&grow[..d])
                    .fold(T::zero(), |a, (&x, &y)| a + x * y);
                dot - grow[d]
            })
            .collect();
        let rows = Rows {
            delta: &delta,
            ..*self
        };
        // Few batch·head rows (short batches, tests): split the key blocks of each row
        // over several workers too, each with a private dq partial summed at the end.
        let blocks = t.div_ceil(BLOCK_K);
        let groups = rayon::current_num_threads().div_ceil(bh).clamp(1, blocks);
        let keys_per_group = blocks.div_ceil(groups) * BLOCK_K;
        if groups == 1 {
            rows.key_range(0, dk, dv, dq);
            return;
        }
        let partials: Vec<Vec<T>> = dk
            .par_chunks_mut(keys_per_group * d)
            .zip(dv.par_chunks_mut(keys_per_group * d))
            .enumerate()
            .map(|(gi, (dk_g, dv_g))| {
                let mut dq_part = vec![T::zero(); t * d];
                rows.key_range(gi * keys_per_group, dk_g, dv_g, &mut dq_part);
                dq_part
            })
            .collect();
        for part in partials {
            for (a, b) in dq.iter_mut().zip(part) {
                *a += b;
            }
        }
    }

    /// Gradients from the keys `k_start .. k_start + dk.len()/d`: writes their `dk`, `dv`
    /// (slices of that range) and accumulates into `dq` (`[T, d]`).
    fn key_range(&self, k_start: usize, dk: &mut [T], dv: &mut [T], dq: &mut [T]) {
        let (t, d, dd, scale) = (self.t, self.d, self.d + 1, self.scale);
        let n_keys = dk.len() / d;
        let mut kt = vec![T::zero(); d * BLOCK_K];
        let mut vt = vec![T::zero(); d * BLOCK_K];
        let mut p = [T::zero(); BLOCK_K];
        let mut dp = [T::zero(); BLOCK_K];
        for b0 in (0..n_keys).step_by(BLOCK_K) {
            let nk = BLOCK_K.min(n_keys - b0);
            let k0 = k_start + b0;
            transpose_block(self.k, k0, nk, d, &mut kt[..d * nk]);
            transpose_block(self.v, k0, nk, d, &mut vt[..d * nk]);
            let dk_blk = &mut dk[b0 * d..(b0 + nk) * d];
            let dv_blk = &mut dv[b0 * d..(b0 + nk) * d];
            let (p, dp) = (&mut p[..nk], &mut dp[..nk]);
            for i in 0..t {
                let qi = &self.q[i * d..(i + 1) * d];
                let gi = &self.g[i * dd..i * dd + d];
                let lse = self.o[i * dd + d];
                row_scores(qi, &kt, nk, scale, p);
                for x in p.iter_mut() {
                    *x = (*x - lse).exp();
                }
                row_scores(gi, &vt, nk, T::one(), dp);
                let dqi = &mut dq[i * d..(i + 1) * d];
                for j in 0..nk {
                    axpy(&mut dv_blk[j * d..(j + 1) * d], p[j], gi);
                    let ds = p[j] * (dp[j] - self.delta[i]) * scale;
                    axpy(dqi, ds, &self.k[(k0 + j) * d..(k0 + j + 1) * d]);
                    axpy(&mut dk_blk[j * d..(j + 1) * d], ds, qi);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::softmax::logsumexp_last_dim;
    use candle_core::{Device, Var};

    /// The lse column is exact and its gradient (unused by the public wrapper) is handled.
    #[test]
    fn ops_attention_lse_column_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, t, d) = (1, 2, 70, 8);
        let scale = 0.3;
        let q = Var::from_tensor(&Tensor::randn(0f64, 1., (b, h, t, d), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f64, 1., (b, h, t, d), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f64, 1., (b, h, t, d), &dev)?)?;
        let r = Tensor::randn(0f64, 1., (b, h, t, d + 1), &dev)?;

        let aug = q.apply_op3(&k, &v, FlashAttn { scale })?;
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let reference = Tensor::cat(
            &[
                &softmax_last_dim(&scores)?.matmul(&v)?,
                &logsumexp_last_dim(&scores)?,
            ],
            3,
        )?;
        let diff = (&aug - &reference)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "forward differs by {diff}");

        let ga = (&aug * &r)?.sum_all()?.backward()?;
        let gr = (&reference * &r)?.sum_all()?.backward()?;
        for x in [&q, &k, &v] {
            let (a, e) = (ga.get(x).expect("grad"), gr.get(x).expect("grad"));
            let diff = (a - e)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "gradient differs by {diff}");
        }
        Ok(())
    }
}
