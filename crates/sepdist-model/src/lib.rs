//! The BS-RoFormer separator of MODEL.md in candle, with differentiable custom ops.

pub mod ops;
