//! Inference from a checkpoint: the separator rebuilt from the checkpoint's config snapshot,
//! weights loaded with the fingerprint checked, and songs of any length separated chunk by
//! chunk with overlap-add, so that memory is bounded by the chunk (times the batch), not the
//! song.
//!
//! Overlap-add: chunks of `C` frames start every `H = C − O` frames (`O` the overlap); each
//! output chunk is weighted by a [`Window`] that is 1 in the middle and ramps over `O` frames at
//! both ends (linear by default, `(i + 1)/(O + 1)`, so that two overlapping ramps sum to exactly
//! 1); the accumulated sum is divided by the accumulated window anyway, which keeps the first
//! and last frames of the song (covered by one ramp only) exact. The window never reaches 0, so
//! the division is always safe. The song is zero-padded to whole chunks.

use crate::checkpoint::{self, CheckpointError, LATEST_FILE, Loaded};
use crate::engine::FlatLayout;
use candle_core::{Device, Tensor};
use sepdist_config::{Config, ConfigError, ConfigSource};
use sepdist_data::DataError;
use sepdist_model::{ModelError, Separator};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{}: the checkpoint's config snapshot does not load: {source}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{0}")]
    Argument(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot write WAV: {source}", path.display())]
    Wav {
        path: PathBuf,
        #[source]
        source: hound::Error,
    },
}

impl From<candle_core::Error> for InferError {
    fn from(e: candle_core::Error) -> Self {
        InferError::Model(ModelError::from(e))
    }
}

pub type Result<T> = std::result::Result<T, InferError>;

/// Chunking of [`Inference::separate_with`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChunkOptions {
    /// Frames per chunk; `None`: the training `dataset.segment_length`.
    pub chunk_frames: Option<usize>,
    /// Fraction of a chunk shared with the next one, in `[0, 1)`.
    pub overlap: f64,
    /// Chunks per forward pass.
    pub batch: usize,
    /// Cross-fade of overlapping chunks.
    pub window: Window,
}

impl Default for ChunkOptions {
    fn default() -> Self {
        ChunkOptions {
            chunk_frames: None,
            overlap: 0.25,
            batch: 4,
            window: Window::Linear,
        }
    }
}

/// Weight of each frame of a chunk in the overlap-add. Every shape is 1 outside the overlap
/// and, inside it, rises over the first `O` frames and falls over the last `O`; the rise of
/// one chunk and the fall of the previous sum to exactly 1 (linear, hann) or are averaged
/// (rect), and the accumulated sum is divided by the accumulated weight in every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Window {
    /// Linear ramps `(i + 1)/(O + 1)`, as demucs and MSST cross-fade.
    #[default]
    Linear,
    /// Raised-cosine ramps `sin²(π/2 · (i + 1)/(O + 1))`: smooth at both ends of the fade.
    Hann,
    /// No fade: overlapping estimates are averaged with equal weight.
    Rect,
}

impl Window {
    pub const NAMES: [&'static str; 3] = ["linear", "hann", "rect"];

    pub fn parse(name: &str) -> Option<Window> {
        match name {
            "linear" => Some(Window::Linear),
            "hann" => Some(Window::Hann),
            "rect" => Some(Window::Rect),
            _ => None,
        }
    }

    /// The weights of a chunk of `chunk` frames whose first and last `overlap` frames are
    /// shared with its neighbours. Never 0, so that the first and last frames of a song (covered
    /// by one chunk only) stay exact after normalisation.
    pub fn weights(self, chunk: usize, overlap: usize) -> Vec<f32> {
        let ramp = |k: usize| -> f32 {
            let x = k as f64 / (overlap + 1) as f64;
            match self {
                Window::Linear => x as f32,
                Window::Hann => (std::f64::consts::FRAC_PI_2 * x).sin().powi(2) as f32,
                Window::Rect => 1.0,
            }
        };
        (0..chunk)
            .map(|i| {
                if i < overlap {
                    ramp(i + 1)
                } else if i >= chunk - overlap {
                    ramp(chunk - i)
                } else {
                    1.0
                }
            })
            .collect()
    }
}

/// A separator with its weights, ready to separate.
pub struct Inference {
    separator: Separator,
    params: BTreeMap<String, Tensor>,
    config: Config,
    checkpoint: PathBuf,
    step: u64,
    device: Device,
}

impl std::fmt::Debug for Inference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inference")
            .field("checkpoint", &self.checkpoint)
            .field("step", &self.step)
            .finish()
    }
}

