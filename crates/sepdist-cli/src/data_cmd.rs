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
    /// Convert a MUSDB18 `.stem.mp4` dataset (SRC/train and SRC/test holding `<track>.stem.mp4`)
    /// to the MUSDB18-HQ WAV layout in DST (DST/<split>/<track>/{mixture,drums,bass,other,
    /// vocals}.wav). Tracks already converted are skipped; a file that fails is reported and the
    /// others continue (exit code 1 at the end).
    Convert(ConvertArgs),
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WavFormat {
    /// 32-bit float (lossless for the decoded AAC).
    F32,
    /// 16-bit integer (half the size).
    Pcm16,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Dataset of `.stem.mp4` files (with train/ and test/).
    #[arg(value_name = "SRC")]
    pub src: PathBuf,
    /// Output folder (MUSDB18-HQ layout).
    #[arg(value_name = "DST")]
    pub dst: PathBuf,
    /// Sample encoding of the WAVs.
    #[arg(long, value_enum, default_value = "f32")]
    pub format: WavFormat,
    /// Sample rate of the WAVs in Hz (other rates are resampled).
    #[arg(long, value_name = "HZ", default_value_t = 44_100)]
    pub sample_rate: u32,
    /// Convert tracks again even when their WAVs exist and are newer than the `.stem.mp4`.
    #[arg(long)]
    pub force: bool,
}

pub fn run(cmd: DataCommand) -> Result<u8, crate::Failure> {
    match cmd {
        DataCommand::Synth(args) => synth(args),
        DataCommand::Check(args) => check(args),
        DataCommand::Convert(args) => convert(args),
    }
}

fn convert(args: ConvertArgs) -> Result<u8, crate::Failure> {
    use sepdist_data::stem::Progress;
    let format = match args.format {
        WavFormat::F32 => sepdist_data::SampleFormat::F32,
        WavFormat::Pcm16 => sepdist_data::SampleFormat::I16,
    };
    let report = sepdist_data::convert_dataset(
        &args.src,
        &args.dst,
        args.sample_rate,
        format,
        args.force,
        |i, n, name, progress| match progress {
            Progress::Converted => eprintln!("[{i}/{n}] {name}: converted"),
            Progress::Skipped => eprintln!("[{i}/{n}] {name}: already converted, skipped"),
            Progress::Failed(e) => eprintln!("[{i}/{n}] {name}: error: {e}"),
        },
    )?;
    println!(
        "{}: {} converted, {} skipped, {} failed",
        args.dst.display(),
        report.converted,
        report.skipped,
        report.failed.len()
    );
    if report.failed.is_empty() {
        Ok(0)
    } else {
        for e in &report.failed {
            eprintln!("error: {e}");
        }
        Ok(crate::EXIT_FAILURE)
    }
}

fn synth(args: SynthArgs) -> Result<u8, crate::Failure> {
    let config = args.dataset.resolve()?;
    let d = &config.dataset;
    let out = args.out.unwrap_or_else(|| d.root.clone());
    let tracks = args.tracks.unwrap_or(d.synthetic.tracks);
    let seconds = args.seconds.unwrap_or(d.synthetic.seconds);
    if let Some(why) = sepdist_config::synthetic_too_large(tracks, seconds, d.sample_rate) {
        return Err(crate::Failure {
            code: crate::EXIT_USAGE,
            error: anyhow::anyhow!("cannot generate: {why}"),
        });
    }
    let summary = sepdist_data::generate(
        &out,
        tracks,
        seconds,
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
