//! Shared helpers for the CPU kernels of the custom ops.

use candle_core::{CpuStorage, DType, Error, Layout, Result, WithDType};
use realfft::FftNum;
use realfft::num_traits::Float;

/// Element types the CPU kernels are written for: f32 (training) and f64 (finite-difference
/// tests). Both are `FftNum` so the STFT kernels can use realfft directly.
pub(crate) trait Real: FftNum + Float + WithDType {}
impl Real for f32 {}
impl Real for f64 {}

/// The contiguous slice of `storage` described by `layout`.
///
/// The public wrappers call `.contiguous()` before applying an op, so a strided layout here is
/// an internal error rather than a user error.
pub(crate) fn contiguous_slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg(format!("{op}: expected a contiguous input")))?;
    let data = storage.as_slice::<T>()?;
    data.get(start..end)
        .ok_or_else(|| Error::Msg(format!("{op}: layout out of the storage bounds")))
}

/// The contiguous part of `data` (an in-place op's destination) described by `layout`.
pub(crate) fn contiguous_slice_mut<'a, T>(
    data: &'a mut [T],
    layout: &Layout,
    op: &str,
) -> Result<&'a mut [T]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg(format!("{op}: expected a contiguous input")))?;
    data.get_mut(start..end)
        .ok_or_else(|| Error::Msg(format!("{op}: layout out of the storage bounds")))
}

/// The error returned for dtypes that have no CPU kernel.
pub(crate) fn unsupported_dtype(op: &str, dtype: DType) -> Error {
    Error::Msg(format!(
        "{op}: unsupported dtype {dtype:?} on CPU (f32 and f64 are supported)"
    ))
}

/// Converts an f64 constant into the kernel's element type.
pub(crate) fn cast<T: Real>(x: f64) -> T {
    <T as WithDType>::from_f64(x)
}

/// `lhs · rhs` (or `lhs · rhsᵀ` when `rhs_transposed`) of row-major matrices through candle's
/// CPU matmul (gemm, multi-threaded), for the fused ops' forward kernels: `lhs` is `[m, k]`
/// at `lhs_offset` of its storage, `rhs` is `[k, n]` (or `[n, k]`, transposed) at
/// `rhs_offset`. Returns the `[m, n]` product.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_cpu(
    lhs: &CpuStorage,
    lhs_offset: usize,
    rhs: &CpuStorage,
    rhs_offset: usize,
    rhs_transposed: bool,
    m: usize,
    n: usize,
    k: usize,
) -> Result<CpuStorage> {
    use candle_core::backend::BackendStorage;
    let lhs_l = Layout::contiguous_with_offset((m, k), lhs_offset);
    let rhs_l = if rhs_transposed {
        Layout::contiguous_with_offset((n, k), rhs_offset).transpose(0, 1)?
    } else {
        Layout::contiguous_with_offset((k, n), rhs_offset)
    };
    lhs.matmul(rhs, (1, m, n, k), &lhs_l, &rhs_l)
}

/// The start offset of a contiguous `layout` (the wrappers make every input contiguous).
pub(crate) fn contiguous_offset(layout: &Layout, op: &str) -> Result<usize> {
    layout
        .contiguous_offsets()
        .map(|(start, _)| start)
        .ok_or_else(|| Error::Msg(format!("{op}: expected a contiguous input")))
}

/// Runs `f` on the contiguous CPU data of `t` (a tensor a backward or an op struct holds).
pub(crate) fn with_slice<T: WithDType, R>(
    t: &candle_core::Tensor,
    op: &str,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Msg(format!("{op}: expected a tensor on the CPU")));
    };
    f(contiguous_slice::<T>(cpu, layout, op)?)
}

/// Runs `f` on the contiguous CPU data of `t` as f32 or f64 and wraps the result in a tensor
/// of `shape` (same dtype), on the CPU.
pub(crate) fn map_tensor<S: Into<candle_core::Shape>>(
    t: &candle_core::Tensor,
    shape: S,
    op: &str,
    f32s: impl FnOnce(&[f32]) -> Result<Vec<f32>>,
    f64s: impl FnOnce(&[f64]) -> Result<Vec<f64>>,
) -> Result<candle_core::Tensor> {
    let dev = candle_core::Device::Cpu;
    match t.dtype() {
        DType::F32 => candle_core::Tensor::from_vec(with_slice(t, op, f32s)?, shape, &dev),
        DType::F64 => candle_core::Tensor::from_vec(with_slice(t, op, f64s)?, shape, &dev),
        dt => Err(unsupported_dtype(op, dt)),
    }
}

thread_local! {
    /// Whether this thread's fused ops use their CPU kernels ([`with_composed_ops`]).
    static FUSED_KERNELS: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Runs `f` with the fused ops' CPU kernels off on this thread: every fused op other than the
/// attention and the STFT family takes its composed twin, the blocks' hand-written backwards
/// their composed backward, and the STFT family its DFT matmuls, as on a GPU (which has the
/// attention's kernels and the DFT path's framing kernels). For tests and A/B measurements of
/// the GPU's path on a CPU; the results are the same up to rounding.
pub fn with_composed_ops<R>(f: impl FnOnce() -> R) -> R {
    let before = FUSED_KERNELS.with(|k| k.replace(false));
    let out = f();
    FUSED_KERNELS.with(|k| k.set(before));
    out
}

/// Whether the fused ops' CPU kernels are on for this thread (see [`with_composed_ops`]).
pub(crate) fn fused_kernels_on() -> bool {
    FUSED_KERNELS.with(|k| k.get())
}

/// Whether the CPU kernels of the fused ops take `ts`: all on the CPU, in f32 or f64, of one
/// dtype, with the kernels on. Anything else (another device, bf16, mixed dtypes) takes the
/// op's composed twin.
pub(crate) fn kernel_takes(ts: &[&candle_core::Tensor]) -> bool {
    fused_kernels_on() && stft_kernel_takes(ts) && ts.iter().all(|t| t.device().is_cpu())
}

/// Whether the STFT family's kernels take `ts`: f32 or f64, one dtype (on the CPU its FFT
/// kernels, elsewhere and under [`with_composed_ops`] its DFT matmuls; 16-bit inputs are
/// transformed in f32).
pub(crate) fn stft_kernel_takes(ts: &[&candle_core::Tensor]) -> bool {
    let Some(first) = ts.first() else {
        return false;
    };
    matches!(first.dtype(), DType::F32 | DType::F64)
        && ts.iter().all(|t| t.dtype() == first.dtype())
}

/// Whether `dtype` is a 16-bit float: its composed ops run their reductions in f32, as
/// PyTorch's autocast does (candle's CPU sums accumulate in the tensor's dtype).
pub(crate) fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// `f` of `x` computed in f32 when `x` is a 16-bit float (the result cast back to its dtype,
/// differentiably), else `f(x)` as it is: bitwise the same for f32 and f64.
pub(crate) fn in_f32(
    x: &candle_core::Tensor,
    f: impl FnOnce(&candle_core::Tensor) -> Result<candle_core::Tensor>,
) -> Result<candle_core::Tensor> {
    if !is_half(x.dtype()) {
        return f(x);
    }
    f(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
}
