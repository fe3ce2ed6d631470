use clap::Args;
use sepdist_config::{Backend, load_file};
use sepdist_train::{Outcome, TestHooks, TrainRequest};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Exit code after SIGINT (128 + 2) and SIGTERM (128 + 15), as shells report them.
pub const EXIT_SIGINT: u8 = 130;
pub const EXIT_SIGTERM: u8 = 143;
/// Exit code after SIGUSR1 (SLURM's `--signal=USR1@SECONDS` warning before the time limit or
/// a preemption): every rank stopped after the same optimizer step and a checkpoint was
/// written; the job should be requeued and resumed with `--resume auto`. 75 is EX_TEMPFAIL of
/// sysexits.h ("try again later"); the `slurm/` templates requeue on it.
pub const EXIT_REQUEUE: u8 = 75;

/// Exit code when training stops for memory, on every rank: the memory check before the model
/// is allocated predicts a peak above what a rank has (`training.memory_budget`, or the free
/// memory less `training.memory_reserve`), or a step went over `training.memory_budget` and
/// `training.on_oom` is `stop` (or nothing smaller fits). Nothing of the failed step is saved;
/// the last checkpoint stays the newest. The diagnosis (breakdown, available memory, fitted
/// `--set` overrides) is on stderr. 4 is unused by sysexits.h and by the shells' 128 + signal.
pub const EXIT_OUT_OF_MEMORY: u8 = 4;

/// File that rank 0 writes into `training.output_dir` when it stops for a requeue (SIGUSR1),
/// holding the step: the SLURM templates remove it before launching and requeue when it exists.
pub const REQUEUE_MARKER: &str = "requeue";

#[derive(Debug, Args)]
#[command(after_long_help = "\
Memory: before the model is allocated, every rank compares `sepdist plan`'s predicted peak with \
what it may use (training.memory_budget, else MemAvailable or the cgroup's headroom shared by \
the ranks of the node, less training.memory_reserve). If it does not fit, training stops with \
the breakdown and the fitted setting as --set overrides (same effective batch); --force starts \
anyway, training.on_oom: refit starts with the fitted setting. With training.memory_budget the \
heap of every step is checked against it: a step over it is discarded on every rank, then \
training stops (on_oom: stop) or redoes the step with the fitted setting (on_oom: refit).

Exit codes: 0 finished; 1 error; 2 usage or configuration error; 4 out of memory (nothing of \
the failed step is saved, the last checkpoint stays the newest); 75 stopped by SIGUSR1 \
(requeue); 130 / 143 stopped by SIGINT / SIGTERM after a checkpoint.")]
pub struct TrainArgs {
    /// YAML config file (see configs/).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Override a config key, e.g. --set training.batch_size=2.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Resume from a checkpoint directory, or `auto` (newest valid checkpoint in
    /// OUTPUT_DIR/checkpoints, falling back past corrupted ones; starts fresh if there is
    /// none) or `latest` (the one the `latest` pointer names).
    #[arg(long, value_name = "PATH|auto|latest", conflicts_with = "init_from")]
    pub resume: Option<String>,
    /// Start from the weights of a checkpoint whose names and shapes match (fine-tuning,
    /// fresh optimizer); lists the parameters it did not load.
    #[arg(long, value_name = "PATH")]
    pub init_from: Option<PathBuf>,
    /// At the end, print this rank's measured memory breakdown (parameters, gradients,
    /// optimizer state, activations kept, transient working set, communication buffers)
    /// next to `sepdist plan`'s prediction.
    #[arg(long)]
    pub memory_report: bool,
    /// Start even when the memory check predicts that the config does not fit (the check's
    /// message is printed as a warning; a CPU run with training.memory_budget still stops at
    /// the first step over the budget).
    #[arg(long)]
    pub force: bool,
    /// Device to train on (same as --set training.device=...): auto (the GPU of this rank's
    /// local rank when this build has CUDA and it opens, else the CPU), cpu or cuda.
    #[arg(long, value_name = "DEVICE", value_parser = sepdist_config::DeviceChoice::NAMES)]
    pub device: Option<String>,
}

