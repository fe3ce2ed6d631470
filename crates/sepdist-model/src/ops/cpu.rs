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
