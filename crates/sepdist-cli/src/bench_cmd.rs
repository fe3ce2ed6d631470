//! `sepdist bench --config X [--steps N] [--warmup W]`: the training step of a config timed
//! phase by phase (the measurement lives in `sepdist_train::bench`). Under `mpirun` every rank
//! runs it and rank 0 prints.

use clap::Args;
use sepdist_config::load_file;
use sepdist_train::bench::{PHASES, bench};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Config file (YAML).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Override a config key, e.g. `--set training.batch_size=1` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Optimizer steps timed.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub steps: usize,
    /// Optimizer steps run first and not timed.
    #[arg(long, default_value_t = 2, value_name = "W")]
    pub warmup: usize,
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

pub fn run(
    args: BenchArgs,
    heap: &'static dyn sepdist_train::memory::HeapCounter,
) -> Result<u8, crate::Failure> {
    let config = load_file(&args.config, &args.overrides)?;
    let comm = crate::train_cmd::communicator(&config)?;
    let r = bench(&config, args.steps, args.warmup, heap, comm.as_ref())?;
    if comm.rank() != 0 {
        return Ok(0);
    }
    let recompute = config.training.gradient_checkpointing;
    let step = r.median_step();
    println!(
        "{}: {} parameters, global batch {} on {} rank(s) × {} thread(s), {} timed steps after {} warm-up",
        args.config.display(),
        r.parameters,
        r.global_batch,
        r.world_size,
        r.threads,
        r.step_seconds.len(),
        args.warmup
    );
    println!("median step        {step:9.4} s");
    println!("samples/s          {:9.3}", r.samples_per_second());
    for (name, seconds) in PHASES.iter().zip(r.phase_seconds) {
        println!(
            "  {name:<16} {seconds:9.4} s  {:5.1} %",
            100.0 * seconds / step
        );
    }
    println!("peak heap          {:9.3} GiB", gib(r.peak_heap));
    println!("peak RSS           {:9.3} GiB", gib(r.peak_rss));
    println!(
        "model FLOPs        {:9.3} GFLOP forward per sample, {:.3} GFLOP per step ({}× forward)",
        r.forward_flops_per_sample / 1e9,
        (if recompute { 4.0 } else { 3.0 }) * r.forward_flops_per_sample * r.global_batch as f64
            / 1e9,
        if recompute { 4 } else { 3 }
    );
    println!(
        "achieved           {:9.3} GFLOP/s",
        r.achieved_flops(recompute) / 1e9
    );
    Ok(0)
}