/// The `--set` overrides with `--device` appended as `training.device=...` (last, so it wins).
pub(crate) fn with_device(overrides: &[String], device: Option<&str>) -> Vec<String> {
    let mut all = overrides.to_vec();
    if let Some(d) = device {
        all.push(format!("training.device={d}"));
    }
    all
}

/// Steps (1-based, comma-separated) whose loss and gradients a test makes NaN: `STEP` on every
/// rank, `RANK:STEP` on that rank only.
const NAN_HOOK: &str = "SEPDIST_TEST_NAN_AT_STEPS";
/// Stop as if by SIGTERM once this many optimizer steps are done.
const STOP_HOOK: &str = "SEPDIST_TEST_STOP_AFTER_STEPS";
/// `RANK:KEY=VALUE`: that rank applies one more `--set`.
const RANK_OVERRIDE_HOOK: &str = "SEPDIST_TEST_RANK_OVERRIDE";

fn hooks(rank: usize) -> Result<TestHooks, crate::Failure> {
    let mut hooks = TestHooks::default();
    if let Ok(list) = std::env::var(NAN_HOOK) {
        for item in list.split(',').filter(|s| !s.trim().is_empty()) {
            let bad = || anyhow::anyhow!("{NAN_HOOK}: `{item}` is not STEP or RANK:STEP");
            let (only, step) = match item.split_once(':') {
                Some((r, s)) => (Some(r.trim().parse::<usize>().map_err(|_| bad())?), s),
                None => (None, item),
            };
            let step: u64 = step.trim().parse().map_err(|_| bad())?;
            if only.is_none_or(|r| r == rank) {
                hooks.nan_at_steps.push(step.saturating_sub(1));
            }
        }
    }
    if let Ok(text) = std::env::var(STOP_HOOK) {
        let steps = text
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{STOP_HOOK}: `{text}` is not a step count"))?;
        hooks.stop_after_steps = Some(steps);
    }
    Ok(hooks)
}

/// The communicator `distributed.backend` asks for (MPI ranks, one process, or NCCL).
pub(crate) fn communicator(
    config: &sepdist_config::Config,
) -> Result<Box<dyn sepdist_comm::Communicator>, crate::Failure> {
    let backend = match config.distributed.backend {
        Backend::Auto => sepdist_comm::Backend::Auto,
        Backend::Mpi => sepdist_comm::Backend::Mpi,
        Backend::None => sepdist_comm::Backend::None,
        #[cfg(feature = "nccl")]
        Backend::Nccl => sepdist_comm::Backend::Nccl,
        #[cfg(not(feature = "nccl"))]
        Backend::Nccl => {
            return Err(anyhow::Error::new(sepdist_train::TrainError::Setup(format!(
                "distributed.backend: nccl is not available: {}, or use auto, mpi or none",
                sepdist_comm::NCCL_NOT_COMPILED
            )))
            .into());
        }
    };
    Ok(sepdist_comm::init(
        backend,
        std::time::Duration::from_secs(config.distributed.timeout_s),
    )?)
}

