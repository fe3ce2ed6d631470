//! The `sepdist` command line: clap definitions and subcommands. `main` only parses, calls
//! [`run`] and maps the outcome to an exit code.

mod config_cmd;
mod data_cmd;

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
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a config file or print it resolved.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// Generate the synthetic dataset or check a dataset folder.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
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
        let code = if error.is::<sepdist_config::ConfigError>() {
            EXIT_USAGE
        } else {
            EXIT_FAILURE
        };
        Failure { code, error }
    }
}

/// Runs a parsed command line. `Ok(code)` carries a non-zero code for commands that
/// succeed in running but report a negative result (`data check` finding problems).
pub fn run(cli: Cli) -> Result<u8, Failure> {
    match cli.command {
        Command::Config(cmd) => config_cmd::run(cmd),
        Command::Data(cmd) => data_cmd::run(cmd),
    }
}

/// One line per error: the message followed by its causes, skipping a cause whose text the
/// message already contains (library errors often quote their source). Never a backtrace.
pub fn error_message(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}
