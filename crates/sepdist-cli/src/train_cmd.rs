use clap::Args;
use sepdist_config::{Backend, load_file};
use sepdist_train::{Outcome, TestHooks, TrainRequest};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};

/// Exit code after SIGINT (128 + 2) and SIGTERM (128 + 15), as shells report them.
pub const EXIT_SIGINT: u8 = 130;
pub const EXIT_SIGTERM: u8 = 143;

#[derive(Debug, Args)]
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
}

/// Steps (1-based, comma-separated) whose loss and gradients a test makes NaN.
const NAN_HOOK: &str = "SEPDIST_TEST_NAN_AT_STEPS";
/// Stop as if by SIGTERM once this many optimizer steps are done.
const STOP_HOOK: &str = "SEPDIST_TEST_STOP_AFTER_STEPS";
/// `RANK:KEY=VALUE`: that rank applies one more `--set`.
const RANK_OVERRIDE_HOOK: &str = "SEPDIST_TEST_RANK_OVERRIDE";

fn hooks() -> Result<TestHooks, crate::Failure> {
    let mut hooks = TestHooks::default();
    if let Ok(list) = std::env::var(NAN_HOOK) {
        for item in list.split(',').filter(|s| !s.trim().is_empty()) {
            let step: u64 = item
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("{NAN_HOOK}: `{item}` is not a step number"))?;
            hooks.nan_at_steps.push(step.saturating_sub(1));
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

pub fn run(
    args: TrainArgs,
    heap: &'static dyn sepdist_train::memory::HeapCounter,
) -> Result<u8, crate::Failure> {
    let config = load_file(&args.config, &args.overrides)?;
    let backend = match config.distributed.backend {
        Backend::Auto => sepdist_comm::Backend::Auto,
        Backend::Mpi => sepdist_comm::Backend::Mpi,
        Backend::None => sepdist_comm::Backend::None,
        Backend::Nccl => {
            return Err(anyhow::Error::new(sepdist_train::TrainError::Setup(
                "distributed.backend: nccl is not available in this build (CUDA support is still to come); use auto, mpi or none".into(),
            ))
            .into());
        }
    };
    let comm = sepdist_comm::init(
        backend,
        std::time::Duration::from_secs(config.distributed.timeout_s),
    )?;
    // Test hook: one rank loads a different config, to check that start-up agreement
    // catches it (`RANK:KEY=VALUE`).
    let config = match std::env::var(RANK_OVERRIDE_HOOK) {
        Ok(spec) => {
            let (rank, set) = spec.split_once(':').ok_or_else(|| {
                anyhow::anyhow!("{RANK_OVERRIDE_HOOK}: expected RANK:KEY=VALUE, got `{spec}`")
            })?;
            if rank.trim().parse::<usize>().ok() == Some(comm.rank()) {
                let mut overrides = args.overrides.clone();
                overrides.push(set.to_string());
                load_file(&args.config, &overrides)?
            } else {
                config
            }
        }
        Err(_) => config,
    };
    let stop = Arc::new(AtomicUsize::new(0));
    let stopping = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let install = || -> std::io::Result<()> {
            // The first signal asks for a checkpoint at the next step boundary; a second one
            // while that is under way exits at once.
            signal_hook::flag::register_conditional_shutdown(
                signal,
                i32::from(EXIT_SIGINT),
                Arc::clone(&stopping),
            )?;
            signal_hook::flag::register(signal, Arc::clone(&stopping))?;
            signal_hook::flag::register_usize(signal, Arc::clone(&stop), signal as usize)?;
            Ok(())
        };
        install()
            .map_err(|e| anyhow::anyhow!("cannot install the handler of signal {signal}: {e}"))?;
    }
    use std::io::IsTerminal;
    let outcome = sepdist_train::train(
        TrainRequest {
            config,
            resume: args.resume,
            init_from: args.init_from,
            heap,
            stop,
            terminal: std::io::stderr().is_terminal(),
            hooks: hooks()?,
        },
        comm.as_ref(),
    )?;
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
            if rank == 0 {
                println!(
                    "stopped by signal {signal} after step {step}; checkpoint {} (resume with --resume auto)",
                    checkpoint.display()
                );
            }
            Ok(if signal == signal_hook::consts::SIGTERM as usize {
                EXIT_SIGTERM
            } else {
                EXIT_SIGINT
            })
        }
    }
}
