//! Custom ops with a backward: STFT/iSTFT, memory-lean attention, RMSNorm, softmax, RoPE.
//!
//! candle's fused softmax / rms_norm / layer_norm / sdpa have no backward and candle has no
//! FFT, so the model uses these instead. Ops with their own kernels are candle `CustomOp`s
//! with a CPU forward (f32 and f64) and a `bwd`; a `cuda_fwd` can be added to the same op
//! structs later. The others are compositions of differentiable candle ops.

pub mod attention;
mod cpu;
pub mod norm;
pub mod rope;
pub mod softmax;
pub mod stft;

pub use attention::{flash_attention, reference_attention};
pub use norm::rms_norm;
pub use rope::Rope;
pub use softmax::{logsumexp_last_dim, softmax_last_dim};
pub use stft::Stft;
