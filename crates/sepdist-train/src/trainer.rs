//! `sepdist train` for one process: data, block-wise engine, accumulation, non-finite guard,
//! clipping, AdamW, schedule, progress, metrics, validation, checkpoints, resume, interrupt.

use crate::buckets::BucketPlan;
use crate::checkpoint::{
    self, CheckpointError, Fingerprint, Meta, OptimizerShard, ShardRecord, Staging,
};
use crate::engine::{Engine, LossValues, batch_tensors};
use crate::memory::{HeapCounter, MemoryMeter, Phase};
use crate::optim::{AdamW, AdamWHyper, clip_scale, sum_of_squares};
use crate::progress::{MetricsWriter, Progress, StepReport};
use crate::schedule::{LrSchedule, Plateau};
use candle_core::{DType, Tensor};
use sepdist_comm::{CommError, Communicator, PendingReduce};
use sepdist_config::{Config, Precision};
use sepdist_data::{ChunkIter, DataError, Loader, Musdb, Sampler, Schedule};
use sepdist_model::loss::SeparationLoss;
use sepdist_model::{ModelError, Separator};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

mod cuda_oom;
mod on_oom;

pub use cuda_oom::{FaultFn, FaultHook, FaultPoint, FaultSite};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    TensorBoard(#[from] crate::tensorboard::TbError),
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
    /// The memory check refused to start, or a step went over the memory budget and
    /// `training.on_oom` is `stop` (or nothing smaller fits); the diagnosis is on stderr.
    #[error("{0}")]
    OutOfMemory(String),
    #[error(
        "cannot write checkpoint {name} in {} (the checkpoints already there are unchanged): {source}",
        dir.display()
    )]
    Save {
        name: String,
        dir: PathBuf,
        source: CheckpointError,
    },
}

/// A checkpoint that could not be written (unwritable or full output directory) says which
/// and that the earlier ones are intact; other errors (a collective's deadline) are kept.
fn saving<'a>(name: &'a str, dir: &'a Path) -> impl FnOnce(TrainError) -> TrainError + 'a {
    move |e| match e {
        TrainError::Checkpoint(source) => TrainError::Save {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            source,
        },
        other => other,
    }
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Model(ModelError::from(e))
    }
}

/// Signal numbers (Linux) of the stop requests the CLI forwards through `TrainRequest::stop`.
const SIGINT: usize = 2;
const SIGUSR1: usize = 10;
const SIGTERM: usize = 15;

/// Validation sums before the per-(track, source) SDR sums.
const VALID_HEAD: usize = 5;
/// The stop requests the ranks agree on, in order of precedence when ranks saw different
/// ones: an interrupt or a termination wins over a requeue request (SIGUSR1).
const STOP_SIGNALS: [usize; 3] = [SIGINT, SIGTERM, SIGUSR1];

/// Test hooks, set by the CLI from `SEPDIST_TEST_*` environment variables.
#[derive(Debug, Clone, Default)]
pub struct TestHooks {
    /// Optimizer steps (0-based) whose loss and gradient are replaced by NaN.
    pub nan_at_steps: Vec<u64>,
    /// Behave as if SIGTERM arrived once this many optimizer steps are done.
    pub stop_after_steps: Option<u64>,
    /// Makes ops of chosen steps fail (library tests of the out-of-memory handling; the CLI
    /// sets none).
    pub fault: Option<FaultHook>,
}

/// What to train and how.
pub struct TrainRequest {
    pub config: Config,
    /// `auto`, `latest` (in `output_dir/checkpoints`) or a checkpoint directory.
    pub resume: Option<String>,
    /// A checkpoint whose matching weights start the model (fine-tuning, fresh optimizer).
    pub init_from: Option<PathBuf>,
    pub heap: &'static dyn HeapCounter,
    /// Signal number to stop at the next step boundary (SIGINT, SIGTERM or SIGUSR1; any other
    /// counts as SIGTERM); 0 while running. The ranks stop after the same step.
    pub stop: Arc<AtomicUsize>,
    /// Progress bars on a terminal, plain lines otherwise.
    pub terminal: bool,
    pub hooks: TestHooks,
    /// Print the measured memory breakdown next to the plan's prediction at the end.
    pub memory_report: bool,
    /// Start even when the memory check predicts that the config does not fit.
    pub force: bool,
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
    /// Best mean validation uSDR so far (dB; higher is better).
    best_usdr: Option<f64>,
    samples_seen: u64,
    /// Reduce-on-plateau state (`training.lr_schedule.plateau`).
    #[serde(default)]
    plateau: Plateau,
    /// Step of the last scheduled validation: a run stopped by a signal checkpoints before
    /// the validation due at that step, and the resumed run makes it up first.
    #[serde(default)]
    validated_step: Option<u64>,
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
    loss_mse: f64,
    lr: f64,
    grad_norm: f64,
    skipped: bool,
    skipped_steps: u64,
    samples_per_s: f64,
    mem_allocated: usize,
    mem_peak_allocated: usize,
    mem_reserved: usize,
    mem_peak_reserved: usize,
    /// What the `mem_*` figures measure: `cpu` (heap and resident set) or `cuda:N` (the GPU's
    /// memory pool: used and reserved bytes).
    device: &'a str,
    /// `training.precision`: `fp32` or `bf16` (mixed: the model computes in bf16).
    precision: &'a str,
    /// Per-phase peaks and activation levels of this step.
    #[serde(flatten)]
    memory_phases: crate::memory::StepMemory,
}

struct Trainer<'c> {
    cfg: Config,
    comm: &'c dyn Communicator,
    engine: Engine,
    /// AdamW state of this rank's range `shard` (the whole vector at ZeRO stage 0).
    adam: AdamW,
    shard: std::ops::Range<usize>,
    /// Parameters, padded to a multiple of the world size: the whole vector, or under ZeRO-3
    /// only this rank's `shard` (see [`Trainer::local`]).
    flat: Vec<f32>,
    /// The gradient, laid out like `flat`.
    grads: Vec<f32>,
    /// Length of the padded flat vector over all ranks.
    padded: usize,
    /// ZeRO-3: the engine holds no parameters; it gathers them per piece from the shards.
    zero3: Option<crate::zero3::Zero3>,
    /// Scratch for ZeRO-2's reduce-scattered gradient shard.
    grad_shard: Vec<f32>,
    /// EMA of the weights over `shard` (`training.ema`), fp32, sharded like the optimizer.
    ema: Option<Vec<f32>>,
    buckets: BucketPlan,
    fingerprint: Fingerprint,
    schedule: Schedule,
    lr: LrSchedule,
    ckpt_dir: PathBuf,
    state: TrainerState,
    meter: Arc<MemoryMeter>,
    progress: Progress,
    valid: Vec<sepdist_data::Track>,
    sample_rate: u32,
    /// TensorBoard events in `OUTPUT_DIR/tb` (rank 0 only).
    tb: Option<crate::tensorboard::TbWriter>,
    /// What the ranks are doing ("optimizer step 7"), for the collective-deadline message.
    activity: String,
    /// A CUDA out-of-memory error in the refresh of the engine's parameters after an update
    /// (after that step's decision): it decides the next step.
    pending_oom: Option<cuda_oom::CudaFailure>,
    /// The engine's parameters are not those of `flat` (their refresh failed): reloaded before
    /// the engine runs again.
    engine_stale: bool,
}

