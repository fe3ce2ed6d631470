//! `sepdist separate` (songs → one WAV per source) and `sepdist eval` (uSDR and cSDR of a
//! checkpoint on a MUSDB18-HQ split, or of existing estimates).

use crate::{EXIT_FAILURE, EXIT_USAGE, Failure};
use anyhow::{Context, anyhow};
use clap::Args;
use sepdist_config::DeviceChoice;
use sepdist_train::evaluate::{self, Results, TrackResult};
use sepdist_train::infer::{ChunkOptions, Inference, OutputFormat, Window};
use std::path::PathBuf;
use std::time::Instant;

/// Chunking options shared by `separate` and `eval --checkpoint`.
#[derive(Debug, Args)]
pub struct ChunkArgs {
    /// Chunk length in seconds (default: the training segment length).
    #[arg(long, value_name = "X")]
    pub chunk_seconds: Option<f64>,
    /// Fraction of each chunk overlapping the next, in [0, 1).
    #[arg(long, value_name = "F", default_value_t = 0.25)]
    pub overlap: f64,
    /// Chunks per forward pass.
    #[arg(long, value_name = "B", default_value_t = 4)]
    pub batch: usize,
    /// Cross-fade of overlapping chunks: linear, hann or rect (plain average).
    #[arg(long, value_name = "W", default_value = "linear", value_parser = Window::NAMES)]
    pub window: String,
}

impl ChunkArgs {
    fn options(&self, sample_rate: u32) -> Result<ChunkOptions, Failure> {
        let chunk_frames = match self.chunk_seconds {
            Some(s) if !(s.is_finite() && s > 0.0) => {
                return Err(usage(format!("--chunk-seconds {s} must be positive")));
            }
            Some(s) => Some((s * f64::from(sample_rate)).round() as usize),
            None => None,
        };
        let window = Window::parse(&self.window)
            .ok_or_else(|| usage(format!("--window {}: unknown window", self.window)))?;
        Ok(ChunkOptions {
            chunk_frames,
            overlap: self.overlap,
            batch: self.batch,
            window,
        })
    }
}

fn usage(message: String) -> Failure {
    Failure {
        code: EXIT_USAGE,
        error: anyhow!(message),
    }
}

#[derive(Debug, Args)]
pub struct SeparateArgs {
    /// Checkpoint directory, or a run directory / its checkpoints/ (best_model, else latest).
    #[arg(long, value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// Songs to separate: WAV, FLAC, MP3, MP4/M4A (AAC); any rate, mono or stereo.
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// Output folder: OUTDIR/<input stem>/<source>.wav.
    #[arg(short = 'o', long = "out", value_name = "OUTDIR")]
    pub out: PathBuf,
    /// Write 16-bit PCM instead of 32-bit float.
    #[arg(long)]
    pub pcm16: bool,
    /// Device to separate on: auto (the GPU when this build has CUDA and one opens, else the
    /// CPU), cpu or cuda. The checkpoint's training.device plays no part.
    #[arg(long, value_name = "DEVICE", default_value = "auto", value_parser = DeviceChoice::NAMES)]
    pub device: String,
    #[command(flatten)]
    pub chunk: ChunkArgs,
}

/// The device of `--device` for this process (its local rank when a launcher started several).
fn device(name: &str) -> Result<sepdist_train::device::Selected, Failure> {
    let choice = DeviceChoice::parse(name)
        .ok_or_else(|| usage(format!("--device {name}: expected auto, cpu or cuda")))?;
    let local_rank = sepdist_comm::Topology::from_env().map_or(0, |t| t.local_rank);
    let selected = sepdist_train::device::select(choice, local_rank)?;
    if let Some(note) = &selected.note {
        eprintln!("{note}");
    }
    Ok(selected)
}

