//! Differentiable, numerically stable softmax over the last dimension.
//!
//! candle-nn's fused `softmax_last_dim` has no backward; this one is a composition of basic
//! candle ops, so gradients flow on every device.

use candle_core::{D, Result, Tensor};

/// `softmax(x)` over the last dimension, differentiable.
///
/// The row maximum is subtracted first for stability; it is detached because softmax is
/// invariant to a per-row shift, so its gradient contribution is exactly zero.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// `log(sum(exp(x)))` over the last dimension (kept as a size-1 dim), differentiable and stable.
pub fn logsumexp_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    x.broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .add(&max)
}