/// `ema ← m·ema + (1 − m)·weights`, in fp32 in this order (the tests reproduce it bitwise).
fn ema_update(ema: &mut [f32], weights: &[f32], momentum: f64) {
    let (m, rest) = (momentum as f32, (1.0 - momentum) as f32);
    for (e, w) in ema.iter_mut().zip(weights) {
        *e = m * *e + rest * *w;
    }
}

/// The dtype the engine computes in for `precision` (bf16: mixed precision, the master
/// weights stay fp32).
pub(crate) fn compute_dtype(precision: Precision) -> DType {
    match precision {
        Precision::Fp32 => DType::F32,
        Precision::Bf16 => DType::BF16,
    }
}

/// The start line's precision: `fp32` (`fp32 with TF32 matmuls` on CUDA unless
/// `training.tf32: false`) or `bf16-mixed (fp32 master weights)`.
fn precision_label(t: &sepdist_config::TrainingConfig, device: &candle_core::Device) -> String {
    match t.precision {
        Precision::Fp32 if t.tf32 && device.is_cuda() => "fp32 with TF32 matmuls".into(),
        Precision::Fp32 => "fp32".into(),
        Precision::Bf16 => "bf16-mixed (fp32 master weights)".into(),
    }
}

/// Opens the dataset on every rank; rank 0 first, since it generates a missing synthetic one.
pub(crate) fn open_dataset(cfg: &Config, comm: &dyn Communicator) -> Result<Musdb, TrainError> {
    if comm.rank() == 0 {
        let data = Musdb::from_config(&cfg.dataset);
        comm.barrier()?;
        Ok(data?)
    } else {
        comm.barrier()?;
        Ok(Musdb::from_config(&cfg.dataset)?)
    }
}

/// Every rank's outcome of a set-up step that can fail on some ranks only (a GPU that does
/// not open, a dataset missing on one node): one exchange, so that every rank stops at once
/// instead of the others waiting in the next collective until its deadline. A failing rank
/// keeps its own error; the others stop with one naming the first failing rank.
fn agree<T>(
    comm: &dyn Communicator,
    what: &str,
    result: Result<T, TrainError>,
) -> Result<T, TrainError> {
    // Empty: ok; else the error's message behind a marker byte (never empty).
    let mine = match &result {
        Ok(_) => Vec::new(),
        Err(e) => std::iter::once(b'!')
            .chain(e.to_string().into_bytes())
            .collect(),
    };
    let all = comm.all_gather_bytes(&mine)?;
    if result.is_ok() {
        if let Some((rank, message)) = all.iter().enumerate().find(|(_, m)| !m.is_empty()) {
            return Err(TrainError::Setup(format!(
                "rank {rank} failed {what}: {}",
                String::from_utf8_lossy(&message[1..])
            )));
        }
    }
    result
}

/// Bytes every rank must agree on before training: the parameter fingerprint and the
/// resolved config.
fn agreement_bytes(fingerprint: &Fingerprint, cfg: &Config) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(fingerprint).unwrap_or_default();
    bytes.push(b'\n');
    bytes.extend(cfg.to_yaml().bytes());
    bytes
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Trains with the ranks of `comm` (`sepdist_comm::init`; `Local` for one process). Every
/// rank calls this with the same request.
pub fn train(req: TrainRequest, comm: &dyn Communicator) -> Result<Outcome, TrainError> {
    // A CUDA out-of-memory while setting up (the model's parameters on the device) ends the
    // run as one, without candle's backtrace.
    train_rank(req, comm).map_err(|e| match e.cuda_out_of_memory() {
        Some(m) => TrainError::OutOfMemory(format!(
            "CUDA out of memory on rank {} while setting up training: {m}",
            comm.rank()
        )),
        None => e,
    })
}