pub fn run_separate(args: SeparateArgs) -> Result<u8, Failure> {
    let device = device(&args.device)?.device;
    let inference = Inference::load_on(&args.checkpoint, &device)
        .with_context(|| format!("cannot load checkpoint {}", args.checkpoint.display()))?;
    let options = args.chunk.options(inference.sample_rate())?;
    inference
        .chunking(&options)
        .map_err(|e| usage(e.to_string()))?;
    let format = if args.pcm16 {
        OutputFormat::I16
    } else {
        OutputFormat::F32
    };
    let mut failed = 0;
    for (i, input) in args.inputs.iter().enumerate() {
        let stem = input
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("input{i}"));
        let dir = args.out.join(&stem);
        eprintln!(
            "[{}/{}] separating {}",
            i + 1,
            args.inputs.len(),
            input.display()
        );
        let start = Instant::now();
        match inference.separate_file(input, &dir, &options, format) {
            Ok((_, frames)) => eprintln!(
                "[{}/{}] wrote {} sources of {:.1} s to {} in {:.1} s",
                i + 1,
                args.inputs.len(),
                inference.sources().len(),
                frames as f64 / f64::from(inference.sample_rate()),
                dir.display(),
                start.elapsed().as_secs_f64()
            ),
            Err(e) => {
                failed += 1;
                eprintln!("error: {}", crate::error_message(&anyhow::Error::new(e)));
            }
        }
    }
    if failed > 0 {
        return Err(Failure {
            code: EXIT_FAILURE,
            error: anyhow!("{failed} of {} inputs failed", args.inputs.len()),
        });
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Checkpoint to evaluate (separates the split first).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["estimates", "references"])]
    pub checkpoint: Option<PathBuf>,
    /// Split of the dataset to separate and score.
    #[arg(long, default_value = "test", value_parser = ["test", "train"])]
    pub split: String,
    /// MUSDB18-HQ root (default: the checkpoint config's dataset.root).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Existing estimates: DIR/<track>/<source>.wav (needs --references).
    #[arg(long, value_name = "DIR", requires = "references")]
    pub estimates: Option<PathBuf>,
    /// References: DIR/<track>/<source>.wav (and mixture.wav for the baseline).
    #[arg(long, value_name = "DIR", requires = "estimates")]
    pub references: Option<PathBuf>,
    /// Where results.json and results.csv go (default: the checkpoint's run directory, or the
    /// estimates folder).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Device to separate on with --checkpoint: auto (the GPU when this build has CUDA and
    /// one opens, else the CPU), cpu or cuda.
    #[arg(long, value_name = "DEVICE", value_parser = DeviceChoice::NAMES, conflicts_with_all = ["estimates", "references"])]
    pub device: Option<String>,
    #[command(flatten)]
    pub chunk: ChunkArgs,
}

fn print_track(t: &TrackResult) {
    let cell = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
    let parts: Vec<String> = t
        .sources
        .iter()
        .map(|(s, x)| format!("{s} {}/{}", cell(Some(x.usdr)), cell(x.csdr)))
        .collect();
    eprintln!("{}: uSDR/cSDR dB: {}", t.name, parts.join(", "));
}

fn print_summary(r: &Results) {
    println!(
        "{:<12} {:>9} {:>9} {:>15}",
        "source", "uSDR", "cSDR", "uSDR(mixture)"
    );
    for s in &r.sources {
        let m = r.median.get(s);
        let get = |k: &str| {
            m.and_then(|m| m.get(k).copied().flatten())
                .map_or("-".to_string(), |v| format!("{v:.3}"))
        };
        println!(
            "{s:<12} {:>9} {:>9} {:>15}",
            get("usdr"),
            get("csdr"),
            get("usdr_mixture")
        );
    }
}

pub fn run_eval(args: EvalArgs) -> Result<u8, Failure> {
    let (results, default_out) = match (&args.checkpoint, &args.estimates, &args.references) {
        (Some(ckpt), None, None) => {
            let device = device(args.device.as_deref().unwrap_or("auto"))?.device;
            let inference = Inference::load_on(ckpt, &device)
                .with_context(|| format!("cannot load checkpoint {}", ckpt.display()))?;
            let options = args.chunk.options(inference.sample_rate())?;
            inference
                .chunking(&options)
                .map_err(|e| usage(e.to_string()))?;
            let root = args
                .root
                .clone()
                .unwrap_or_else(|| inference.config().dataset.root.clone());
            eprintln!(
                "evaluating {} (step {}) on {}/{}",
                inference.checkpoint().display(),
                inference.step(),
                root.display(),
                args.split
            );
            let r = evaluate::evaluate_checkpoint(
                &inference,
                &root,
                &args.split,
                &options,
                print_track,
            )?;
            // Beside the run, else the checkpoint directory, else the exported file.
            let ckpt = inference.checkpoint();
            let out = inference.run_dir().unwrap_or_else(|| {
                if ckpt.is_file() {
                    ckpt.parent()
                        .map_or_else(PathBuf::new, std::path::Path::to_path_buf)
                } else {
                    ckpt.to_path_buf()
                }
            });
            (r, out)
        }
        (None, Some(est), Some(refs)) => (
            evaluate::evaluate_dirs(est, refs, print_track)?,
            est.clone(),
        ),
        _ => {
            return Err(usage(
                "give --checkpoint PATH, or --estimates DIR with --references DIR".into(),
            ));
        }
    };
    print_summary(&results);
    let out = args.out.unwrap_or(default_out);
    let (json, csv) = results.write(&out)?;
    eprintln!("wrote {} and {}", json.display(), csv.display());
    Ok(0)
}
