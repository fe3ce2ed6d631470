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
/// `warmup` are not reported (allocator and cache warm-up).
pub fn bench(
    config: &Config,
    steps: usize,
    warmup: usize,
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
    // The engine reports when the backward starts: the forward/backward split.
    let backward_start: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let mark = Arc::clone(&backward_start);
    engine.set_probe(Some(Arc::new(move |event| {
        if event == EngineEvent::BackwardStart {
            *mark.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        }
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
            let split = backward_start
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
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
    })
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
