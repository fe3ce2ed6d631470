use clap::Parser;
use std::process::ExitCode;

/// Counts heap bytes for the `mem=` figures and the memory metrics.
#[global_allocator]
static HEAP: peak_alloc::PeakAlloc = peak_alloc::PeakAlloc;

fn main() -> ExitCode {
    let cli = sepdist_cli::Cli::parse();
    match sepdist_cli::run(cli, &HEAP) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("error: {}", sepdist_cli::error_message(&failure.error));
            ExitCode::from(failure.code)
        }
    }
}