fn train_rank(req: TrainRequest, comm: &dyn Communicator) -> Result<Outcome, TrainError> {
    let cfg = req.config.clone();
    let t = &cfg.training;
    // The GPU of this rank's local rank (NCCL's backend opened the same one), or the CPU.
    let device = agree(comm, "to open its device", crate::device::open(t, comm))?;
    // Before anything of the model's size exists: refuse, or refit, a config that does not fit.
    let cfg = crate::oom::preflight(
        cfg,
        comm,
        req.force,
        crate::device::memory(&device).as_ref(),
    )?;
    let t = &cfg.training;
    let (rank, world) = (comm.rank(), comm.world_size());
    let data = agree(comm, "to open the dataset", open_dataset(&cfg, comm))?;
    let sampler = Arc::new(Sampler::from_config(&data, &cfg)?);
    let schedule = Schedule::from_config(&cfg, world)?;
    let steps_per_epoch = schedule.steps_per_epoch();
    let total_steps = t.max_steps.unwrap_or(t.epochs as u64 * steps_per_epoch);

    let separator = Separator::with_sources(&cfg.model, &cfg.dataset.sources)?;
    let init = separator.init_params(t.seed, &device, DType::F32)?;
    let loss = SeparationLoss::for_sources(&t.loss, &cfg.dataset.sources)?;
    let mut engine = Engine::new(separator, loss, &init, t.gradient_checkpointing, device)?;
    drop(init);
    // The engine reports forward/backward boundaries to the memory meter.
    let meter = Arc::new(match crate::device::memory_counter(engine.device()) {
        Some(gpu) => MemoryMeter::with_counter(gpu),
        None => MemoryMeter::new(req.heap),
    });
    meter.set_budget(crate::oom::runtime_budget(&cfg));
    engine.set_probe(Some(meter.probe()));
    let fingerprint = engine.layout().fingerprint();

    // Every rank must build the same model from the same config.
    let mine = agreement_bytes(&fingerprint, &cfg);
    let all = comm.all_gather_bytes(&mine)?;
    if let Some(other) = all.iter().position(|b| *b != all[0]) {
        let what = if serde_json::to_vec(&fingerprint)
            .ok()
            .is_some_and(|f| !all[other].starts_with(&f))
        {
            "parameter fingerprint"
        } else {
            "resolved config"
        };
        return Err(TrainError::Setup(format!(
            "rank {other} has a different {what} from rank 0: every rank must start from the same config (check the --set arguments and the config file on each node)"
        )));
    }

    // The fp32 master copy, then the engine's compute copy of it (bf16: mixed precision).
    let mut flat = engine.flat_params()?;
    engine.set_compute_dtype(compute_dtype(t.precision))?;
    let n = flat.len();
    let padded = n.div_ceil(world) * world;
    flat.reserve_exact(padded - n); // no amortised doubling of the master copy
    flat.resize(padded, 0.0);
    let zero_stage = cfg.distributed.zero_stage;
    let shard = if zero_stage == 0 {
        0..padded
    } else {
        let per = padded / world;
        rank * per..(rank + 1) * per
    };
    let bucket_bytes = (cfg.distributed.bucket_size_mb * 1e6) as usize;
    let buckets = BucketPlan::new(engine.layout(), engine.block_param_indices(), bucket_bytes);
    let zero3 = if zero_stage >= 3 {
        // Only this rank's shard of the parameters stays; the engine gathers the pieces.
        let zero3 = crate::zero3::Zero3::new(&engine, shard.len(), world);
        flat = flat[shard.clone()].to_vec();
        engine.release_params();
        Some(zero3)
    } else {
        None
    };
    let terminal = req.terminal && rank == 0;
    let mut trainer = Trainer {
        adam: AdamW::new(AdamWHyper::from(&t.optimizer), shard.len()),
        grads: vec![0.0; flat.len()],
        padded,
        zero3,
        // Only ZeRO-2 with several ranks reduce-scatters into it.
        grad_shard: vec![
            0.0;
            if zero_stage == 2 && world > 1 {
                padded / world
            } else {
                0
            }
        ],
        ema: None,
        shard,
        buckets,
        flat,
        fingerprint,
        schedule,
        lr: LrSchedule::new(t.optimizer.lr, &t.lr_schedule, total_steps),
        ckpt_dir: t.output_dir.join("checkpoints"),
        state: TrainerState::default(),
        meter,
        progress: Progress::new(terminal, t.log_every),
        valid: data.valid.clone(),
        sample_rate: data.sample_rate,
        tb: None,
        activity: "start-up".into(),
        pending_oom: None,
        engine_stale: false,
        engine,
        comm,
        cfg: cfg.clone(),
    };
    let result = trainer.run(
        &req.stop,
        &req.hooks,
        req.init_from.as_deref(),
        req.resume.as_deref(),
        total_steps,
        sampler,
    );
    if req.memory_report && result.is_ok() {
        trainer.say(&trainer.memory_report());
    }
    if let Err(TrainError::Comm(e @ CommError::Timeout { .. })) = &result {
        // A rank is gone or stuck: nothing can be agreed on any more. Say where, end the job.
        // One write, so the launcher forwards the line whole before the abort.
        let line = format!(
            "error: rank {rank}: {}: {e}; aborting the job\n",
            trainer.activity
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        trainer.comm.abort(1);
    }
    // Outside a step (validation, a checkpoint's gathers) the ranks cannot decide together on a
    // CUDA out-of-memory: it ends this rank's run as one (the others stop at their next
    // collective, or when the launcher ends the job).
    result.map_err(|e| match e.cuda_out_of_memory() {
        Some(m) => TrainError::OutOfMemory(format!(
            "CUDA out of memory on rank {rank} during {}: {m}",
            trainer.activity
        )),
        None => e,
    })
}

impl Trainer<'_> {
    /// `--memory-report`: this rank's measured heap by buffer, next to the plan.
    fn memory_report(&self) -> String {
        let (index, _) = self.meter.reported_step();
        let known = self.known_buffers(index as u64);
        let predicted =
            crate::oom::planner_for(&self.cfg, self.comm.world_size(), self.engine.device())
                .ok()
                .map(|p| p.predict(&p.configured()));
        crate::memory::report(&self.meter, &known, predicted.as_ref())
    }

    /// This rank's buffers of known size at optimizer step `index` (0-based).
    fn known_buffers(&self, index: u64) -> crate::memory::KnownBuffers {
        let (cfg, f32s) = (&self.cfg, std::mem::size_of::<f32>());
        let audio = cfg.training.batch_size
            * (1 + cfg.dataset.sources.len())
            * 2
            * cfg.dataset.segment_length
            * f32s;
        if !self.engine.device().is_cpu() {
            // The device holds the engine's parameters and the micro-batch's tensors; the flat
            // master copy, gradient, AdamW state and the loader's batches are in host memory.
            return crate::memory::KnownBuffers {
                parameters: self.engine.param_copy_bytes(),
                gradients: 0,
                optimizer: 0,
                data: audio,
            };
        }
        // Batches the loader holds ready at the step's first micro-batch.
        let t = &cfg.training;
        let total = t
            .max_steps
            .unwrap_or(t.epochs as u64 * self.schedule.steps_per_epoch());
        let acc = t.gradient_accumulation_steps as u64;
        let left = (total * acc).saturating_sub(index * acc + 1);
        let prefetched = (cfg.dataset.prefetch.max(1) as u64).min(left) as usize;
        crate::memory::KnownBuffers {
            parameters: self.engine.param_copy_bytes() + self.flat.capacity() * f32s,
            gradients: (self.grads.capacity() + self.grad_shard.capacity()) * f32s,
            optimizer: (self.adam.exp_avg.capacity()
                + self.adam.exp_avg_sq.capacity()
                + self.ema.as_ref().map_or(0, Vec::capacity))
                * f32s,
            // The batch in use (vectors and tensors) and the loader's prefetched ones.
            data: (2 + prefetched) * audio,
        }
    }

    fn rank0(&self) -> bool {
        self.comm.rank() == 0
    }

    fn say(&self, line: &str) {
        if self.rank0() {
            self.progress.println(line);
        }
    }

    fn run(
        &mut self,
        stop: &AtomicUsize,
        hooks: &TestHooks,
        init_from: Option<&Path>,
        resume: Option<&str>,
        total_steps: u64,
        sampler: Arc<Sampler>,
    ) -> Result<Outcome, TrainError> {
        let cfg = self.cfg.clone();
        let t = &cfg.training;
        let steps_per_epoch = self.schedule.steps_per_epoch();
        let n = self.engine.layout().len;
        let mut step = 0;
        if let Some(path) = init_from {
            self.init_from(path)?;
        }
        if t.ema.is_some() {
            // The average starts at the initial weights (resume replaces it).
            self.ema = Some(self.flat[self.local()].to_vec());
        }
        if let Some(spec) = resume {
            if let Some(s) = self.resume(spec)? {
                step = s;
            }
        }
        let mut metrics = if self.rank0() {
            let mut tb = crate::tensorboard::TbWriter::create(t.output_dir.join("tb"))?;
            if step > 0 {
                // TensorBoard drops events a previous run logged past the resumed step.
                tb.session_start(step)?;
            }
            self.tb = Some(tb);
            Some(
                MetricsWriter::append(&t.output_dir.join("metrics.jsonl"))
                    .map_err(io(&t.output_dir))?,
            )
        } else {
            None
        };
        self.say(&format!(
            "training {n} parameters on {device} for {total_steps} optimizer steps ({steps_per_epoch} per epoch, effective batch {} = {} × {} × {} ranks) from step {step}, precision {}",
            self.schedule.global_batch(),
            t.batch_size,
            t.gradient_accumulation_steps,
            self.comm.world_size(),
            precision_label(t, self.engine.device()),
            device = crate::device::label(self.engine.device()),
        ));
        let mut loader = Loader::new(
            Arc::clone(&sampler),
            self.schedule,
            self.comm.rank(),
            step,
            Some(total_steps),
            cfg.dataset.num_workers,
            cfg.dataset.prefetch,
        )?;
        if step == 0 {
            // The starting point, so the log shows what training gained.
            self.validate(0, metrics.as_mut(), false)?;
        } else if self.validation_due(step) && self.state.validated_step != Some(step) {
            // Same weights and state as the uninterrupted run at this point: same decisions
            // (best_model, plateau).
            self.validate(step, metrics.as_mut(), true)?;
        }
        let mut last_saved = None;
        let device_label = crate::device::label(self.engine.device());
        let precision = crate::plan::precision_name(t.precision);
        while step < total_steps {
            // The hook stops exactly after `stop_after_steps` steps: its flag joins the
            // reduction of the step that completes them.
            let local_signal = if hooks.stop_after_steps == Some(step + 1) {
                SIGTERM
            } else {
                stop.load(Ordering::SeqCst)
            };
            let started = Instant::now();
            self.activity = format!("optimizer step {}", step + 1);
            let record = self.step(step, &mut loader, hooks, local_signal)?;
            if let Some(failed) = &record.out_of_memory {
                // Nothing of the step was applied: stop here, or redo it with the fitted
                // setting (same examples per optimizer step, new micro-batch split).
                self.out_of_memory(step, failed, metrics.as_mut())?;
                drop(loader);
                loader = Loader::new(
                    Arc::clone(&sampler),
                    self.schedule,
                    self.comm.rank(),
                    step,
                    Some(total_steps),
                    cfg.dataset.num_workers,
                    cfg.dataset.prefetch,
                )?;
                continue;
            }
            step += 1;
            self.activity = format!("validation or checkpoint after optimizer step {step}");
            let elapsed = started.elapsed().as_secs_f64().max(1e-9);
            let samples_per_s = self.schedule.global_batch() as f64 / elapsed;
            let memory = self.meter.snapshot();
            let memory_phases = self.meter.take_step();
            let epoch = (step - 1) / steps_per_epoch;
            if let Some(metrics) = metrics.as_mut() {
                self.progress.update(&StepReport {
                    epoch: epoch + 1,
                    step_in_epoch: (step - 1) % steps_per_epoch + 1,
                    steps_per_epoch,
                    loss: record.losses.total,
                    lr: record.lr,
                    memory,
                    samples_per_s,
                });
                metrics
                    .write(&StepRecord {
                        kind: "train",
                        step,
                        epoch: epoch + 1,
                        loss: record.losses.total,
                        loss_waveform: record.losses.waveform,
                        loss_multi_stft: record.losses.multi_stft,
                        loss_mse: record.losses.mse,
                        lr: record.lr,
                        grad_norm: record.grad_norm,
                        skipped: record.skipped,
                        skipped_steps: self.state.skipped_steps,
                        samples_per_s,
                        mem_allocated: memory.allocated,
                        mem_peak_allocated: memory.peak_allocated,
                        mem_reserved: memory.reserved,
                        mem_peak_reserved: memory.peak_reserved,
                        device: &device_label,
                        precision,
                        memory_phases,
                    })
                    .map_err(io(&t.output_dir))?;
            }
            if let Some(tb) = self.tb.as_mut() {
                let scalars = [
                    ("train/loss", record.losses.total),
                    ("train/loss_waveform", record.losses.waveform),
                    ("train/loss_multi_stft", record.losses.multi_stft),
                    ("train/loss_mse", record.losses.mse),
                    ("train/lr", record.lr),
                    ("train/grad_norm", record.grad_norm),
                    ("train/samples_per_s", samples_per_s),
                    ("memory/allocated_bytes", memory.allocated as f64),
                    ("memory/peak_allocated_bytes", memory.peak_allocated as f64),
                    ("memory/reserved_bytes", memory.reserved as f64),
                ];
                for (tag, value) in scalars {
                    tb.scalar(tag, step, value as f32)?;
                }
                tb.flush()?;
            }
            if record.signal != 0 {
                // Every rank saw the same reduced flag: all stop at this boundary.
                let path = self.save(&format!("step_{step:08}"), step)?;
                self.progress.finish();
                return Ok(Outcome::Interrupted {
                    signal: record.signal,
                    step,
                    checkpoint: path,
                });
            }
            let epoch_end = step % steps_per_epoch == 0;
            if self.validation_due(step) {
                self.validate(step, metrics.as_mut(), true)?;
            }
            if epoch_end {
                self.save(&format!("checkpoint_epoch{}", epoch + 1), step)?;
                last_saved = Some(step);
            }
            if t.checkpoint_every > 0 && step % t.checkpoint_every == 0 {
                self.save(&format!("step_{step:08}"), step)?;
                if self.rank0() {
                    checkpoint::prune(&self.ckpt_dir, "step_", t.keep_last)?;
                }
                last_saved = Some(step);
            }
        }
        if let Some(f) = self.pending_oom.take() {
            // The last update is applied (the saved weights are the host's, whole); only this
            // rank's device copy of them is behind, and nothing runs on it any more.
            let line = format!(
                "warning: rank {}: CUDA out of memory refreshing the device's parameters after the last step ({}): {}\n",
                self.comm.rank(),
                f.at.phase.name(),
                f.message
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        }
        let path = if last_saved == Some(step) {
            self.ckpt_dir.join(
                std::fs::read_to_string(self.ckpt_dir.join(checkpoint::LATEST_FILE))
                    .map_err(io(&self.ckpt_dir))?
                    .trim(),
            )
        } else {
            self.save(&format!("step_{step:08}"), step)?
        };
        self.progress.finish();
        Ok(Outcome::Finished {
            steps: step,
            checkpoint: path,
        })
    }
}

/// Why a step was discarded, on this rank: its window against the memory budget, and a
/// CUDA out-of-memory error of its ops.
struct StepFailure {
    window: crate::memory::Window,
    cuda: Option<cuda_oom::CudaFailure>,
}

/// Which micro-batch of which step runs, and how.
struct MicroBatch<'h> {
    step: u64,
    /// 0-based within the step.
    index: usize,
    /// Its gradient's buckets are all-reduced as its blocks finish (the last of the window,
    /// several ranks, ZeRO 0 or 1).
    bucketed: bool,
    fault: Option<&'h FaultHook>,
}

