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
    let mut sizes = vec![1, 2, 4, 8];
    if let Some(w) = world_size.filter(|w| !sizes.contains(w)) {
        sizes.push(w);
        sizes.sort_unstable();
    }
    for w in sizes {
        let g = t.effective_batch(w);
        line(format!(
            "world size {w}: effective batch {} × {} × {w} = {g}, {} optimizer steps per epoch",
            t.batch_size,
            t.gradient_accumulation_steps,
            c.dataset.samples_per_epoch.div_ceil(g.max(1))
        ));
    }
    out
}
