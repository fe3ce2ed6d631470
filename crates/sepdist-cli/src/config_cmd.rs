use clap::{Args, Subcommand};
use sepdist_config::{Config, load_file};
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load, override and validate a config; print `ok` or every problem found.
    Check(ConfigArgs),
    /// Print the resolved config (defaults filled in) and its derived values.
    Show {
        #[command(flatten)]
        args: ConfigArgs,
        /// Also show the effective batch for this world size.
        #[arg(long, value_name = "N")]
        world_size: Option<usize>,
    },
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// YAML config file.
    pub file: PathBuf,
    /// Override a key, e.g. --set training.batch_size=2 or --set model.ffn_hidden_dim=[768,768].
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

pub fn run(cmd: ConfigCommand) -> Result<u8, crate::Failure> {
    match cmd {
        ConfigCommand::Check(args) => {
            load_file(&args.file, &args.overrides)?;
            println!("{}: ok", args.file.display());
        }
        ConfigCommand::Show { args, world_size } => {
            let config = load_file(&args.file, &args.overrides)?;
            print!("{}", config.to_yaml());
            print!("{}", derived(&config, world_size));
        }
    }
    Ok(0)
}

/// Derived values as YAML comments, so the output still loads as a config.
fn derived(c: &Config, world_size: Option<usize>) -> String {
    let m = &c.model;
    let t = &c.training;
    let frames = m.frames(c.dataset.segment_length);
    let mut out = String::from("# derived:\n");
    let mut line = |text: String| {
        let _ = writeln!(out, "#   {text}");
    };
    line(format!(
        "frequency bins: {} in {} bands",
        m.freq_bins(),
        m.bands.widths().len()
    ));
    line(format!(
        "frames per segment: {frames} ({} samples, {:.2} s)",
        c.dataset.segment_length,
        c.dataset.segment_length as f64 / f64::from(c.dataset.sample_rate.max(1))
    ));
    line(format!("head dim: {}", m.head_dim()));
    line(format!("mask hidden dim: {}", m.mask_hidden()));
    let sources = c.dataset.sources.len();
    line(format!(
        "parameters: {} ({:.1} MB in fp32)",
        thousands(sepdist_model::param_count(m, sources)),
        sepdist_model::param_count(m, sources) as f64 * 4.0 / 1e6
    ));
    let forward = sepdist_model::flops_per_sample(m, sources, c.dataset.segment_length);
    line(format!(
        "FLOPs per sample: {} forward, about {} forward+backward (3×)",
        flops(forward),
        flops(3.0 * forward)
    ));
    let mut sizes = vec![1, 2, 4, 8];
    if let Some(w) = world_size.filter(|w| !sizes.contains(w)) {
        sizes.push(w);
        sizes.sort_unstable();
    }
    for w in sizes {
        let g = t.effective_batch(w);
        line(format!(
            "world size {w}: effective batch {} × {} × {w} = {g}, {} optimizer steps per epoch, {} per step",
            t.batch_size,
            t.gradient_accumulation_steps,
            c.dataset.samples_per_epoch.div_ceil(g.max(1)),
            flops(3.0 * forward * g as f64)
        ));
    }
    out
}

/// `118872868` → `118,872,868`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// `4.62 TFLOP`, `812 MFLOP`, ...
fn flops(x: f64) -> String {
    let units = [
        (1e15, "PFLOP"),
        (1e12, "TFLOP"),
        (1e9, "GFLOP"),
        (1e6, "MFLOP"),
    ];
    for (scale, unit) in units {
        if x >= scale {
            return format!("{:.3} {unit}", x / scale);
        }
    }
    format!("{x:.0} FLOP")
}
