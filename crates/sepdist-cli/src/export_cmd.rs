//! `sepdist export --checkpoint PATH -o model.safetensors [--ema]`: one weights file with the
//! model config in its metadata, which `separate` and `eval` take as `--checkpoint`.

use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Checkpoint directory, or a run directory / its checkpoints/ (best_model, else latest).
    #[arg(long, value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// The file to write (safetensors).
    #[arg(short = 'o', long = "out", value_name = "FILE")]
    pub out: PathBuf,
    /// Export the EMA of the weights (`training.ema`) instead of the weights.
    #[arg(long)]
    pub ema: bool,
}

pub fn run(args: ExportArgs) -> Result<u8, crate::Failure> {
    let e = sepdist_train::export::export(&args.checkpoint, &args.out, args.ema)?;
    println!(
        "wrote {} ({} of {} tensors, {} parameters, step {}) from {}",
        args.out.display(),
        if e.ema { "EMA" } else { "weights" },
        e.tensors,
        e.parameters,
        e.step,
        e.checkpoint.display()
    );
    Ok(0)
}
