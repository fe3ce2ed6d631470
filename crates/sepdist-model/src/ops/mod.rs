//! Custom ops with a backward: STFT/iSTFT, memory-lean attention, RMSNorm, softmax, RoPE, and
//! the transformer's fused projections.
//!
//! candle's fused softmax / rms_norm / layer_norm / sdpa have no backward and candle has no
//! FFT, so the model uses these instead. Ops with their own kernels are candle `CustomOp`s
//! with a CPU forward (f32 and f64) and a `bwd`; the attention also has CUDA kernels (f32 and
//! bf16, `attention.cu`, compiled at run time with NVRTC). The others are compositions of
//! differentiable candle ops on CUDA.
//!
//! The fused ops (RMSNorm, QKV projection with RoPE, attention output projection with the
//! residual, the feed-forward's linear layers, the mask estimators' per-band linear layers and
//! GLU, the iSTFT of a masked spectrogram, the loss' multi-resolution STFT L1) exist for
//! memory: candle keeps every op's inputs for the backward, so a composition keeps each
//! intermediate; a fused op keeps only its inputs and output. Each has a `*_composed` twin of candle ops: the reference of its
//! tests and the path on devices and dtypes without a kernel (bf16 on the CPU too).
//!
//! bf16 (mixed precision) follows PyTorch's autocast: matmuls and elementwise ops run in bf16,
//! while RMSNorm, softmax and log-sum-exp, the STFTs and the loss' STFT L1 compute in f32 and
//! cast their result back (candle's CPU sums accumulate in the tensor's dtype, so the composed
//! linear layers' bias gradients are summed in f32 too). f32 and f64 take exactly the paths
//! they took before.

pub mod attention;
#[cfg(feature = "cuda")]
mod attention_cuda;
pub mod attn_proj;
pub(crate) mod bias;
pub(crate) mod cpu;
pub mod ffn;
pub mod glu;
pub mod grouped_linear;
pub mod norm;
pub mod rope;
pub mod softmax;
pub mod stft;
#[cfg(feature = "cuda")]
mod stft_cuda;
pub mod stft_dft;
pub mod stft_l1;

pub use attention::{flash_attention, flash_attention_packed, reference_attention};
pub use attn_proj::{SeqLayout, out_proj_residual, qkv_rope};
pub use cpu::with_composed_ops;
pub use ffn::{gelu_linear_bias, linear_bias};
pub use glu::glu_tanh;
pub use grouped_linear::grouped_linear;
pub use norm::{rms_norm, rms_norm_groups};
pub use rope::Rope;
pub use softmax::{logsumexp_last_dim, softmax_last_dim};
pub use stft::Stft;
pub use stft_l1::multi_stft_l1;
