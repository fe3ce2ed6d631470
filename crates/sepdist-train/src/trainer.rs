//! `sepdist train` for one process: data, block-wise engine, accumulation, non-finite guard,
//! clipping, AdamW, schedule, progress, metrics, validation, checkpoints, resume, interrupt.

use crate::checkpoint::{self, CheckpointError, Fingerprint, Meta, OptimizerShard, Staging};
use crate::engine::{Engine, LossValues, batch_tensors};
use crate::memory::{HeapCounter, MemoryMeter, Phase};
use crate::optim::{AdamW, AdamWHyper, clip_scale, sum_of_squares};
use crate::progress::{MetricsWriter, Progress, StepReport};
use crate::schedule::LrSchedule;
use candle_core::{DType, Device, Tensor};
use sepdist_config::{Backend, Config, Precision};
use sepdist_data::{ChunkIter, DataError, Loader, Musdb, Sampler, Schedule};
use sepdist_model::loss::SeparationLoss;
use sepdist_model::{ModelError, Separator};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "step {step}: {consecutive} consecutive optimizer steps had a non-finite loss or \
         gradient (limit training.max_consecutive_skips = {consecutive}); weights are those of \
         the last finite step"
    )]
    NonFinite { step: u64, consecutive: u64 },
    #[error("{0}")]
    Setup(String),
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Model(ModelError::from(e))
    }
}

const SIGTERM: usize = 15;

/// Test hooks, set by the CLI from `SEPDIST_TEST_*` environment variables.
#[derive(Debug, Clone, Default)]
pub struct TestHooks {
    /// Optimizer steps (0-based) whose loss and gradient are replaced by NaN.
    pub nan_at_steps: Vec<u64>,
    /// Behave as if SIGTERM arrived once this many optimizer steps are done.
    pub stop_after_steps: Option<u64>,
}

/// What to train and how.
pub struct TrainRequest {
    pub config: Config,
    /// `auto`, `latest` (in `output_dir/checkpoints`) or a checkpoint directory.
    pub resume: Option<String>,
    /// A checkpoint whose matching weights start the model (fine-tuning, fresh optimizer).
    pub init_from: Option<PathBuf>,
    pub heap: &'static dyn HeapCounter,
    /// Signal number to stop at the next step boundary; 0 while running.
    pub stop: Arc<AtomicUsize>,
    /// Progress bars on a terminal, plain lines otherwise.
    pub terminal: bool,
    pub hooks: TestHooks,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Finished {
        steps: u64,
        checkpoint: PathBuf,
    },
    Interrupted {
        signal: usize,
        step: u64,
        checkpoint: PathBuf,
    },
}

/// Trainer state that goes into `meta.json` beside the counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct TrainerState {
    skipped_steps: u64,
    consecutive_skips: u64,
    best_validation: Option<f64>,
    samples_seen: u64,
}

/// One metrics record (`metrics.jsonl`).
#[derive(Debug, Serialize)]
struct StepRecord<'a> {
    kind: &'a str,
    step: u64,
    epoch: u64,
    loss: f64,
    loss_waveform: f64,
    loss_multi_stft: f64,
    lr: f64,
    grad_norm: f64,
    skipped: bool,
    skipped_steps: u64,
    samples_per_s: f64,
    mem_allocated: usize,
    mem_peak_allocated: usize,
    mem_reserved: usize,
    mem_peak_reserved: usize,
}