/// What one optimizer step reports (identical on every rank).
struct StepOutcome {
    losses: LossValues,
    lr: f64,
    grad_norm: f64,
    skipped: bool,
    /// A stop signal seen by any rank (0: none).
    signal: usize,
    /// Some rank went over the memory budget or ran out of CUDA memory: the step was
    /// discarded; this rank's figures.
    out_of_memory: Option<StepFailure>,
}

impl Trainer<'_> {
    /// One optimizer step over the accumulation window. Gradients are reduced only on the
    /// window's last micro-batch: with ZeRO 0/1, each bucket's all-reduce starts as soon as
    /// the blocks it covers have finished their backward, overlapping the backward of the
    /// earlier blocks; with ZeRO 2, one reduce-scatter into this rank's shard.
    ///
    /// After a CUDA out-of-memory error of an op, this rank computes nothing more in the step
    /// but still issues, in the same order, every collective the other ranks issue (the rest
    /// of the buckets, the reduce-scatter, ZeRO-3's exchanges): its values are discarded with
    /// the step, which the scalar all-reduce's flag discards on every rank.
    fn step(
        &mut self,
        step: u64,
        loader: &mut Loader,
        hooks: &TestHooks,
        local_signal: usize,
    ) -> Result<StepOutcome, TrainError> {
        let accumulation = self.cfg.training.gradient_accumulation_steps;
        let world = self.comm.world_size();
        let rank = self.comm.rank();
        let zero_stage = self.cfg.distributed.zero_stage;
        let fault = hooks.fault.as_ref();
        self.grads.fill(0.0);
        let mut losses = LossValues::default();
        let blocks = self.engine.separator().blocks().len();
        let mut pending: Vec<(usize, Box<dyn PendingReduce>)> = Vec::new();
        // A failure carried from the previous step's parameter refresh decides this step.
        let mut failure = self.pending_oom.take();
        if failure.is_none() && self.engine_stale {
            // A refit redoes the step after this rank's refresh failed: again, as an op of it.
            let reloaded = cuda_oom::caught(
                &self.meter,
                Phase::Optimizer,
                self.engine.load_flat(&self.flat).map_err(TrainError::from),
            )?;
            match reloaded {
                Ok(()) => self.engine_stale = false,
                Err(mut f) => {
                    f.message = format!("reloading the device's parameters: {}", f.message);
                    failure = Some(f);
                }
            }
        }
        // Blocks whose backward finished in the last micro-batch (bucketed reductions).
        let mut done = vec![false; blocks];
        for micro in 0..accumulation {
            let bucketed = micro + 1 == accumulation && world > 1 && zero_stage < 2;
            done.fill(false);
            let mut zero3_done: Vec<cuda_oom::Exchange> = Vec::new();
            if failure.is_none() {
                let at = MicroBatch {
                    step,
                    index: micro,
                    bucketed,
                    fault,
                };
                let computed =
                    self.micro_batch(&at, loader, &mut done, &mut pending, &mut zero3_done)?;
                match computed {
                    Ok(values) => losses.add(values, 1.0 / accumulation as f64),
                    Err(f) => failure = Some(f),
                }
            }
            if failure.is_none() {
                continue;
            }
            // The collectives of this micro-batch that the other ranks issue and this rank
            // has not: in the order the engine issues them.
            if let Some(zero3) = &self.zero3 {
                let recompute = self.cfg.training.gradient_checkpointing;
                let schedule = cuda_oom::zero3_schedule(&self.engine, recompute);
                let mut access = zero3.access(self.comm, &self.flat, &mut self.grads);
                let engine = &self.engine;
                self.meter.phase(Phase::Backward, || {
                    cuda_oom::finish_zero3(&mut access, engine, &schedule, &zero3_done)
                })?;
            } else if bucketed {
                // Blocks finish their backward in reverse order.
                for block in (0..blocks).rev() {
                    if done[block] {
                        continue;
                    }
                    done[block] = true;
                    for b in self.buckets.ready_after(block, &done) {
                        let range = self.buckets.buckets[b].range.clone();
                        pending.push((
                            b,
                            self.comm.start_all_reduce_sum(self.grads[range].to_vec())?,
                        ));
                    }
                }
            }
        }
        let communicated =
            self.meter
                .phase(Phase::Communication, || -> Result<_, TrainError> {
                    let injected = if failure.is_none() {
                        let r = cuda_oom::inject(fault, step, rank, FaultSite::Communication);
                        cuda_oom::caught(&self.meter, Phase::Communication, r)?.err()
                    } else {
                        None
                    };
                    for (b, reduce) in pending.drain(..) {
                        let summed = reduce.wait()?;
                        let range = self.buckets.buckets[b].range.clone();
                        self.grads[range].copy_from_slice(&summed);
                    }
                    if world > 1 && zero_stage == 2 {
                        self.comm
                            .reduce_scatter_sum(&self.grads, &mut self.grad_shard)?;
                        let shard = self.shard.clone();
                        self.grads[shard].copy_from_slice(&self.grad_shard);
                    }
                    Ok(injected)
                })?;
        if failure.is_none() {
            failure = communicated;
        }
        // Mean over the window and the ranks: k micro-batches of size b on W ranks equal one
        // batch of k·b·W.
        let scale = 1.0 / (accumulation * world) as f32;
        let shard = self.local();
        self.grads[shard.clone()]
            .iter_mut()
            .for_each(|g| *g *= scale);
        if hooks.nan_at_steps.contains(&step) {
            losses.total = f64::NAN;
            if let Some(g) = self.grads[shard.clone()].first_mut() {
                *g = f32::NAN;
            }
        }
        // One scalar all-reduce decides for every rank: mean losses, global norm, stop flag.
        // At ZeRO 0 every rank holds the whole reduced gradient, so only rank 0 contributes
        // the norm partial.
        let norm_partial = if zero_stage == 0 && self.comm.rank() != 0 {
            0.0
        } else {
            sum_of_squares(&self.grads[shard.clone()])
        };
        // Then, per stop request, how many ranks saw it.
        let local_signal = match local_signal {
            0 => 0,
            s if STOP_SIGNALS.contains(&s) => s,
            _ => SIGTERM,
        };
        // The heap since the previous step's decision against the memory budget.
        let window = self.meter.close_window();
        let mut scalars = [
            losses.total,
            losses.waveform,
            losses.multi_stft,
            losses.mse,
            norm_partial,
            f64::from(u8::from(local_signal == STOP_SIGNALS[0])),
            f64::from(u8::from(local_signal == STOP_SIGNALS[1])),
            f64::from(u8::from(local_signal == STOP_SIGNALS[2])),
            f64::from(u8::from(window.over_budget() || failure.is_some())),
        ];
        self.comm.all_reduce_sum_f64(&mut scalars)?;
        let w = world as f64;
        let losses = LossValues {
            total: scalars[0] / w,
            waveform: scalars[1] / w,
            multi_stft: scalars[2] / w,
            mse: scalars[3] / w,
        };
        let norm = scalars[4].sqrt();
        // Every rank derives the same signal from the same sums.
        let signal = STOP_SIGNALS
            .iter()
            .zip(&scalars[5..8])
            .find(|(_, count)| **count > 0.0)
            .map_or(0, |(s, _)| *s);
        if scalars[8] > 0.0 {
            // Out of memory on some rank: no state changes, every rank alike.
            return Ok(StepOutcome {
                losses,
                lr: 0.0,
                grad_norm: norm,
                skipped: true,
                signal,
                out_of_memory: Some(StepFailure {
                    window,
                    cuda: failure,
                }),
            });
        }
        let lr = self.lr.lr(step) * self.lr_scale();
        self.state.samples_seen += self.schedule.global_batch();
        if !(losses.total.is_finite() && norm.is_finite()) {
            self.state.skipped_steps += 1;
            self.state.consecutive_skips += 1;
            self.say(&format!(
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
            return Ok(StepOutcome {
                losses,
                lr,
                grad_norm: norm,
                skipped: true,
                signal,
                out_of_memory: None,
            });
        }
        self.state.consecutive_skips = 0;
        let clip = clip_scale(norm, self.cfg.training.grad_clip) as f32;
        if clip < 1.0 {
            self.grads[shard.clone()]
                .iter_mut()
                .for_each(|g| *g *= clip);
        }
        let refreshed = self
            .meter
            .phase(Phase::Optimizer, || -> Result<_, TrainError> {
                self.adam.update(
                    &mut self.flat[shard.clone()],
                    &self.grads[shard.clone()],
                    lr,
                );
                if let (Some(ema), Some(e)) = (self.ema.as_mut(), &self.cfg.training.ema) {
                    if self.adam.step % e.every == 0 {
                        ema_update(ema, &self.flat[shard.clone()], e.momentum);
                    }
                }
                if self.zero3.is_some() {
                    let r = cuda_oom::inject(fault, step, rank, FaultSite::Optimizer);
                    return cuda_oom::caught(&self.meter, Phase::Optimizer, r);
                }
                if zero_stage >= 1 && world > 1 {
                    let mine = self.flat[shard.clone()].to_vec();
                    self.comm.all_gather(&mine, &mut self.flat)?;
                }
                let r = cuda_oom::inject(fault, step, rank, FaultSite::Optimizer)
                    .and_then(|()| Ok(self.engine.load_flat(&self.flat)?));
                cuda_oom::caught(&self.meter, Phase::Optimizer, r)
            })?;
        if let Err(mut f) = refreshed {
            // The update is applied on every rank and the host's weights are whole; this
            // rank's engine holds some old parameters. The next step's decision carries it.
            f.after_update_of = Some(step);
            self.engine_stale = self.zero3.is_none();
            self.pending_oom = Some(f);
        }
        Ok(StepOutcome {
            losses,
            lr,
            grad_norm: norm,
            skipped: false,
            signal,
            out_of_memory: None,
        })
    }
    /// Micro-batch `at` of a step: its batch from `loader`, the forward and the backward, its
    /// gradient added into `grads` (ZeRO 0-2; with `at.bucketed`, each bucket's all-reduce
    /// started into `pending` as soon as the blocks it covers, marked in `done`, are done) or
    /// reduced into the shards (ZeRO-3, the exchanges done listed in `zero3_done`). A CUDA
    /// out-of-memory error of its ops is returned as the failure, where it happened.
    fn micro_batch(
        &mut self,
        at: &MicroBatch<'_>,
        loader: &mut Loader,
        done: &mut [bool],
        pending: &mut Vec<(usize, Box<dyn PendingReduce>)>,
        zero3_done: &mut Vec<cuda_oom::Exchange>,
    ) -> Result<Result<LossValues, cuda_oom::CudaFailure>, TrainError> {
        let (step, micro, fault) = (at.step, at.index, at.fault);
        let rank = self.comm.rank();
        let batch = self
            .meter
            .phase(Phase::Data, || loader.next())
            .ok_or_else(|| {
                TrainError::Setup(format!("the data loader ended before step {step}"))
            })??;
        let tensors = cuda_oom::caught(
            &self.meter,
            Phase::Data,
            cuda_oom::inject(fault, step, rank, FaultSite::Batch { micro })
                .and_then(|()| Ok(batch_tensors(&batch, self.engine.device())?)),
        )?;
        drop(batch);
        let (mixture, stems) = match tensors {
            Ok(t) => t,
            Err(f) => return Ok(Err(f)),
        };
        let (engine, comm, plan, meter) = (&self.engine, self.comm, &self.buckets, &self.meter);
        if let Some(zero3) = &self.zero3 {
            // Every micro-batch reduce-scatters each piece's gradient into the shard.
            let mut access = cuda_oom::Recording {
                inner: zero3.access(comm, &self.flat, &mut self.grads),
                done: Vec::new(),
                fault,
                step,
                rank,
                micro,
                head: engine.separator().blocks().len() - 1,
            };
            let values = meter.phase(Phase::Backward, || {
                let r =
                    engine.forward_backward_sharded::<TrainError, _>(&mixture, &stems, &mut access);
                cuda_oom::caught(meter, Phase::Backward, r)
            });
            *zero3_done = access.done;
            return values;
        }
        let bucketed = at.bucketed;
        meter.phase(Phase::Backward, || {
            let r = engine.forward_backward_with(
                &mixture,
                &stems,
                &mut self.grads,
                |block, grads: &[f32]| -> Result<(), TrainError> {
                    cuda_oom::inject(fault, step, rank, FaultSite::Backward { micro, block })?;
                    if bucketed {
                        // MPI advances non-blocking collectives only inside MPI calls: poll
                        // the reductions in flight between blocks.
                        for (_, reduce) in pending.iter_mut() {
                            reduce.poll()?;
                        }
                        done[block] = true;
                        for b in plan.ready_after(block, done) {
                            let range = plan.buckets[b].range.clone();
                            pending.push((b, comm.start_all_reduce_sum(grads[range].to_vec())?));
                        }
                    }
                    Ok(())
                },
            );
            cuda_oom::caught(meter, Phase::Backward, r)
        })
    }

    /// Validation over the held-out tracks in segment-length chunks, chunks dealt to the
    /// ranks round-robin: the mean loss, and uSDR per source (whole-track SDR, the MDX/MSST
    /// metric) averaged over tracks. With `keep_best`, saves `best_model` when the mean uSDR
    /// over the sources improves.
    fn validate(
        &mut self,
        step: u64,
        metrics: Option<&mut MetricsWriter>,
        keep_best: bool,
    ) -> Result<(), TrainError> {
        if self.valid.is_empty() {
            return Ok(());
        }
        // With an EMA, validation (and so best_model) judges the averaged weights.
        let ema = self.full_ema()?;
        if self.zero3.is_some() {
            // ZeRO-3 gathers the whole model for validation, then drops it again (like
            // DeepSpeed's GatheredParameters): the ranks validate different chunks, so they
            // cannot gather piece by piece in step.
            let whole = match ema {
                Some(ema) => ema,
                None => self.full_params()?,
            };
            self.engine.materialize(&whole)?;
            drop(whole);
            let result = self.validate_loaded(step, metrics, keep_best);
            self.engine.release_params();
            return result;
        }
        if self.engine_stale {
            // The refresh after the last update failed on this rank (its out-of-memory decides
            // the next step): validation needs the weights.
            self.engine.load_flat(&self.flat)?;
            self.engine_stale = false;
        }
        if let Some(ema) = &ema {
            self.engine.load_flat(ema)?;
        }
        let result = self.validate_loaded(step, metrics, keep_best);
        if ema.is_some() {
            self.engine.load_flat(&self.flat)?;
        }
        result
    }

    /// This rank's range of the parameters within `flat` and `grads`: its shard, which is
    /// all of `flat` under ZeRO-3.
    fn local(&self) -> std::ops::Range<usize> {
        if self.zero3.is_some() {
            0..self.flat.len()
        } else {
            self.shard.clone()
        }
    }

    /// The whole (padded) parameter vector: under ZeRO-3 all-gathered from the shards, so
    /// every rank must call it.
    fn full_params(&self) -> Result<Vec<f32>, TrainError> {
        self.whole(&self.flat)
    }

    /// The whole (padded) vector of which `local` is this rank's shard, or all of it.
    fn whole(&self, local: &[f32]) -> Result<Vec<f32>, TrainError> {
        if local.len() == self.padded {
            return Ok(local.to_vec());
        }
        let mut full = vec![0.0; self.padded];
        self.comm.all_gather(local, &mut full)?;
        Ok(full)
    }

    /// Changes the whole parameter vector with `fill` (every rank calls it), then gives the
    /// engine (or, under ZeRO-3, this rank's shard) the result.
    fn set_params(&mut self, fill: impl FnOnce(&mut [f32])) -> Result<(), TrainError> {
        if self.zero3.is_some() {
            let mut full = self.full_params()?;
            fill(&mut full);
            self.flat.copy_from_slice(&full[self.shard.clone()]);
        } else {
            fill(&mut self.flat);
            self.engine.load_flat(&self.flat)?;
        }
        Ok(())
    }

    /// The whole EMA vector (padded like `flat`) on every rank: shards are all-gathered.
    fn full_ema(&self) -> Result<Option<Vec<f32>>, TrainError> {
        self.ema.as_deref().map(|ema| self.whole(ema)).transpose()
    }

    /// Whether a validation is scheduled after optimizer step `step` (every `eval_every` steps
    /// and at every epoch end).
    fn validation_due(&self, step: u64) -> bool {
        let every = self.cfg.training.eval_every;
        (every > 0 && step % every == 0) || step % self.schedule.steps_per_epoch() == 0
    }

    /// Learning-rate factor of the reduce-on-plateau state (1 when it is off).
    fn lr_scale(&self) -> f64 {
        self.cfg
            .training
            .lr_schedule
            .plateau
            .as_ref()
            .map_or(1.0, |p| {
                self.state.plateau.scale(p, self.cfg.training.optimizer.lr)
            })
    }

    fn validate_loaded(
        &mut self,
        step: u64,
        metrics: Option<&mut MetricsWriter>,
        keep_best: bool,
    ) -> Result<(), TrainError> {
        let chunks = ChunkIter::new(
            self.valid.clone(),
            self.sample_rate,
            self.cfg.dataset.segment_length,
        )?;
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let sources = self.cfg.dataset.sources.clone();
        let n_sources = sources.len();
        let track_index: std::collections::HashMap<String, usize> = self
            .valid
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        // [loss total, waveform, multi-STFT, chunks, MSE] then, per (track, source), Σs² and
        // Σ(s−ŝ)²: summed over chunks and ranks, so the SDR is of whole tracks.
        let mut sums = vec![0.0f64; VALID_HEAD + 2 * self.valid.len() * n_sources];
        // The first chunk's separation, for listening in TensorBoard (rank 0 owns chunk 0).
        let mut excerpt: Option<(Vec<f32>, usize)> = None;
        let engine = &self.engine;
        self.meter
            .phase(Phase::Validation, || -> Result<(), TrainError> {
                for (i, chunk) in chunks.enumerate() {
                    if i % world != rank {
                        continue;
                    }
                    let chunk = chunk?;
                    let n = chunk.frames;
                    let mixture = Tensor::from_slice(&chunk.mixture, (1, 2, n), engine.device())?;
                    let stems =
                        Tensor::from_slice(&chunk.stems, (1, n_sources, 2, n), engine.device())?;
                    let (v, estimate) = engine.evaluate(&mixture, &stems)?;
                    sums[0] += v.total;
                    sums[1] += v.waveform;
                    sums[2] += v.multi_stft;
                    sums[3] += 1.0;
                    sums[4] += v.mse;
                    let estimate = estimate.flatten_all()?.to_vec1::<f32>()?;
                    if i == 0 {
                        excerpt = Some((estimate.clone(), n));
                    }
                    let track = track_index.get(&chunk.track).copied().unwrap_or(0);
                    for s in 0..n_sources {
                        for c in 0..2 {
                            let at = (s * 2 + c) * n;
                            // Only the real audio: the last chunk of a track is zero-padded.
                            let valid = at..at + chunk.valid_frames;
                            let slot = VALID_HEAD + 2 * (track * n_sources + s);
                            for (&r, &e) in chunk.stems[valid.clone()].iter().zip(&estimate[valid])
                            {
                                let (r, e) = (f64::from(r), f64::from(e));
                                sums[slot] += r * r;
                                sums[slot + 1] += (r - e) * (r - e);
                            }
                        }
                    }
                }
                Ok(())
            })?;
        self.comm.all_reduce_sum_f64(&mut sums)?;
        let count = sums[3].max(1.0);
        let mean = LossValues {
            total: sums[0] / count,
            waveform: sums[1] / count,
            multi_stft: sums[2] / count,
            mse: sums[4] / count,
        };
        let eps = sepdist_model::metrics::USDR_EPS;
        let tracks = self.valid.len() as f64;
        let usdr: Vec<f64> = (0..n_sources)
            .map(|s| {
                (0..self.valid.len())
                    .map(|t| {
                        let slot = VALID_HEAD + 2 * (t * n_sources + s);
                        10.0 * ((sums[slot] + eps) / (sums[slot + 1] + eps)).log10()
                    })
                    .sum::<f64>()
                    / tracks
            })
            .collect();
        let usdr_mean = usdr.iter().sum::<f64>() / n_sources as f64;
        let improved = keep_best && self.state.best_usdr.is_none_or(|best| usdr_mean > best);
        let per_source: Vec<String> = sources
            .iter()
            .zip(&usdr)
            .map(|(name, v)| format!("{name} {v:.2}"))
            .collect();
        self.say(&format!(
            "step {step}: validation loss {:.4}, uSDR {} dB, mean {usdr_mean:.2} dB over {} chunks{}",
            mean.total,
            per_source.join(", "),
            sums[3] as u64,
            if improved { " (best so far)" } else { "" }
        ));
        if let Some(metrics) = metrics {
            let mut record = serde_json::json!({
                "kind": "validation",
                "step": step,
                "loss": mean.total,
                "loss_waveform": mean.waveform,
                "loss_multi_stft": mean.multi_stft,
                "loss_mse": mean.mse,
                "chunks": sums[3] as u64,
                "usdr_mean": usdr_mean,
            });
            for (name, v) in sources.iter().zip(&usdr) {
                record[format!("usdr_{name}")] = serde_json::json!(v);
            }
            metrics
                .write(&record)
                .map_err(io(&self.cfg.training.output_dir))?;
        }
        if let Some(tb) = self.tb.as_mut() {
            tb.scalar("validation/loss", step, mean.total as f32)?;
            tb.scalar("validation/usdr_mean", step, usdr_mean as f32)?;
            for (name, v) in sources.iter().zip(&usdr) {
                tb.scalar(&format!("validation/usdr_{name}"), step, *v as f32)?;
            }
            if let Some((estimate, n)) = &excerpt {
                for (s, name) in sources.iter().enumerate() {
                    let planar = &estimate[s * 2 * n..(s + 1) * 2 * n];
                    tb.audio(
                        &format!("validation/audio/{name}"),
                        step,
                        self.sample_rate,
                        planar,
                        2,
                        crate::tensorboard::SampleLayout::Planar,
                    )?;
                }
            }
            tb.flush()?;
        }
        if keep_best {
            self.state.validated_step = Some(step);
        }
        if let (true, Some(p)) = (keep_best, &self.cfg.training.lr_schedule.plateau) {
            let base = self.cfg.training.optimizer.lr;
            if self.state.plateau.observe(usdr_mean, p, base) {
                self.say(&format!(
                    "step {step}: no uSDR improvement for {} validations: learning rate scaled to {:.4} of the schedule",
                    p.patience + 1,
                    self.state.plateau.scale(p, base)
                ));
            }
        }
        if improved {
            self.state.best_usdr = Some(usdr_mean);
            self.save("best_model", step)?;
        }
        Ok(())
    }

    /// Writes checkpoint `name` with every rank: rank 0 stages the directory and writes the
    /// weights; each rank holding optimizer state writes its shard; rank 0 commits once it
    /// has every shard's record.
    fn save(&mut self, name: &str, step: u64) -> Result<PathBuf, TrainError> {
        let steps_per_epoch = self.schedule.steps_per_epoch();
        let rank0 = self.rank0();
        let sharded = self.cfg.distributed.zero_stage >= 1 && self.comm.world_size() > 1;
        let n = self.engine.layout().len;
        let mut meta = Meta::new(step, step / steps_per_epoch, self.fingerprint.clone());
        meta.optimizer_updates = self.adam.step;
        meta.world_size = self.comm.world_size();
        meta.zero_stage = self.cfg.distributed.zero_stage;
        meta.config_yaml = self.cfg.to_yaml();
        meta.trainer = serde_json::to_value(&self.state)
            .map_err(|e| TrainError::Setup(format!("cannot record trainer state: {e}")))?;
        let path = self.ckpt_dir.join(name);
        self.meter
            .phase(Phase::Checkpoint, || -> Result<(), TrainError> {
                let mut staging = if rank0 {
                    let staging = Staging::new(&self.ckpt_dir, name);
                    self.comm.barrier()?;
                    staging?
                } else {
                    self.comm.barrier()?;
                    Staging::join(&self.ckpt_dir, name)?
                };
                // Only the real parameters are saved; the padding is not state.
                let end = self.shard.end.min(n);
                let start = self.shard.start.min(end);
                let writes_shard = rank0 || sharded;
                let record = if writes_shard {
                    let shard = OptimizerShard {
                        offset: start,
                        exp_avg: self.adam.exp_avg[..end - start].to_vec(),
                        exp_avg_sq: self.adam.exp_avg_sq[..end - start].to_vec(),
                        ema: self.ema.as_ref().map(|e| e[..end - start].to_vec()),
                    };
                    Some(staging.write_optimizer_shard(self.comm.rank(), &shard)?)
                } else {
                    None
                };
                let bytes = serde_json::to_vec(&record)
                    .map_err(|e| TrainError::Setup(format!("cannot encode a shard record: {e}")))?;
                let records = self.comm.all_gather_bytes(&bytes)?;
                // ZeRO-3: rank 0 needs the whole vector for the weights file.
                let gathered = if self.zero3.is_some() {
                    Some(self.full_params()?)
                } else {
                    None
                };
                if rank0 {
                    let whole = gathered.as_deref().unwrap_or(&self.flat);
                    staging.write_weights(&self.engine.layout().unflatten(whole))?;
                    for bytes in records {
                        let record: Option<ShardRecord> =
                            serde_json::from_slice(&bytes).map_err(|e| {
                                TrainError::Setup(format!("a rank sent a bad shard record: {e}"))
                            })?;
                        if let Some(record) = record {
                            staging.record_shard(record);
                        }
                    }
                    staging.commit(meta)?;
                }
                // Nobody reads or prunes checkpoints before the commit is complete.
                self.comm.barrier()?;
                Ok(())
            })
            .map_err(saving(name, &self.ckpt_dir))?;
        self.say(&format!("saved checkpoint {}", path.display()));
        Ok(path)
    }

    /// Restores everything from a checkpoint written with any world size and ZeRO stage:
    /// this rank reads its range of the flat optimizer state from whatever shards exist.
    /// `None` when `auto` finds none to resume.
    fn resume(&mut self, spec: &str) -> Result<Option<u64>, TrainError> {
        let resolved = checkpoint::resolve_reporting(&self.ckpt_dir, spec, Some(&self.fingerprint));
        let loaded = match resolved {
            Ok((l, passed_over)) => {
                // `auto` fell back past corrupted or unreadable checkpoints: say which, why.
                for reason in passed_over {
                    self.say(&format!(
                        "warning: --resume auto skipped a checkpoint: {reason}"
                    ));
                }
                l
            }
            Err(CheckpointError::NoneValid { rejected, .. })
                if spec == "auto" && rejected.is_empty() =>
            {
                self.say(&format!(
                    "no checkpoint in {} to resume: starting from scratch",
                    self.ckpt_dir.display()
                ));
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let layout = self.engine.layout().clone();
        self.set_params(|flat| {
            for (i, (_, tensor)) in loaded.weights.iter().enumerate() {
                flat[layout.range(i)].copy_from_slice(&tensor.data);
            }
        })?;
        let (m, v) = loaded.optimizer_range(self.shard.start, self.shard.len())?;
        self.adam.exp_avg = m;
        self.adam.exp_avg_sq = v;
        self.adam.step = loaded.meta.optimizer_updates;
        if self.ema.is_some() {
            self.ema = match loaded.ema_range(self.shard.start, self.shard.len())? {
                Some(ema) => Some(ema),
                None => {
                    self.say("the checkpoint has no EMA: the average starts at its weights");
                    Some(self.flat[self.local()].to_vec())
                }
            };
        }
        self.state = serde_json::from_value(loaded.meta.trainer.clone()).map_err(|e| {
            TrainError::Setup(format!(
                "{}: trainer state unreadable: {e}",
                loaded.path.join(checkpoint::META_FILE).display()
            ))
        })?;
        self.say(&format!(
            "resumed from {} at step {} (written by {} rank(s) at ZeRO stage {})",
            loaded.path.display(),
            loaded.meta.step,
            loaded.meta.world_size,
            loaded.meta.zero_stage
        ));
        Ok(Some(loaded.meta.step))
    }

    /// Loads the weights whose names and shapes match; reports the rest.
    fn init_from(&mut self, path: &Path) -> Result<(), TrainError> {
        let loaded = checkpoint::load(path, None)?;
        let layout = self.engine.layout().clone();
        let mut loaded_count = 0;
        let mut not_loaded = Vec::new();
        self.set_params(|flat| {
            for (i, spec) in layout.specs.iter().enumerate() {
                match loaded.weights.iter().find(|(name, _)| *name == spec.name) {
                    Some((_, t)) if t.shape == spec.shape => {
                        flat[layout.range(i)].copy_from_slice(&t.data);
                        loaded_count += 1;
                    }
                    Some((_, t)) => not_loaded.push(format!(
                        "  {}: {:?} in the checkpoint, {:?} in the model",
                        spec.name, t.shape, spec.shape
                    )),
                    None => not_loaded.push(format!("  {}: absent from the checkpoint", spec.name)),
                }
            }
        })?;
        self.say(&format!(
            "initialised {loaded_count} of {} parameters from {}",
            layout.specs.len(),
            path.display()
        ));
        if !not_loaded.is_empty() {
            self.say(&format!(
                "not loaded (kept their fresh initialisation):\n{}",
                not_loaded.join("\n")
            ));
        }
        // Sources the checkpoint has no mask estimator for (fine-tuning to new targets).
        let fresh_heads: Vec<&String> = self
            .cfg
            .dataset
            .sources
            .iter()
            .filter(|s| {
                let prefix = format!("mask_estimators.{s}.");
                !loaded.weights.iter().any(|(n, _)| n.starts_with(&prefix))
            })
            .collect();
        if !fresh_heads.is_empty() {
            let names: Vec<&str> = fresh_heads.iter().map(|s| s.as_str()).collect();
            self.say(&format!(
                "new mask estimators (initialised fresh): {}",
                names.join(", ")
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sepdist_comm::Threads;
    use std::time::Duration;

    #[test]
    fn a_set_up_failure_on_one_rank_stops_every_rank_at_once() {
        let out = Threads::run(3, Duration::from_secs(10), |comm| {
            let mine = if comm.rank() == 1 {
                Err(TrainError::Setup("no dataset at /data/node7".into()))
            } else {
                Ok(comm.rank())
            };
            agree(&comm, "to open the dataset", mine).map_err(|e| e.to_string())
        });
        // The failing rank keeps its own error; the others name it, without waiting.
        assert_eq!(out[1], Err("no dataset at /data/node7".into()));
        for r in [0, 2] {
            let Err(err) = &out[r] else {
                panic!("rank {r} must stop too");
            };
            assert!(
                err.contains("rank 1 failed to open the dataset: no dataset at /data/node7"),
                "{err}"
            );
        }
        let ok = Threads::run(3, Duration::from_secs(10), |comm| {
            agree(&comm, "to open its device", Ok(comm.rank())).map_err(|e| e.to_string())
        });
        assert_eq!(ok, vec![Ok(0), Ok(1), Ok(2)]);
    }
}
