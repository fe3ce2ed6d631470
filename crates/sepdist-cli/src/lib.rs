//! The `sepdist` command line: clap definitions and subcommands. `main` only parses, calls
//! [`run`] and maps the outcome to an exit code.

mod bench_cmd;
mod config_cmd;
mod data_cmd;
mod eval_cmd;
mod export_cmd;
mod plan_cmd;
mod plot_cmd;
mod train_cmd;

pub use plan_cmd::EXIT_NO_FIT;
pub use train_cmd::{EXIT_OUT_OF_MEMORY, EXIT_REQUEUE, EXIT_SIGINT, EXIT_SIGTERM, REQUEUE_MARKER};

use clap::{Parser, Subcommand};

/// Exit code of a usage or configuration error (clap uses 2 for usage errors as well).
pub const EXIT_USAGE: u8 = 2;
/// Exit code of any other failure.
pub const EXIT_FAILURE: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "sepdist",
    version,
    about = "Train transformer music-source-separation models (BS-RoFormer, MUSDB18) on CPUs and GPUs",
    long_about = "sepdist trains BS-RoFormer music-source-separation models on MUSDB18-HQ.\n\n\
        Configs are YAML files (see configs/); every key can be overridden with \
        --set section.key=value.",
    arg_required_else_help = true,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// With no subcommand: `train` (so `mpirun -n 4 sepdist --config X` trains).
    #[command(flatten)]
    pub train: Option<train_cmd::TrainArgs>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a separator (the default when no subcommand is given).
    Train(train_cmd::TrainArgs),
    /// Check a config file or print it resolved.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// Generate the synthetic dataset or check a dataset folder.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Separate songs (WAV, FLAC, MP3, M4A) into one WAV per source with a checkpoint.
    Separate(eval_cmd::SeparateArgs),
    /// Score separations in uSDR and museval's cSDR (a checkpoint on a split, or estimates).
    Eval(eval_cmd::EvalArgs),
    /// Plot a run's metrics.jsonl (loss, learning rate, memory, uSDR) as PNG and SVG.
    Plot(plot_cmd::PlotArgs),
    /// Predict per-rank memory and relative step time from a config, for it and its
    /// alternatives; --fit picks the fastest setting that fits a budget.
    Plan(plan_cmd::PlanArgs),
    /// Write a checkpoint's weights (or their EMA) as one file that separate and eval accept.
    Export(export_cmd::ExportArgs),
    /// Time a config's training step phase by phase (median step, samples/s, memory, FLOP/s).
    Bench(bench_cmd::BenchArgs),
}

/// An error with the exit code it ends the process with.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let error = e.into();
        let code =
            if error.is::<sepdist_config::ConfigError>() || error.is::<sepdist_comm::CommError>() {
                EXIT_USAGE
            } else if let Some(sepdist_train::TrainError::Setup(_)) = error.downcast_ref() {
                EXIT_USAGE
            } else if is_cuda_out_of_memory(&error) {
                // bench, separate, eval: the device was too small for what they ran; the
                // same code as training's out-of-memory stop.
                EXIT_OUT_OF_MEMORY
            } else {
                EXIT_FAILURE
            };
        Failure { code, error }
    }
}

/// Runs a parsed command line. `Ok(code)` carries a non-zero code for commands that
/// succeed in running but report a negative result (`data check` finding problems).
/// `heap` is the binary's counting allocator (memory figures of the progress line).
pub fn run(cli: Cli, heap: &'static dyn sepdist_train::memory::HeapCounter) -> Result<u8, Failure> {
    match (cli.command, cli.train) {
        (Some(Command::Train(args)), _) | (None, Some(args)) => train_cmd::run(args, heap),
        (Some(Command::Config(cmd)), _) => config_cmd::run(cmd),
        (Some(Command::Data(cmd)), _) => data_cmd::run(cmd),
        (Some(Command::Separate(args)), _) => eval_cmd::run_separate(args),
        (Some(Command::Eval(args)), _) => eval_cmd::run_eval(args),
        (Some(Command::Plot(args)), _) => plot_cmd::run(args),
        (Some(Command::Plan(args)), _) => plan_cmd::run(args),
        (Some(Command::Export(args)), _) => export_cmd::run(args),
        (Some(Command::Bench(args)), _) => bench_cmd::run(args, heap),
        (None, None) => Err(Failure {
            code: EXIT_USAGE,
            error: anyhow::anyhow!(
                "nothing to do: give a subcommand or --config FILE (see --help)"
            ),
        }),
    }
}

/// One line per error: the message followed by its causes, skipping a cause whose text the
/// message already contains (library errors often quote their source). Never a backtrace.
pub fn error_message(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = without_backtrace(&cause.to_string());
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

/// `text` without the backtrace candle appends to its errors under `RUST_BACKTRACE` (frame
/// lines `  N: symbol` and `      at file:line`): a user needs the message, not the frames.
fn without_backtrace(text: &str) -> String {
    let frame = |line: &str| {
        let t = line.trim_start();
        let indented = t.len() < line.len();
        let numbered = t
            .split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        indented && (numbered || t.starts_with("at "))
    };
    let kept: Vec<&str> = text.lines().filter(|l| !frame(l)).collect();
    kept.join("\n").trim_end().to_string()
}

/// Whether a CUDA out-of-memory error of a tensor op is anywhere in `error`'s chain.
fn is_cuda_out_of_memory(error: &anyhow::Error) -> bool {
    error.chain().any(sepdist_train::oom::is_cuda_out_of_memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cuda_out_of_memory_exits_with_4_and_its_message_has_no_backtrace() {
        // What bench printed on an H200 when the micro-batch did not fit (RUST_BACKTRACE set).
        let text = "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")\n   0: <unknown>\n  \
                    18: __libc_start_main\n             at ./csu/libc-start.c:360:3\n  19: <unknown>";
        let failure = Failure::from(candle_core::Error::Msg(text.into()));
        assert_eq!(failure.code, EXIT_OUT_OF_MEMORY);
        assert_eq!(
            error_message(&failure.error),
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
        );
        // Other errors keep their code and every line that is not a frame.
        let other = Failure::from(anyhow::anyhow!("first line\n  indented detail: kept"));
        assert_eq!(other.code, EXIT_FAILURE);
        assert_eq!(
            error_message(&other.error),
            "first line\n  indented detail: kept"
        );
    }
}
