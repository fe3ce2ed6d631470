//! Differentiable, numerically stable softmax over the last dimension.
//!
//! candle-nn's fused `softmax_last_dim` has no backward; this one is a composition of basic
//! candle ops, so gradients flow on every device. A 16-bit input is computed in f32 and the
//! result cast back (autocast's rule for softmax: the sum of exponentials would accumulate in
//! bf16 on the CPU).

use candle_core::{D, Result, Tensor};

use super::cpu::in_f32;

/// `softmax(x)` over the last dimension, differentiable.
///
/// The row maximum is subtracted first for stability; it is detached because softmax is
/// invariant to a per-row shift, so its gradient contribution is exactly zero.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    in_f32(x, |x| {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        e.broadcast_div(&sum)
    })
}

/// `log(sum(exp(x)))` over the last dimension (kept as a size-1 dim), differentiable and stable.
pub fn logsumexp_last_dim(x: &Tensor) -> Result<Tensor> {
    in_f32(x, |x| {
        let max = x.max_keepdim(D::Minus1)?.detach();
        x.broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            .add(&max)
    })
}
