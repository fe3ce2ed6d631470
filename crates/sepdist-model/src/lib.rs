//! The BS-RoFormer separator of MODEL.md in candle, with differentiable custom ops.
//!
//! - [`Separator`]: the model as a chain of pure [`Block`]s (`band_split`, `n_layers` ×
//!   (`time`, `band`), `head`), each `forward(params, x, ctx)`; parameters are described by
//!   [`ParamSpec`]s (module-path names, name-sorted) and created by a seeded initialiser.
//! - [`loss::SeparationLoss`]: waveform L1 + weighted multi-resolution STFT L1.
//! - [`param_count`], [`flops_per_sample`], [`qkv_flops_per_sample`]: closed forms of the
//!   configuration.
//! - [`ops`]: STFT/iSTFT, FlashAttention, RMSNorm, softmax, RoPE with a backward.

pub mod bands;
pub mod error;
pub mod flops;
pub mod loss;
pub mod metrics;
pub mod ops;
pub mod params;
pub mod separator;

pub use bands::{BandGroup, BandLayout};
pub use error::{ModelError, Result};
pub use flops::{flops_per_sample, param_count, qkv_flops_per_sample};
pub use params::{Init, ParamSpec};
pub use separator::{
    AttentionKind, Block, BlockKind, Dims, ForwardContext, HeadSaved, RMS_EPS, ROPE_BASE,
    SavedForward, Separator, apply_mask_istft,
};
