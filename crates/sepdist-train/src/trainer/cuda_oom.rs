//! A CUDA out-of-memory error inside a training step, caught where the op returned it: the
//! failing rank records it ([`CudaFailure`]) and finishes the step without computing, taking
//! part in the collectives the other ranks are in (see [`crate::oom`]): the step's scalar
//! all-reduce then carries the flag, as for a step over the memory budget. Also the test hook
//! that makes an op of a chosen step fail ([`FaultHook`]).

use super::TrainError;
use crate::engine::{Engine, Piece, ShardedParams};
use crate::memory::{Location, MemoryMeter, MemorySnapshot, Phase};
use crate::zero3::Zero3Access;
use std::sync::Arc;

/// A point of an optimizer step where [`FaultHook`] may make the op fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPoint {
    /// Optimizer step, 0-based.
    pub step: u64,
    pub rank: usize,
    pub site: FaultSite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultSite {
    /// Before micro-batch `micro` (0-based) is copied to the device.
    Batch { micro: usize },
    /// After block `block`'s backward in micro-batch `micro`, before its gradient is handed on
    /// (a bucket's all-reduce, a ZeRO-3 reduce; the head's once per source under ZeRO-3).
    Backward { micro: usize, block: usize },
    /// At the start of the gradients' reduction phase.
    Communication,
    /// After the update, before the engine's parameters are refreshed from it.
    Optimizer,
}

/// What [`FaultHook`] calls.
pub type FaultFn = dyn Fn(&FaultPoint) -> candle_core::Result<()> + Send + Sync;

/// Fault injection for tests ([`super::TestHooks::fault`]): called at every [`FaultPoint`]; an
/// error it returns is handled as if the op there had returned it.
#[derive(Clone)]
pub struct FaultHook(pub Arc<FaultFn>);

impl std::fmt::Debug for FaultHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FaultHook")
    }
}

/// Calls `hook` (if any) at `site` of `step` on `rank`.
pub(super) fn inject(
    hook: Option<&FaultHook>,
    step: u64,
    rank: usize,
    site: FaultSite,
) -> Result<(), TrainError> {
    match hook {
        Some(h) => Ok((h.0)(&FaultPoint { step, rank, site })?),
        None => Ok(()),
    }
}

/// A CUDA out-of-memory error of this rank's step.
#[derive(Debug, Clone)]
pub(super) struct CudaFailure {
    /// The op's error ([`crate::oom::cuda_out_of_memory`]).
    pub message: String,
    /// Where it failed (the meter's location when the op returned).
    pub at: Location,
    /// The meter's figures when the op returned (its tensors already dropped).
    pub memory: MemorySnapshot,
    /// The failure was the refresh of the engine's parameters after the update of this
    /// optimizer step (0-based): that update is applied on every rank, the failure decides the
    /// next step.
    pub after_update_of: Option<u64>,
}

/// `r`, or the [`CudaFailure`] it is when it is a CUDA out-of-memory error (any other error
/// stays an error). Called where the op returned, so that the meter still says where it was;
/// `fallback` is the phase outside every meter phase.
pub(super) fn caught<T>(
    meter: &MemoryMeter,
    fallback: Phase,
    r: Result<T, TrainError>,
) -> Result<Result<T, CudaFailure>, TrainError> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e) => match e.cuda_out_of_memory() {
            Some(message) => Ok(Err(CudaFailure {
                message,
                at: meter.location().unwrap_or(Location {
                    phase: fallback,
                    block: None,
                    micro: None,
                }),
                memory: meter.snapshot(),
                after_update_of: None,
            })),
            None => Err(e),
        },
    }
}

/// One collective of a ZeRO-3 micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Exchange {
    Gather(Piece),
    Reduce(Piece),
}

/// The collectives of one ZeRO-3 micro-batch in the engine's order
/// ([`Engine::forward_backward_sharded`]): each block before the head gathered for its forward;
/// per source, its piece of the head gathered, then its gradient reduced; then from the last
/// block before the head down to the first, each gathered again when its forward is
/// recomputed (`recompute`), and its gradient reduced.
pub(super) fn zero3_schedule(engine: &Engine, recompute: bool) -> Vec<Exchange> {
    let pieces = engine.pieces();
    let blocks: Vec<Piece> = pieces
        .iter()
        .copied()
        .filter(|p| matches!(p, Piece::Block(_)))
        .collect();
    let mut order: Vec<Exchange> = blocks.iter().map(|&p| Exchange::Gather(p)).collect();
    for &p in pieces.iter().filter(|p| matches!(p, Piece::HeadSource(_))) {
        order.extend([Exchange::Gather(p), Exchange::Reduce(p)]);
    }
    for &p in blocks.iter().rev() {
        if recompute {
            order.push(Exchange::Gather(p));
        }
        order.push(Exchange::Reduce(p));
    }
    order
}

/// ZeRO-3's access for one micro-batch that records the collectives done, and offers the
/// fault hook each block's reduce.
pub(super) struct Recording<'a> {
    pub inner: Zero3Access<'a>,
    pub done: Vec<Exchange>,
    pub fault: Option<&'a FaultHook>,
    pub step: u64,
    pub rank: usize,
    pub micro: usize,
    /// Index of the head block (the block of every `Piece::HeadSource`).
    pub head: usize,
}

impl ShardedParams<TrainError> for Recording<'_> {
    fn gather(&mut self, piece: Piece) -> Result<Vec<f32>, TrainError> {
        let values = ShardedParams::<TrainError>::gather(&mut self.inner, piece)?;
        self.done.push(Exchange::Gather(piece));
        Ok(values)
    }

    fn reduce(&mut self, piece: Piece, grads: Vec<f32>) -> Result<(), TrainError> {
        let block = match piece {
            Piece::Block(i) => i,
            Piece::HeadSource(_) => self.head,
        };
        let site = FaultSite::Backward {
            micro: self.micro,
            block,
        };
        inject(self.fault, self.step, self.rank, site)?;
        ShardedParams::<TrainError>::reduce(&mut self.inner, piece, grads)?;
        self.done.push(Exchange::Reduce(piece));
        Ok(())
    }
}

/// After a CUDA out-of-memory in a ZeRO-3 micro-batch whose collectives so far were `done`
/// (none in a micro-batch skipped after the failure): the rest of `schedule`, gathered values
/// and zero gradients that the discarded step never uses, so that the other ranks' collectives
/// complete. An error when `done` is not how `schedule` starts: the engine's order is not the
/// one assumed, and nothing can be replayed safely.
pub(super) fn finish_zero3(
    access: &mut Zero3Access<'_>,
    engine: &Engine,
    schedule: &[Exchange],
    done: &[Exchange],
) -> Result<(), TrainError> {
    if schedule.get(..done.len()) != Some(done) {
        return Err(TrainError::Setup(format!(
            "after a CUDA out-of-memory error this rank cannot finish the step's ZeRO-3 exchanges: it did {done:?}, which is not how the engine's order {schedule:?} starts"
        )));
    }
    let layout = engine.layout();
    for &x in &schedule[done.len()..] {
        match x {
            Exchange::Gather(p) => {
                ShardedParams::<TrainError>::gather(access, p)?;
            }
            Exchange::Reduce(p) => {
                let len = engine
                    .piece_params(p)
                    .iter()
                    .map(|&i| layout.specs[i].numel())
                    .sum();
                ShardedParams::<TrainError>::reduce(access, p, vec![0.0; len])?;
            }
        }
    }
    Ok(())
}
