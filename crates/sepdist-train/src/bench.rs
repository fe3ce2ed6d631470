//! `sepdist bench`: the training step of a config, timed phase by phase on real data —
//! median step time, samples/s, a breakdown (data, forward, backward, gradient sync,
//! optimizer), peak heap and resident memory (and on a GPU the memory pool's peaks), and model
//! FLOPs against the time taken. It runs on `training.device` (`--device`).
//!
//! It runs what `train` runs per optimizer step (the block-wise engine on the loader's
//! batches, one all-reduce of the flat gradient when there are several ranks, clipping and
//! AdamW on the flat buffer) without validation, checkpoints or logging, so the figures are
//! those of the step itself. Forward and backward are split at the engine's
//! [`EngineEvent::BackwardStart`]; the head's forwards of every source but the first (the head
//! runs one source at a time) and, with activation checkpointing, the recomputed forwards count
//! as backward.
//!
//! With `profile`, the device is synchronized at every block boundary and the forward and
//! backward time is split by block kind ([`ProfileRow`]): where a GPU step goes (kernels run
//! asynchronously, so without the synchronization the host's clock would charge a block's work
//! to whichever later block waits for it). The synchronization costs a little; the other
//! figures of a profiled run include it.

use crate::engine::{Engine, EngineEvent, batch_tensors};
use crate::memory::{HeapCounter, rss};
use crate::optim::{AdamW, AdamWHyper, clip_scale, sum_of_squares};
use crate::trainer::TrainError;
use candle_core::DType;
use sepdist_comm::Communicator;
use sepdist_config::Config;
use sepdist_data::{Loader, Sampler, Schedule};
use sepdist_model::Separator;
use sepdist_model::loss::SeparationLoss;
use sepdist_model::separator::BlockKind;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// Phases of the breakdown, in report order.
pub const PHASES: [&str; 5] = ["data", "forward", "backward", "gradient sync", "optimizer"];

/// What was measured, identical on every rank except the memory figures (this rank's).
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    pub world_size: usize,
    pub threads: usize,
    pub parameters: usize,
    /// Examples per optimizer step over all ranks.
    pub global_batch: usize,
    /// Wall time of every timed step (after the warm-up), seconds.
    pub step_seconds: Vec<f64>,
    /// Median seconds per step of each of [`PHASES`].
    pub phase_seconds: [f64; 5],
    pub peak_heap: usize,
    pub peak_rss: usize,
    /// `cpu` or `cuda:N` (`training.device`).
    pub device: String,
    /// `training.precision`: `fp32` or `bf16` (mixed precision).
    pub precision: &'static str,
    /// On a GPU: the memory pool's used and reserved high-water marks over the timed steps
    /// and the warm-up (the model's tensors included), bytes.
    pub peak_device: Option<(usize, usize)>,
    /// Forward FLOPs of one example (closed form, `sepdist_model::flops`).
    pub forward_flops_per_sample: f64,
    /// With `profile`: the forward and backward seconds of each block kind, mean per timed step.
    pub profile: Option<Vec<ProfileRow>>,
}

/// One block kind's share of the profiled steps.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileRow {
    /// `band split`, `time transformer`, `band transformer` or `head`.
    pub kind: &'static str,
    /// Blocks of this kind.
    pub blocks: usize,
    /// Mean seconds per timed step in their forwards (the head: source 0's forward and loss).
    pub forward: f64,
    /// Mean seconds per timed step in their backwards, recomputed forwards included (the head:
    /// the other sources' forwards too).
    pub backward: f64,
}

fn kind_label(kind: BlockKind) -> &'static str {
    match kind {
        BlockKind::BandSplit => "band split",
        BlockKind::Time { .. } => "time transformer",
        BlockKind::Band { .. } => "band transformer",
        BlockKind::Head => "head",
    }
}