struct Trainer {
    cfg: Config,
    engine: Engine,
    adam: AdamW,
    flat: Vec<f32>,
    grads: Vec<f32>,
    fingerprint: Fingerprint,
    schedule: Schedule,
    lr: LrSchedule,
    ckpt_dir: PathBuf,
    state: TrainerState,
    meter: MemoryMeter,
    progress: Progress,
    valid: Vec<sepdist_data::Track>,
    sample_rate: u32,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn train(req: TrainRequest) -> Result<Outcome, TrainError> {
    let cfg = req.config.clone();
    let t = &cfg.training;
    // Settings this build cannot honour are refused, never silently replaced.
    if t.precision == Precision::Bf16 {
        return Err(TrainError::Setup(
            "training.precision: bf16 needs a CUDA device, which this build does not support yet; use fp32".into(),
        ));
    }
    if matches!(cfg.distributed.backend, Backend::Mpi | Backend::Nccl) {
        return Err(TrainError::Setup(format!(
            "distributed.backend: {:?} is not available in this build (single-process training only); use auto or none",
            cfg.distributed.backend
        ).to_lowercase()));
    }
    let device = Device::Cpu;
    let data = Musdb::from_config(&cfg.dataset)?;
    let sampler = Arc::new(Sampler::from_config(&data, &cfg)?);
    let schedule = Schedule::from_config(&cfg, 1)?;
    let steps_per_epoch = schedule.steps_per_epoch();
    let total_steps = t.max_steps.unwrap_or(t.epochs as u64 * steps_per_epoch);

    let separator = Separator::new(&cfg.model, cfg.dataset.sources.len())?;
    let init = separator.init_params(t.seed, &device, DType::F32)?;
    let loss = SeparationLoss::new(&t.loss)?;
    let engine = Engine::new(separator, loss, &init, t.gradient_checkpointing, device)?;
    drop(init);
    let fingerprint = engine.layout().fingerprint();
    let flat = engine.flat_params()?;
    let n = flat.len();
    let mut trainer = Trainer {
        adam: AdamW::new(AdamWHyper::from(&t.optimizer), n),
        grads: vec![0.0; n],
        flat,
        fingerprint,
        schedule,
        lr: LrSchedule::new(t.optimizer.lr, &t.lr_schedule, total_steps),
        ckpt_dir: t.output_dir.join("checkpoints"),
        state: TrainerState::default(),
        meter: MemoryMeter::new(req.heap),
        progress: Progress::new(req.terminal, t.log_every),
        valid: data.valid.clone(),
        sample_rate: data.sample_rate,
        engine,
        cfg: cfg.clone(),
    };
    let mut step = 0;
    if let Some(path) = &req.init_from {
        trainer.init_from(path)?;
    }
    if let Some(spec) = &req.resume {
        if let Some(s) = trainer.resume(spec)? {
            step = s;
        }
    }
    let mut metrics =
        MetricsWriter::append(&t.output_dir.join("metrics.jsonl")).map_err(io(&t.output_dir))?;
    trainer.progress.println(&format!(
        "training {} parameters for {} optimizer steps ({} per epoch, effective batch {}) from step {step}",
        n,
        total_steps,
        steps_per_epoch,
        trainer.schedule.global_batch()
    ));
    let mut loader = Loader::new(
        sampler,
        trainer.schedule,
        0,
        step,
        Some(total_steps),
        cfg.dataset.num_workers,
        cfg.dataset.prefetch,
    )?;
    if step == 0 {
        // The starting point, so the log shows what training gained.
        trainer.validate(0, &mut metrics, false)?;
    }
    let mut last_saved = None;
    while step < total_steps {
        let mut signal = req.stop.load(Ordering::SeqCst);
        if req.hooks.stop_after_steps == Some(step) {
            signal = SIGTERM;
        }
        if signal != 0 {
            let path = trainer.save(&format!("step_{step:08}"), step)?;
            trainer.progress.finish();
            return Ok(Outcome::Interrupted {
                signal,
                step,
                checkpoint: path,
            });
        }
        let started = Instant::now();
        let record = trainer.step(step, &mut loader, &req.hooks)?;
        step += 1;
        let elapsed = started.elapsed().as_secs_f64().max(1e-9);
        let samples_per_s = trainer.schedule.global_batch() as f64 / elapsed;
        let memory = trainer.meter.snapshot();
        let epoch = (step - 1) / steps_per_epoch;
        trainer.progress.update(&StepReport {
            epoch: epoch + 1,
            step_in_epoch: (step - 1) % steps_per_epoch + 1,
            steps_per_epoch,
            loss: record.0.total,
            lr: record.1,
            memory,
            samples_per_s,
        });
        metrics
            .write(&StepRecord {
                kind: "train",
                step,
                epoch: epoch + 1,
                loss: record.0.total,
                loss_waveform: record.0.waveform,
                loss_multi_stft: record.0.multi_stft,
                lr: record.1,
                grad_norm: record.2,
                skipped: record.3,
                skipped_steps: trainer.state.skipped_steps,
                samples_per_s,
                mem_allocated: memory.allocated,
                mem_peak_allocated: memory.peak_allocated,
                mem_reserved: memory.reserved,
                mem_peak_reserved: memory.peak_reserved,
            })
            .map_err(io(&t.output_dir))?;
        let epoch_end = step % steps_per_epoch == 0;
        if (t.eval_every > 0 && step % t.eval_every == 0) || epoch_end {
            trainer.validate(step, &mut metrics, true)?;
        }
        if epoch_end {
            trainer.save(&format!("checkpoint_epoch{}", epoch + 1), step)?;
            last_saved = Some(step);
        }
        if t.checkpoint_every > 0 && step % t.checkpoint_every == 0 {
            trainer.save(&format!("step_{step:08}"), step)?;
            checkpoint::prune(&trainer.ckpt_dir, "step_", t.keep_last)?;
            last_saved = Some(step);
        }
    }
    let path = if last_saved == Some(step) {
        trainer.ckpt_dir.join(
            std::fs::read_to_string(trainer.ckpt_dir.join(checkpoint::LATEST_FILE))
                .map_err(io(&trainer.ckpt_dir))?
                .trim(),
        )
    } else {
        trainer.save(&format!("step_{step:08}"), step)?
    };
    trainer.progress.finish();
    Ok(Outcome::Finished {
        steps: step,
        checkpoint: path,
    })
}

impl Trainer {
    /// One optimizer step: returns (losses, lr, grad norm, skipped).
    fn step(
        &mut self,
        step: u64,
        loader: &mut Loader,
        hooks: &TestHooks,
    ) -> Result<(LossValues, f64, f64, bool), TrainError> {
        let accumulation = self.cfg.training.gradient_accumulation_steps;
        self.grads.fill(0.0);
        let mut losses = LossValues::default();
        for _ in 0..accumulation {
            let batch = self
                .meter
                .phase(Phase::Data, || loader.next())
                .ok_or_else(|| {
                    TrainError::Setup(format!("the data loader ended before step {step}"))
                })??;
            let (mixture, stems) = batch_tensors(&batch, self.engine.device())?;
            let values = self.meter.phase(Phase::Backward, || {
                self.engine
                    .forward_backward(&mixture, &stems, &mut self.grads)
            })?;
            losses.add(values, 1.0 / accumulation as f64);
        }
        // k micro-batches of mean losses equal one k-times larger batch after dividing by k.
        let scale = 1.0 / accumulation as f32;
        self.grads.iter_mut().for_each(|g| *g *= scale);
        if hooks.nan_at_steps.contains(&step) {
            losses.total = f64::NAN;
            if let Some(g) = self.grads.first_mut() {
                *g = f32::NAN;
            }
        }
        let norm = sum_of_squares(&self.grads).sqrt();
        let lr = self.lr.lr(step);
        if !(losses.total.is_finite() && norm.is_finite()) {
            self.state.skipped_steps += 1;
            self.state.consecutive_skips += 1;
            self.progress.println(&format!(
                "step {}: non-finite loss or gradient, step skipped ({} consecutive, {} in all)",
                step + 1,
                self.state.consecutive_skips,
                self.state.skipped_steps
            ));
            if self.state.consecutive_skips >= self.cfg.training.max_consecutive_skips {
                return Err(TrainError::NonFinite {
                    step: step + 1,
                    consecutive: self.state.consecutive_skips,
                });
            }
            self.state.samples_seen += self.schedule.global_batch();
            return Ok((losses, lr, norm, true));
        }
        self.state.consecutive_skips = 0;
        let clip = clip_scale(norm, self.cfg.training.grad_clip) as f32;
        if clip < 1.0 {
            self.grads.iter_mut().for_each(|g| *g *= clip);
        }
        self.meter.phase(Phase::Optimizer, || {
            self.adam.update(&mut self.flat, &self.grads, lr);
            self.engine.load_flat(&self.flat)
        })?;
        self.state.samples_seen += self.schedule.global_batch();
        Ok((losses, lr, norm, false))
    }

