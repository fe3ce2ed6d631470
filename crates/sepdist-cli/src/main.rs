use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = sepdist_cli::Cli::parse();
    match sepdist_cli::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("error: {}", sepdist_cli::error_message(&failure.error));
            ExitCode::from(failure.code)
        }
    }
}
