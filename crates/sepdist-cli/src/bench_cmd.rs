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
    /// Device to run on (same as --set training.device=...): auto (the GPU of this rank's
    /// local rank when this build has CUDA and it opens, else the CPU), cpu or cuda.
    #[arg(long, value_name = "DEVICE", value_parser = sepdist_config::DeviceChoice::NAMES)]
    pub device: Option<String>,
    /// Run the fused ops as their composed twins (candle ops) with the blocks' composed
    /// backwards and the loss' STFT L1 as DFT matmuls, as a GPU runs them today (the attention
    /// has CUDA kernels, the mixture's STFT and the masked iSTFT run on the CPU): the GPU's
    /// memory on the CPU, for A/B against the fused kernels.
    #[arg(long)]
    pub composed_ops: bool,
    /// Also split the forward and backward time by block kind (band split, time and band
    /// transformers, head); the device is synchronized at every block boundary, which costs a
    /// little of the step.
    #[arg(long)]
    pub profile: bool,
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

pub fn run(
    args: BenchArgs,
    heap: &'static dyn sepdist_train::memory::HeapCounter,
) -> Result<u8, crate::Failure> {
    let overrides = crate::train_cmd::with_device(&args.overrides, args.device.as_deref());
    let config = load_file(&args.config, &overrides)?;
    let comm = crate::train_cmd::communicator(&config)?;
    let run = || {
        bench(
            &config,
            args.steps,
            args.warmup,
            args.profile,
            heap,
            comm.as_ref(),
        )
    };
    let r = if args.composed_ops {
        sepdist_model::ops::with_composed_ops(run)?
    } else {
        run()?
    };
    if comm.rank() != 0 {
        return Ok(0);
    }
    let recompute = config.training.gradient_checkpointing;
    let step = r.median_step();
    println!(
        "{}: {} parameters, global batch {} on {} rank(s) × {} thread(s) on {} in {}, {} timed steps after {} warm-up",
        args.config.display(),
        r.parameters,
        r.global_batch,
        r.world_size,
        r.threads,
        r.device,
        r.precision,
        r.step_seconds.len(),
        args.warmup
    );
    if args.composed_ops {
        println!("ops                composed (as on a GPU: --composed-ops)");
    }
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
    if let Some((allocated, reserved)) = r.peak_device {
        println!(
            "peak {:<13} {:9.3} GiB allocated, {:.3} GiB reserved (memory pool)",
            r.device,
            gib(allocated),
            gib(reserved)
        );
    }
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
    if let Some(rows) = &r.profile {
        print_profile(rows, &r.step_seconds);
    }
    Ok(0)
}

/// The block kinds' forward and backward seconds, mean per timed step, and their shares of the
/// mean step (what the blocks leave is data, gradient sync, optimizer and the engine's own work).
fn print_profile(rows: &[sepdist_train::bench::ProfileRow], step_seconds: &[f64]) {
    let mean_step = step_seconds.iter().sum::<f64>() / step_seconds.len().max(1) as f64;
    let share = |s: f64| 100.0 * s / mean_step;
    println!(
        "profile            mean per step {mean_step:.4} s, device synchronized at block boundaries"
    );
    println!(
        "  {:<18} {:>6} {:>11} {:>11} {:>12} {:>7}",
        "block kind", "blocks", "forward s", "backward s", "per block s", "share"
    );
    let mut in_blocks = 0.0;
    for row in rows {
        let total = row.forward + row.backward;
        in_blocks += total;
        println!(
            "  {:<18} {:>6} {:>11.4} {:>11.4} {:>12.4} {:>6.1} %",
            row.kind,
            row.blocks,
            row.forward,
            row.backward,
            total / row.blocks as f64,
            share(total)
        );
    }
    println!(
        "  {:<18} {:>6} {:>11} {:>11} {:>12} {:>6.1} %",
        "outside the blocks",
        "",
        "",
        "",
        "",
        share(mean_step - in_blocks)
    );
}