    /// Mean loss over the validation tracks in segment-length chunks; with `keep_best`,
    /// saves `best_model` when it improves.
    fn validate(
        &mut self,
        step: u64,
        metrics: &mut MetricsWriter,
        keep_best: bool,
    ) -> Result<(), TrainError> {
        if self.valid.is_empty() {
            return Ok(());
        }
        let chunks = ChunkIter::new(
            self.valid.clone(),
            self.sample_rate,
            self.cfg.dataset.segment_length,
        )?;
        let mut sum = LossValues::default();
        let mut count = 0usize;
        let engine = &self.engine;
        self.meter
            .phase(Phase::Validation, || -> Result<(), TrainError> {
                for chunk in chunks {
                    let chunk = chunk?;
                    let n = chunk.frames;
                    let mixture = Tensor::from_slice(&chunk.mixture, (1, 2, n), engine.device())?;
                    let s = chunk.stems.len() / (2 * n);
                    let stems = Tensor::from_slice(&chunk.stems, (1, s, 2, n), engine.device())?;
                    sum.add(engine.evaluate(&mixture, &stems)?, 1.0);
                    count += 1;
                }
                Ok(())
            })?;
        let mean = LossValues {
            total: sum.total / count.max(1) as f64,
            waveform: sum.waveform / count.max(1) as f64,
            multi_stft: sum.multi_stft / count.max(1) as f64,
        };
        let improved = keep_best
            && self
                .state
                .best_validation
                .is_none_or(|best| mean.total < best);
        self.progress.println(&format!(
            "step {step}: validation loss {:.4} over {count} chunks{}",
            mean.total,
            if improved { " (best so far)" } else { "" }
        ));
        metrics
            .write(&serde_json::json!({
                "kind": "validation",
                "step": step,
                "loss": mean.total,
                "loss_waveform": mean.waveform,
                "loss_multi_stft": mean.multi_stft,
                "chunks": count,
            }))
            .map_err(io(&self.cfg.training.output_dir))?;
        if improved {
            self.state.best_validation = Some(mean.total);
            self.save("best_model", step)?;
        }
        Ok(())
    }

