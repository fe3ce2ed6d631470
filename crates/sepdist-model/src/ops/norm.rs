//! Differentiable RMSNorm.
//!
//! candle-nn's fused `rms_norm` has no backward; this is a composition of basic candle ops
//! (each with a backward), so it trains on every device.

use candle_core::{D, Error, Result, Tensor};

/// `x / sqrt(mean(x², last dim) + eps) · gamma`, with `gamma` of shape `[D]` where `D` is the
/// last dimension of `x`. Differentiable in `x` and `gamma`.
pub fn rms_norm(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if gamma.dims() != [d] {
        return Err(Error::Msg(format!(
            "rms_norm: gamma has shape {:?}, expected [{d}] (the last dim of x {:?})",
            gamma.dims(),
            x.dims()
        )));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::Msg(format!(
            "rms_norm: eps must be finite and >= 0, got {eps}"
        )));
    }
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_rms = (mean_sq + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)?.broadcast_mul(gamma)
}