/// Per-block seconds summed into one row per kind, in the order kinds first appear.
fn rows_by_kind(
    kinds: &[&'static str],
    forward: &[f64],
    backward: &[f64],
    steps: usize,
) -> Vec<ProfileRow> {
    let mut rows: Vec<ProfileRow> = Vec::new();
    for (i, &kind) in kinds.iter().enumerate() {
        let row = match rows.iter().position(|r| r.kind == kind) {
            Some(r) => &mut rows[r],
            None => {
                rows.push(ProfileRow {
                    kind,
                    blocks: 0,
                    forward: 0.0,
                    backward: 0.0,
                });
                rows.last_mut().expect("just pushed")
            }
        };
        row.blocks += 1;
        row.forward += forward[i] / steps as f64;
        row.backward += backward[i] / steps as f64;
    }
    rows
}

/// What the engine's probe records: the backward's start (the phase split) and, per block, the
/// seconds between consecutive block boundaries.
struct Timeline {
    last: Instant,
    backward_start: Option<Instant>,
    forward: Vec<f64>,
    backward: Vec<f64>,
}

impl Timeline {
    fn record(&mut self, event: EngineEvent, now: Instant) {
        let since = now.duration_since(self.last).as_secs_f64();
        match event {
            EngineEvent::ForwardStart => {}
            EngineEvent::BackwardStart => self.backward_start = Some(now),
            EngineEvent::BlockForward(i) => self.forward[i] += since,
            EngineEvent::BlockBackward(i) => self.backward[i] += since,
        }
        self.last = now;
    }
}

impl BenchReport {
    pub fn median_step(&self) -> f64 {
        median(&self.step_seconds)
    }

    pub fn samples_per_second(&self) -> f64 {
        self.global_batch as f64 / self.median_step()
    }

    /// Training FLOPs (forward + backward ≈ 3 × forward; 4 × with recompute) per second.
    pub fn achieved_flops(&self, recompute: bool) -> f64 {
        let factor = if recompute { 4.0 } else { 3.0 };
        factor * self.forward_flops_per_sample * self.samples_per_second()
    }
}

fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Times `warmup + steps` optimizer steps of `config` with the ranks of `comm`; the first
/// `warmup` are not reported (allocator and cache warm-up). `profile` adds the split by block
/// kind (the device synchronized at every block boundary).
pub fn bench(
    config: &Config,
    steps: usize,
    warmup: usize,
    profile: bool,
    heap: &'static dyn HeapCounter,
    comm: &dyn Communicator,
) -> Result<BenchReport, TrainError> {
    let cfg = config;
    let t = &cfg.training;
    if cfg.distributed.zero_stage != 0 {
        return Err(TrainError::Setup(format!(
            "distributed.zero_stage: {}: sepdist bench times the replicated step (ZeRO 0, one all-reduce of the gradient); set distributed.zero_stage=0, or compare stages with `sepdist train` (metrics.jsonl)",
            cfg.distributed.zero_stage
        )));
    }
    if steps == 0 {
        return Err(TrainError::Setup("--steps must be at least 1".into()));
    }
    let device = crate::device::open(t, comm)?;
    let gpu_memory = crate::device::memory_counter(&device);
    let (rank, world) = (comm.rank(), comm.world_size());
    let data = crate::trainer::open_dataset(cfg, comm)?;
    let sampler = Arc::new(Sampler::from_config(&data, cfg)?);
    let schedule = Schedule::from_config(cfg, world)?;
    let total = (warmup + steps) as u64;
    let mut loader = Loader::new(
        sampler,
        schedule,
        rank,
        0,
        Some(total),
        cfg.dataset.num_workers,
        cfg.dataset.prefetch,
    )?;
    let separator = Separator::with_sources(&cfg.model, &cfg.dataset.sources)?;
    let init = separator.init_params(t.seed, &device, DType::F32)?;
    let loss = SeparationLoss::for_sources(&t.loss, &cfg.dataset.sources)?;
    let mut engine = Engine::new(separator, loss, &init, t.gradient_checkpointing, device)?;
    drop(init);
    let kinds: Vec<&'static str> = engine
        .separator()
        .blocks()
        .iter()
        .map(|b| kind_label(b.kind()))
        .collect();
    // The engine reports when the backward starts (the forward/backward split) and when each
    // block is done.
    let timeline = Arc::new(Mutex::new(Timeline {
        last: Instant::now(),
        backward_start: None,
        forward: vec![0.0; kinds.len()],
        backward: vec![0.0; kinds.len()],
    }));
    let probe_timeline = Arc::clone(&timeline);
    let probe_device = engine.device().clone();
    engine.set_probe(Some(Arc::new(move |event| {
        if profile {
            // An error here is the device's and surfaces at the engine's next operation.
            let _ = probe_device.synchronize();
        }
        probe_timeline
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(event, Instant::now());
    })));
    let mut flat = engine.flat_params()?;
    engine.set_compute_dtype(crate::trainer::compute_dtype(t.precision))?;
    let n = flat.len();
    let mut grads = vec![0.0f32; n];
    let mut adam = AdamW::new(AdamWHyper::from(&t.optimizer), n);
    let accumulation = t.gradient_accumulation_steps;
    let mut step_seconds = Vec::with_capacity(steps);
    let mut phases: Vec<[f64; 5]> = Vec::with_capacity(steps);
    heap.reset_peak();
    if let Some(gpu) = &gpu_memory {
        gpu.reset_peak();
    }
    for step in 0..warmup + steps {
        if step == warmup {
            let mut tl = timeline.lock().unwrap_or_else(PoisonError::into_inner);
            tl.forward.fill(0.0);
            tl.backward.fill(0.0);
        }
        let started = Instant::now();
        let mut times = [0.0f64; 5];
        grads.fill(0.0);
        for _ in 0..accumulation {
            let t0 = Instant::now();
            let batch = loader.next().ok_or_else(|| {
                TrainError::Setup(format!("the data loader ended before step {step}"))
            })??;
            let (mixture, stems) = batch_tensors(&batch, engine.device())?;
            times[0] += t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            engine.forward_backward_with(&mixture, &stems, &mut grads, |_, _| {
                Ok::<(), TrainError>(())
            })?;
            let split = timeline
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .backward_start
                .take()
                .unwrap_or(t1);
            times[1] += split.duration_since(t1).as_secs_f64();
            times[2] += split.elapsed().as_secs_f64();
        }
        let t3 = Instant::now();
        if world > 1 {
            comm.all_reduce_sum(&mut grads)?;
        }
        times[3] = t3.elapsed().as_secs_f64();
        let t4 = Instant::now();
        let scale = 1.0 / (accumulation * world) as f32;
        grads.iter_mut().for_each(|g| *g *= scale);
        let clip = clip_scale(sum_of_squares(&grads).sqrt(), t.grad_clip) as f32;
        if clip < 1.0 {
            grads.iter_mut().for_each(|g| *g *= clip);
        }
        adam.update(&mut flat, &grads, t.optimizer.lr);
        engine.load_flat(&flat)?;
        times[4] = t4.elapsed().as_secs_f64();
        let elapsed = started.elapsed().as_secs_f64();
        if step >= warmup {
            step_seconds.push(elapsed);
            phases.push(times);
        }
    }
    let phase_seconds =
        std::array::from_fn(|p| median(&phases.iter().map(|times| times[p]).collect::<Vec<_>>()));
    let profile = profile.then(|| {
        let tl = timeline.lock().unwrap_or_else(PoisonError::into_inner);
        rows_by_kind(&kinds, &tl.forward, &tl.backward, steps)
    });
    Ok(BenchReport {
        world_size: world,
        threads: rayon::current_num_threads(),
        parameters: n,
        global_batch: schedule.global_batch() as usize,
        step_seconds,
        phase_seconds,
        peak_heap: heap.peak(),
        peak_rss: rss().1,
        device: crate::device::label(engine.device()),
        precision: crate::plan::precision_name(t.precision),
        peak_device: gpu_memory.map(|g| (g.peak(), g.reserved().1)),
        forward_flops_per_sample: sepdist_model::flops::flops_per_sample(
            &cfg.model,
            cfg.dataset.sources.len(),
            cfg.dataset.segment_length,
        ),
        profile,
    })
}

#[cfg(test)]
mod tests {
    use super::{ProfileRow, median, rows_by_kind};

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn profile_rows_sum_each_kind_per_step_in_order_of_appearance() {
        let kinds = [
            "band split",
            "time transformer",
            "band transformer",
            "time transformer",
            "band transformer",
            "head",
        ];
        let forward = [1.0, 2.0, 4.0, 6.0, 8.0, 10.0];
        let backward = [0.5, 1.0, 2.0, 3.0, 4.0, 5.0];
        let rows = rows_by_kind(&kinds, &forward, &backward, 2);
        let row = |kind, blocks, forward, backward| ProfileRow {
            kind,
            blocks,
            forward,
            backward,
        };
        assert_eq!(
            rows,
            vec![
                row("band split", 1, 0.5, 0.25),
                row("time transformer", 2, 4.0, 2.0),
                row("band transformer", 2, 6.0, 3.0),
                row("head", 1, 5.0, 2.5),
            ]
        );
    }
}