    fn save(&mut self, name: &str, step: u64) -> Result<PathBuf, TrainError> {
        let steps_per_epoch = self.schedule.steps_per_epoch();
        let meter = &self.meter;
        let (flat, adam, layout) = (&self.flat, &self.adam, self.engine.layout());
        let mut meta = Meta::new(step, step / steps_per_epoch, self.fingerprint.clone());
        meta.optimizer_updates = adam.step;
        meta.config_yaml = self.cfg.to_yaml();
        meta.trainer = serde_json::to_value(&self.state)
            .map_err(|e| TrainError::Setup(format!("cannot record trainer state: {e}")))?;
        let path = meter.phase(Phase::Checkpoint, || -> Result<PathBuf, TrainError> {
            let mut staging = Staging::new(&self.ckpt_dir, name)?;
            staging.write_weights(&layout.unflatten(flat))?;
            staging.write_optimizer_shard(&OptimizerShard {
                offset: 0,
                exp_avg: adam.exp_avg.clone(),
                exp_avg_sq: adam.exp_avg_sq.clone(),
            })?;
            Ok(staging.commit(meta)?)
        })?;
        self.progress
            .println(&format!("saved checkpoint {}", path.display()));
        Ok(path)
    }

    /// Restores everything from a checkpoint; `None` when `auto` finds none to resume.
    fn resume(&mut self, spec: &str) -> Result<Option<u64>, TrainError> {
        let loaded = match checkpoint::resolve(&self.ckpt_dir, spec, Some(&self.fingerprint)) {
            Ok(l) => l,
            Err(CheckpointError::NoneValid { rejected, .. })
                if spec == "auto" && rejected.is_empty() =>
            {
                self.progress.println(&format!(
                    "no checkpoint in {} to resume: starting from scratch",
                    self.ckpt_dir.display()
                ));
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let layout = self.engine.layout();
        for (i, (_, tensor)) in loaded.weights.iter().enumerate() {
            self.flat[layout.range(i)].copy_from_slice(&tensor.data);
        }
        let (m, v) = loaded.optimizer_range(0, self.flat.len())?;
        self.adam.exp_avg = m;
        self.adam.exp_avg_sq = v;
        self.adam.step = loaded.meta.optimizer_updates;
        self.state = serde_json::from_value(loaded.meta.trainer.clone()).map_err(|e| {
            TrainError::Setup(format!(
                "{}: trainer state unreadable: {e}",
                loaded.path.join(checkpoint::META_FILE).display()
            ))
        })?;
        self.engine.load_flat(&self.flat)?;
        self.progress.println(&format!(
            "resumed from {} at step {}",
            loaded.path.display(),
            loaded.meta.step
        ));
        Ok(Some(loaded.meta.step))
    }

    /// Loads the weights whose names and shapes match; reports the rest.
    fn init_from(&mut self, path: &Path) -> Result<(), TrainError> {
        let loaded = checkpoint::load(path, None)?;
        let layout = self.engine.layout().clone();
        let mut loaded_count = 0;
        let mut not_loaded = Vec::new();
        for (i, spec) in layout.specs.iter().enumerate() {
            match loaded.weights.iter().find(|(name, _)| *name == spec.name) {
                Some((_, t)) if t.shape == spec.shape => {
                    self.flat[layout.range(i)].copy_from_slice(&t.data);
                    loaded_count += 1;
                }
                Some((_, t)) => not_loaded.push(format!(
                    "  {}: {:?} in the checkpoint, {:?} in the model",
                    spec.name, t.shape, spec.shape
                )),
                None => not_loaded.push(format!("  {}: absent from the checkpoint", spec.name)),
            }
        }
        self.engine.load_flat(&self.flat)?;
        self.progress.println(&format!(
            "initialised {loaded_count} of {} parameters from {}",
            layout.specs.len(),
            path.display()
        ));
        if !not_loaded.is_empty() {
            self.progress.println(&format!(
                "not loaded (kept their fresh initialisation):\n{}",
                not_loaded.join("\n")
            ));
        }
        Ok(())
    }
}
