//! The sepdist training engine. This increment holds the parts that are pure functions of
//! flat buffers: AdamW, global-norm clipping, the learning-rate schedule, and the
//! checkpoint directory format.

pub mod bench;
pub mod buckets;
pub mod checkpoint;
pub mod device;
pub mod engine;
pub mod evaluate;
pub mod export;
pub mod infer;
pub mod memory;
pub mod oom;
pub mod optim;
pub mod plan;
pub mod plot;
pub mod progress;
pub mod schedule;
pub mod tensorboard;
pub mod trainer;
pub mod zero3;

pub use optim::{AdamW, AdamWHyper, clip_scale, sum_of_squares};
pub use schedule::LrSchedule;
pub use trainer::{Outcome, TestHooks, TrainError, TrainRequest, train};
