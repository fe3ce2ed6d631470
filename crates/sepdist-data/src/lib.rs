//! sepdist data pipeline: MUSDB18-HQ WAV reading, MUSDB18 `.stem.mp4` decoding (through a WAV
//! cache), a synthetic MUSDB-shaped dataset, a
//! deterministic sampler with augmentation, whole-track evaluation chunks, a background loader
//! and a dataset checker.
//!
//! Audio leaves this crate as flat `f32` buffers in row-major order: a mixture is `[2, N]`
//! (left channel then right channel), stems are `[S, 2, N]` in the order of `dataset.sources`.
//! Batches add a leading batch dimension. They are ready to become tensors without copies.
//!
//! Determinism: a training example is a pure function of `(seed, epoch, global index)` (see
//! [`sampler`]), so any split of a global batch over ranks and micro-steps sees the same audio,
//! and resuming needs only the step counter.

pub mod check;
pub mod decode;
pub mod error;
pub mod eval;
pub mod loader;
mod mp4;
pub mod musdb;
mod rng;
pub mod sampler;
pub mod stem;
pub mod synth;
pub mod wav;

pub use check::{Problem, ProblemKind, check_dataset};
pub use error::{DataError, Result};
pub use eval::{Chunk, ChunkIter};
pub use loader::Loader;
pub use musdb::{Musdb, Track};
pub use sampler::{Batch, Example, Sampler, Schedule};
pub use stem::{ConvertReport, convert_dataset};
pub use synth::{Summary, generate};
pub use wav::{SampleFormat, Stereo, WavInfo};