pub fn run(
    args: TrainArgs,
    heap: &'static dyn sepdist_train::memory::HeapCounter,
) -> Result<u8, crate::Failure> {
    let overrides = with_device(&args.overrides, args.device.as_deref());
    let config = load_file(&args.config, &overrides)?;
    let comm = communicator(&config)?;
    // Test hook: one rank loads a different config, to check that start-up agreement
    // catches it (`RANK:KEY=VALUE`).
    let config = match std::env::var(RANK_OVERRIDE_HOOK) {
        Ok(spec) => {
            let (rank, set) = spec.split_once(':').ok_or_else(|| {
                anyhow::anyhow!("{RANK_OVERRIDE_HOOK}: expected RANK:KEY=VALUE, got `{spec}`")
            })?;
            if rank.trim().parse::<usize>().ok() == Some(comm.rank()) {
                let mut overrides = overrides.clone();
                overrides.push(set.to_string());
                load_file(&args.config, &overrides)?
            } else {
                config
            }
        }
        Err(_) => config,
    };
    let stop = Arc::new(AtomicUsize::new(0));
    install_stop_handlers(&stop)?;
    let output_dir = config.training.output_dir.clone();
    use std::io::IsTerminal;
    let outcome = sepdist_train::train(
        TrainRequest {
            config,
            resume: args.resume,
            init_from: args.init_from,
            heap,
            stop,
            terminal: std::io::stderr().is_terminal(),
            hooks: hooks(comm.rank())?,
            memory_report: args.memory_report,
            force: args.force,
        },
        comm.as_ref(),
    )
    .map_err(|e| match e {
        e @ sepdist_train::TrainError::OutOfMemory(_) => crate::Failure {
            code: EXIT_OUT_OF_MEMORY,
            error: e.into(),
        },
        other => other.into(),
    })?;
    let rank = comm.rank();
    match outcome {
        Outcome::Finished { steps, checkpoint } => {
            if rank == 0 {
                println!(
                    "finished {steps} optimizer steps; checkpoint {}",
                    checkpoint.display()
                );
            }
            Ok(0)
        }
        Outcome::Interrupted {
            signal,
            step,
            checkpoint,
        } => {
            let code = if signal == SIGUSR1 as usize {
                EXIT_REQUEUE
            } else if signal == SIGTERM as usize {
                EXIT_SIGTERM
            } else {
                EXIT_SIGINT
            };
            if rank == 0 {
                if code == EXIT_REQUEUE {
                    // The launcher may not pass exit code 75 on (MPICH's mpiexec often exits
                    // 0 after forwarding SIGUSR1): the job scripts also look for this file.
                    let marker = output_dir.join(REQUEUE_MARKER);
                    if let Err(e) = std::fs::write(&marker, format!("{step}\n")) {
                        eprintln!("warning: cannot write {}: {e}", marker.display());
                    }
                    println!(
                        "stopped by signal {signal} (SIGUSR1) after step {step}; checkpoint {}; exit code {EXIT_REQUEUE}: requeue the job and resume with --resume auto",
                        checkpoint.display()
                    );
                } else {
                    println!(
                        "stopped by signal {signal} after step {step}; checkpoint {} (resume with --resume auto)",
                        checkpoint.display()
                    );
                }
            }
            Ok(code)
        }
    }
}

/// SIGINT, SIGTERM and SIGUSR1 ask every rank to stop after the current optimizer step (the
/// ranks agree on the step through the step's scalar all-reduce), write a checkpoint and exit
/// with [`EXIT_SIGINT`], [`EXIT_SIGTERM`] or [`EXIT_REQUEUE`]. A second SIGINT or SIGTERM while
/// that is under way exits at once. SIGINT and SIGTERM take precedence over SIGUSR1: a job told
/// to terminate does not requeue itself.
fn install_stop_handlers(stop: &Arc<AtomicUsize>) -> Result<(), crate::Failure> {
    let stopping = Arc::new(AtomicBool::new(false));
    for (signal, code) in [(SIGINT, EXIT_SIGINT), (SIGTERM, EXIT_SIGTERM)] {
        let install = || -> std::io::Result<()> {
            // The first signal asks for a checkpoint at the next step boundary; a second one
            // while that is under way exits at once.
            signal_hook::flag::register_conditional_shutdown(
                signal,
                i32::from(code),
                Arc::clone(&stopping),
            )?;
            signal_hook::flag::register(signal, Arc::clone(&stopping))?;
            signal_hook::flag::register_usize(signal, Arc::clone(stop), signal as usize)?;
            Ok(())
        };
        install()
            .map_err(|e| anyhow::anyhow!("cannot install the handler of signal {signal}: {e}"))?;
    }
    // SIGUSR1 only asks, and never replaces a SIGINT/SIGTERM already recorded: a thread turns
    // it into a compare-and-swap on the flag (a handler can only store).
    let mut usr1 = signal_hook::iterator::Signals::new([SIGUSR1])
        .map_err(|e| anyhow::anyhow!("cannot install the handler of signal {SIGUSR1}: {e}"))?;
    let stop = Arc::clone(stop);
    std::thread::Builder::new()
        .name("sepdist-sigusr1".into())
        .spawn(move || {
            for _ in usr1.forever() {
                let _ =
                    stop.compare_exchange(0, SIGUSR1 as usize, Ordering::SeqCst, Ordering::SeqCst);
            }
        })
        .map_err(|e| anyhow::anyhow!("cannot start the SIGUSR1 watcher: {e}"))?;
    Ok(())
}
