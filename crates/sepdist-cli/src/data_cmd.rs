use clap::{Args, Subcommand};
use sepdist_config::{Config, load_file};
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Write the synthetic dataset (MUSDB18-HQ layout: train/ and test/ track folders with
    /// drums, bass, other, vocals and mixture WAVs). Deterministic from the seed.
    Synth(SynthArgs),
    /// List every problem of a dataset folder (unreadable or truncated WAV, missing stem,
    /// wrong sample rate, length mismatch, silence-only track); exit code 1 if any.
    Check(CheckArgs),
}

/// Dataset settings from a config file; flags given explicitly win over it.
#[derive(Debug, Args)]
pub struct FromConfig {
    /// Take defaults (dataset.root, sample_rate, sources, synthetic.*) from this config.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override a config key (with --config).
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "config")]
    pub overrides: Vec<String>,
    /// Sample rate in Hz [default: 44100, or the config's].
    #[arg(long, value_name = "HZ")]
    pub sample_rate: Option<u32>,
    /// Source names, comma-separated [default: drums,bass,other,vocals, or the config's].
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pub sources: Option<Vec<String>>,
}

impl FromConfig {
    fn resolve(&self) -> Result<Config, crate::Failure> {
        let mut config = match &self.config {
            Some(path) => load_file(path, &self.overrides)?,
            None => Config::default(),
        };
        if let Some(rate) = self.sample_rate {
            config.dataset.sample_rate = rate;
        }
        if let Some(sources) = &self.sources {
            config.dataset.sources = sources.clone();
        }
        Ok(config)
    }
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output folder [default: the config's dataset.root; required without --config].
    #[arg(long, value_name = "DIR", required_unless_present = "config")]
    pub out: Option<PathBuf>,
    /// Number of tracks; about a fifth (at least one) form the test split [default: 10].
    #[arg(long, value_name = "N")]
    pub tracks: Option<usize>,
    /// Length of every track in seconds [default: 20].
    #[arg(long, value_name = "S")]
    pub seconds: Option<f32>,
    /// Generator seed [default: 1234].
    #[arg(long, value_name = "K")]
    pub seed: Option<u64>,
    #[command(flatten)]
    pub dataset: FromConfig,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Dataset folder (with train/ and test/) [default: the config's dataset.root].
    #[arg(value_name = "ROOT", required_unless_present = "config")]
    pub root: Option<PathBuf>,
    #[command(flatten)]
    pub dataset: FromConfig,
}

pub fn run(cmd: DataCommand) -> Result<u8, crate::Failure> {
    match cmd {
        DataCommand::Synth(args) => synth(args),
        DataCommand::Check(args) => check(args),
    }
}

fn synth(args: SynthArgs) -> Result<u8, crate::Failure> {
    let config = args.dataset.resolve()?;
    let d = &config.dataset;
    let out = args.out.unwrap_or_else(|| d.root.clone());
    let summary = sepdist_data::generate(
        &out,
        args.tracks.unwrap_or(d.synthetic.tracks),
        args.seconds.unwrap_or(d.synthetic.seconds),
        args.seed.unwrap_or(d.synthetic.seed),
        d.sample_rate,
        &d.sources,
    )?;
    println!(
        "wrote {}: {} train and {} test tracks of {:.2} s at {} Hz",
        summary.root.display(),
        summary.train.len(),
        summary.test.len(),
        summary.frames as f64 / f64::from(summary.sample_rate),
        summary.sample_rate
    );
    Ok(0)
}

fn check(args: CheckArgs) -> Result<u8, crate::Failure> {
    let config = args.dataset.resolve()?;
    let d = &config.dataset;
    let root = args.root.unwrap_or_else(|| d.root.clone());
    let problems = sepdist_data::check_dataset(&root, &d.sources, d.sample_rate);
    for problem in &problems {
        println!("{problem}");
    }
    if problems.is_empty() {
        println!("{}: no problems", root.display());
        Ok(0)
    } else {
        eprintln!("{}: {} problem(s)", root.display(), problems.len());
        Ok(crate::EXIT_FAILURE)
    }
}
