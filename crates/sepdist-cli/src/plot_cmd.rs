//! `sepdist plot RUN_DIR [-o OUT_DIR]`: figures of a run's metrics.jsonl (the drawing lives in
//! `sepdist_train::plot`).

use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Run folder holding metrics.jsonl (a training run's output_dir).
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
    /// Folder for loss, lr, memory and sdr as .png and .svg [default: RUN_DIR/plots].
    #[arg(short = 'o', long = "out", value_name = "OUT_DIR")]
    pub out: Option<PathBuf>,
}

pub fn run(args: PlotArgs) -> Result<u8, crate::Failure> {
    let out = args.out.unwrap_or_else(|| args.run_dir.join("plots"));
    let report = sepdist_train::plot::plot_run(&args.run_dir, &out)?;
    for (figure, why) in &report.skipped {
        eprintln!("skipped {figure}: {why}");
    }
    for path in &report.written {
        println!("wrote {}", path.display());
    }
    Ok(0)
}