/// The checkpoint directory `path` names: a checkpoint itself (it has `meta.json`), or a
/// run directory or its `checkpoints/` folder, where `best_model` is taken, else the one the
/// `latest` pointer names.
pub fn checkpoint_dir(path: &Path) -> Result<PathBuf> {
    if path.join(checkpoint::META_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    for parent in [path.join("checkpoints"), path.to_path_buf()] {
        if parent
            .join("best_model")
            .join(checkpoint::META_FILE)
            .is_file()
        {
            return Ok(parent.join("best_model"));
        }
        let pointer = parent.join(LATEST_FILE);
        if let Ok(name) = std::fs::read_to_string(&pointer) {
            return Ok(parent.join(name.trim()));
        }
    }
    Err(InferError::Argument(format!(
        "{}: not a checkpoint (no meta.json), nor a run directory with checkpoints/best_model or checkpoints/latest",
        path.display()
    )))
}

impl Inference {
    /// Loads a checkpoint (see [`checkpoint_dir`] for what `path` may name), or a weights file
    /// written by `sepdist export`, on the CPU.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_on(path, &Device::Cpu)
    }

    /// [`Inference::load`] onto `device` (`crate::device::select`); the checkpoint's own
    /// `training.device` plays no part (a model trained on a GPU separates on a laptop).
    pub fn load_on(path: &Path, device: &Device) -> Result<Self> {
        if path.is_file() {
            let file = crate::export::read(path)?;
            let separator =
                Separator::with_sources(&file.config.model, &file.config.dataset.sources)?;
            let specs = separator.param_specs();
            let matches = specs.len() == file.weights.len()
                && specs
                    .iter()
                    .zip(&file.weights)
                    .all(|(s, (name, t))| s.name == *name && s.shape == t.shape);
            if !matches {
                return Err(InferError::Argument(format!(
                    "{}: its tensors do not match the model its config describes",
                    path.display()
                )));
            }
            return Self::with_weights(
                separator,
                file.weights,
                file.config,
                path.to_path_buf(),
                file.step,
                device,
            );
        }
        let dir = checkpoint_dir(path)?;
        let meta = checkpoint::read_meta(&dir)?;
        let meta_path = dir.join(checkpoint::META_FILE);
        let config = sepdist_config::load_str(
            ConfigSource {
                name: &meta_path,
                text: &meta.config_yaml,
            },
            &[],
        )
        .map_err(|e| InferError::Config {
            path: meta_path.clone(),
            source: Box::new(e),
        })?;
        let separator = Separator::with_sources(&config.model, &config.dataset.sources)?;
        let fingerprint = FlatLayout::new(separator.param_specs()).fingerprint();
        let Loaded { weights, meta, .. } = checkpoint::load(&dir, Some(&fingerprint))?;
        Self::with_weights(separator, weights, config, dir, meta.step, device)
    }

    fn with_weights(
        separator: Separator,
        weights: Vec<(String, checkpoint::HostTensor)>,
        config: Config,
        checkpoint: PathBuf,
        step: u64,
        device: &Device,
    ) -> Result<Self> {
        let device = device.clone();
        let mut params = BTreeMap::new();
        for (name, t) in weights {
            params.insert(name, Tensor::from_vec(t.data, t.shape, &device)?);
        }
        Ok(Inference {
            separator,
            params,
            config,
            checkpoint,
            step,
            device,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The device the separator runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn sample_rate(&self) -> u32 {
        self.config.dataset.sample_rate
    }

    pub fn sources(&self) -> &[String] {
        &self.config.dataset.sources
    }

    /// The checkpoint directory (or exported weights file) loaded.
    pub fn checkpoint(&self) -> &Path {
        &self.checkpoint
    }

    /// The optimizer step the checkpoint was written at.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The run directory (`RUN/checkpoints/NAME` → `RUN`), when the checkpoint sits in one.
    pub fn run_dir(&self) -> Option<PathBuf> {
        let parent = self.checkpoint.parent()?;
        if parent.file_name().is_some_and(|n| n == "checkpoints") {
            parent.parent().map(Path::to_path_buf)
        } else {
            None
        }
    }

    /// Chunk and hop lengths of `options`, validated against the model.
    pub fn chunking(&self, options: &ChunkOptions) -> Result<(usize, usize)> {
        let chunk = options
            .chunk_frames
            .unwrap_or(self.config.dataset.segment_length);
        let min = self.config.model.n_fft / 2 + 1;
        if chunk < min {
            return Err(InferError::Argument(format!(
                "chunk of {chunk} frames is too short for the model (at least n_fft/2 + 1 = {min})"
            )));
        }
        if !(0.0..1.0).contains(&options.overlap) {
            return Err(InferError::Argument(format!(
                "overlap {} must be in [0, 1)",
                options.overlap
            )));
        }
        if options.batch == 0 {
            return Err(InferError::Argument("batch must be at least 1".into()));
        }
        Ok(Self::chunk_and_hop(chunk, options.overlap))
    }

    fn chunk_and_hop(chunk: usize, overlap: f64) -> (usize, usize) {
        let overlap = ((chunk as f64) * overlap).round() as usize;
        (chunk, chunk.saturating_sub(overlap).max(1))
    }

    /// [`Self::chunking`] for a song of `frames` frames: a chunk never exceeds the song (nor
    /// is shorter than the model's minimum), so an oversized `--chunk-seconds` costs no
    /// memory beyond the song itself.
    pub fn chunking_for(&self, options: &ChunkOptions, frames: usize) -> Result<(usize, usize)> {
        let (chunk, hop) = self.chunking(options)?;
        let min = self.config.model.n_fft / 2 + 1;
        let fitted = frames.max(min);
        if chunk <= fitted {
            return Ok((chunk, hop));
        }
        Ok(Self::chunk_and_hop(fitted, options.overlap))
    }

    /// Separates `mixture` (`[2, N]` channel-major at [`Self::sample_rate`]) and returns
    /// `[S, 2, N]`.
    pub fn separate(&self, mixture: &[f32], options: &ChunkOptions) -> Result<Vec<f32>> {
        if mixture.len() % 2 != 0 {
            return Err(InferError::Argument(
                "mixture must be [2, N] (an even number of samples)".into(),
            ));
        }
        let n = mixture.len() / 2;
        let s = self.sources().len();
        let mut out = vec![0.0; s * 2 * n];
        let mut done = 0;
        let (left, right) = mixture.split_at(n);
        self.separate_with(left, right, options, |block, frames| {
            for (k, row) in block.chunks_exact(frames).enumerate() {
                out[k * n + done..k * n + done + frames].copy_from_slice(row);
            }
            done += frames;
            Ok(())
        })?;
        Ok(out)
    }

    /// Streaming form of [`Self::separate`] on the two channels of the mixture:
    /// `sink(block, frames)` receives the separated song in order, in blocks of
    /// `[S, 2, frames]` (one hop each), as soon as no later chunk can change them. Memory: the
    /// chunk batch, one chunk of accumulators, and the input.
    pub fn separate_with(
        &self,
        left: &[f32],
        right: &[f32],
        options: &ChunkOptions,
        mut sink: impl FnMut(&[f32], usize) -> Result<()>,
    ) -> Result<()> {
        if left.len() != right.len() {
            return Err(InferError::Argument(format!(
                "channel lengths differ ({} vs {})",
                left.len(),
                right.len()
            )));
        }
        let n = left.len();
        if n == 0 {
            return Ok(());
        }
        let (chunk, hop) = self.chunking_for(options, n)?;
        let overlap = chunk - hop;
        let rows = 2 * self.sources().len();
        let window = options.window.weights(chunk, overlap);
        let chunks = if n <= chunk {
            1
        } else {
            (n - chunk).div_ceil(hop) + 1
        };
        // Accumulators for frames [base, base + chunk): weighted sum per row and window sum.
        let mut acc = vec![0.0f32; rows * chunk];
        let mut norm = vec![0.0f32; chunk];
        let mut block = vec![0.0f32; rows * hop.max(chunk)];
        let mut base = 0;
        let mut next = 0;
        while next < chunks {
            let count = options.batch.min(chunks - next);
            let mut input = vec![0.0f32; count * 2 * chunk];
            for b in 0..count {
                let start = (next + b) * hop;
                let len = n.saturating_sub(start).min(chunk);
                for (c, channel) in [left, right].into_iter().enumerate() {
                    let dst = (b * 2 + c) * chunk;
                    input[dst..dst + len].copy_from_slice(&channel[start..start + len]);
                }
            }
            let x = Tensor::from_vec(input, (count, 2, chunk), &self.device)?;
            let y = self.separator.forward(&self.params, &x)?;
            let y = y.flatten_all()?.to_vec1::<f32>()?;
            for b in 0..count {
                let k = next + b;
                let out = &y[b * rows * chunk..(b + 1) * rows * chunk];
                for r in 0..rows {
                    let (a, o) = (
                        &mut acc[r * chunk..(r + 1) * chunk],
                        &out[r * chunk..(r + 1) * chunk],
                    );
                    for ((a, o), w) in a.iter_mut().zip(o).zip(&window) {
                        *a += o * w;
                    }
                }
                for (s, w) in norm.iter_mut().zip(&window) {
                    *s += w;
                }
                // Frames before the next chunk's start are final; after the last chunk, all.
                let last = k + 1 == chunks;
                let ready = if last { n - base } else { hop.min(n - base) };
                for r in 0..rows {
                    for i in 0..ready {
                        block[r * ready + i] = acc[r * chunk + i] / norm[i];
                    }
                }
                sink(&block[..rows * ready], ready)?;
                base += ready;
                if !last {
                    for r in 0..rows {
                        let row = &mut acc[r * chunk..(r + 1) * chunk];
                        row.copy_within(hop.., 0);
                        row[chunk - hop..].fill(0.0);
                    }
                    norm.copy_within(hop.., 0);
                    norm[chunk - hop..].fill(0.0);
                }
            }
            next += count;
        }
        Ok(())
    }

    /// Decodes `input` (any format [`sepdist_data::decode`] reads, resampled to the model's
    /// rate) and writes one WAV per source to `out_dir/<source>.wav`, streaming: the outputs
    /// are never held whole in memory. Returns the paths written and the song's frames.
    pub fn separate_file(
        &self,
        input: &Path,
        out_dir: &Path,
        options: &ChunkOptions,
        format: OutputFormat,
    ) -> Result<(Vec<PathBuf>, usize)> {
        let audio = sepdist_data::decode::read_audio(input, self.sample_rate())?.audio;
        std::fs::create_dir_all(out_dir).map_err(|source| InferError::Io {
            path: out_dir.to_path_buf(),
            source,
        })?;
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: self.sample_rate(),
            bits_per_sample: match format {
                OutputFormat::F32 => 32,
                OutputFormat::I16 => 16,
            },
            sample_format: match format {
                OutputFormat::F32 => hound::SampleFormat::Float,
                OutputFormat::I16 => hound::SampleFormat::Int,
            },
        };
        let paths: Vec<PathBuf> = self
            .sources()
            .iter()
            .map(|s| out_dir.join(format!("{s}.wav")))
            .collect();
        let mut writers = Vec::with_capacity(paths.len());
        for p in &paths {
            writers.push(
                hound::WavWriter::create(p, spec).map_err(|source| InferError::Wav {
                    path: p.clone(),
                    source,
                })?,
            );
        }
        let frames = audio.frames();
        self.separate_with(&audio.left, &audio.right, options, |block, n| {
            for (s, w) in writers.iter_mut().enumerate() {
                let (l, r) = (
                    &block[(2 * s) * n..(2 * s + 1) * n],
                    &block[(2 * s + 1) * n..(2 * s + 2) * n],
                );
                for (&a, &b) in l.iter().zip(r) {
                    for v in [a, b] {
                        let written =
                            match format {
                                OutputFormat::F32 => w.write_sample(v),
                                // Full scale ±1.0, rounded and clamped (as `wav::write` does).
                                OutputFormat::I16 => w.write_sample(
                                    (v * 32767.0).round().clamp(-32768.0, 32767.0) as i16,
                                ),
                            };
                        written.map_err(|source| InferError::Wav {
                            path: paths[s].clone(),
                            source,
                        })?;
                    }
                }
            }
            Ok(())
        })?;
        for (w, p) in writers.into_iter().zip(&paths) {
            w.finalize().map_err(|source| InferError::Wav {
                path: p.clone(),
                source,
            })?;
        }
        Ok((paths, frames))
    }
}

/// Sample format of separated WAVs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    F32,
    I16,
}

#[cfg(test)]
mod tests {
    use super::Window;

    #[test]
    fn overlapping_fades_sum_to_one_and_never_vanish() {
        let (chunk, overlap) = (20, 7);
        let hop = chunk - overlap;
        for window in [Window::Linear, Window::Hann] {
            let w = window.weights(chunk, overlap);
            assert!(w.iter().all(|&x| x > 0.0 && x <= 1.0), "{window:?}: {w:?}");
            assert!(w[overlap..hop].iter().all(|&x| x == 1.0));
            // Fall of one chunk plus rise of the next, frame by frame.
            for i in 0..overlap {
                let sum = w[hop + i] + w[i];
                assert!((sum - 1.0).abs() < 1e-6, "{window:?} frame {i}: {sum}");
            }
        }
        let rect = Window::Rect.weights(chunk, overlap);
        assert!(rect.iter().all(|&x| x == 1.0));
    }

    #[test]
    fn hann_fade_is_smoother_than_linear_at_its_ends() {
        let (lin, hann) = (Window::Linear.weights(64, 16), Window::Hann.weights(64, 16));
        assert!(hann[0] < lin[0] && hann[15] > lin[15]);
        for name in Window::NAMES {
            assert!(Window::parse(name).is_some());
        }
        assert_eq!(Window::parse("triangle"), None);
    }
}
