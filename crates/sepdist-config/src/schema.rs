//! The configuration schema of MODEL.md. Every struct denies unknown keys and fills
//! missing keys from its `Default`, so a partial YAML file is a complete config.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::PathBuf;

/// The whole configuration: the three sections of the originating guide plus `distributed`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub dataset: DatasetConfig,
    pub model: ModelConfig,
    pub training: TrainingConfig,
    pub distributed: DistributedConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFormat {
    /// `wav` when `root/train` holds track folders, `stem_mp4` when it holds `.stem.mp4` files.
    Auto,
    Wav,
    StemMp4,
    /// The generated dataset of `sepdist data synth` (MUSDB18-HQ layout), created when missing.
    Synthetic,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetConfig {
    pub root: PathBuf,
    pub format: DatasetFormat,
    pub sources: Vec<String>,
    pub sample_rate: u32,
    /// Samples per training example.
    pub segment_length: usize,
    /// Training examples per epoch (the epoch length).
    pub samples_per_epoch: usize,
    pub augment: AugmentConfig,
    /// Tracks of the train split held out for validation. Default: the standard 14-track
    /// MUSDB18 validation subset. Names absent from the train split are ignored.
    pub validation_tracks: Vec<String>,
    /// Background loader: decoding threads and batches prepared ahead.
    pub num_workers: usize,
    pub prefetch: usize,
    /// What `format: synthetic` generates when `root` is missing.
    pub synthetic: SyntheticConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Each stem from an independently chosen track and offset.
    pub remix: bool,
    /// Per-stem gain drawn uniformly from `[min, max]`.
    pub gain: [f32; 2],
    pub channel_swap: bool,
    pub polarity_flip: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    /// Tracks in all; about a fifth (at least one) form the test split.
    pub tracks: usize,
    pub seconds: f32,
    pub seed: u64,
}

/// Band layout of the band-split front end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bands {
    /// BS-RoFormer's 62 bands for `n_fft = 2048`: 24×2, 12×4, 8×12, 8×24, 8×48, 128, 129 bins.
    BsRoformer62,
    /// Explicit bin counts per band, summing to `n_fft / 2 + 1`.
    Widths(Vec<usize>),
}

pub const BS_ROFORMER_62: &str = "bs_roformer_62";

impl Bands {
    /// Bin counts per band.
    pub fn widths(&self) -> Vec<usize> {
        match self {
            Bands::BsRoformer62 => {
                let mut w = Vec::with_capacity(62);
                for (count, width) in [(24, 2), (12, 4), (8, 12), (8, 24), (8, 48)] {
                    w.extend(std::iter::repeat_n(width, count));
                }
                w.extend([128, 129]);
                w
            }
            Bands::Widths(w) => w.clone(),
        }
    }
}

impl Serialize for Bands {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Bands::BsRoformer62 => s.serialize_str(BS_ROFORMER_62),
            Bands::Widths(w) => w.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Bands {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct BandsVisitor;
        impl<'de> serde::de::Visitor<'de> for BandsVisitor {
            type Value = Bands;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(
                    f,
                    "a band preset (`{BS_ROFORMER_62}`) or a list of bin counts per band"
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Bands, E> {
                match v {
                    BS_ROFORMER_62 => Ok(Bands::BsRoformer62),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Bands, A::Error> {
                let mut widths = Vec::new();
                while let Some(w) = seq.next_element::<usize>()? {
                    widths.push(w);
                }
                Ok(Bands::Widths(widths))
            }
        }
        d.deserialize_any(BandsVisitor)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub n_fft: usize,
    pub hop_length: usize,
    pub bands: Bands,
    pub n_layers: usize,
    pub emb_dim: usize,
    pub n_heads: usize,
    /// `[time transformer, band transformer]` hidden widths.
    pub ffn_hidden_dim: [usize; 2],
    /// Hidden width of the mask-estimator MLPs; `null` means `4 × emb_dim`.
    pub mask_hidden_dim: Option<usize>,
    /// Number of Linear layers per mask-estimator MLP.
    pub mask_depth: usize,
}

impl ModelConfig {
    pub fn freq_bins(&self) -> usize {
        self.n_fft / 2 + 1
    }
    pub fn head_dim(&self) -> usize {
        self.emb_dim / self.n_heads.max(1)
    }
    pub fn mask_hidden(&self) -> usize {
        self.mask_hidden_dim
            .unwrap_or(self.emb_dim.saturating_mul(4))
    }
    /// STFT frames of a centred transform of `samples` samples.
    pub fn frames(&self, samples: usize) -> usize {
        samples / self.hop_length.max(1) + 1
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// Examples per rank per micro-step.
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub epochs: usize,
    pub optimizer: OptimizerConfig,
    pub lr_schedule: LrScheduleConfig,
    /// Global gradient-norm clip; `null` disables clipping.
    pub grad_clip: Option<f64>,
    /// `fp32`, or `bf16`: mixed precision (parameters' copy and activations in bf16; master
    /// weights, gradients, optimizer state, reduction and loss in fp32).
    pub precision: Precision,
    /// CUDA: fp32 matmuls on TF32 tensor cores and bf16 matmuls with reduced-precision
    /// reductions (cuBLAS); no effect on the CPU.
    pub tf32: bool,
    pub gradient_checkpointing: bool,
    pub seed: u64,
    pub output_dir: PathBuf,
    pub loss: LossConfig,
    /// Ends training after this many optimizer steps (a checkpoint is written); `null`
    /// means `epochs` × steps per epoch.
    pub max_steps: Option<u64>,
    /// Optimizer steps between plain progress lines (and metrics records are every step).
    pub log_every: u64,
    /// Optimizer steps between validations; 0 validates at every epoch end only.
    pub eval_every: u64,
    /// Optimizer steps between periodic checkpoints (`step_NNNNNNNN`); 0 disables them.
    pub checkpoint_every: u64,
    /// Periodic checkpoints kept (older ones are deleted; epoch and best checkpoints stay).
    pub keep_last: usize,
    /// Consecutive non-finite steps (skipped) after which training stops with an error.
    pub max_consecutive_skips: u64,
    /// Exponential moving average of the weights; `null` disables it.
    pub ema: Option<EmaConfig>,
    /// Memory each rank may use (`24GB`, `512MiB` or bytes); `null`: what the device has
    /// free, less `memory_reserve`. Training is refused before anything is allocated when
    /// the planned peak exceeds it; on a CPU the heap is also checked against it at every
    /// step boundary.
    pub memory_budget: Option<ByteSize>,
    /// Kept free of the device's measured free memory (CPU: `MemAvailable` or the cgroup's
    /// headroom) for what the plan does not count (allocator slack, libraries, stacks). Not
    /// subtracted from an explicit `memory_budget`.
    pub memory_reserve: ByteSize,
    /// What an out-of-memory step does: `stop` (exit code 4, the last checkpoint intact) or
    /// `refit` (apply the fitted micro-batch, accumulation and checkpointing, same effective
    /// batch, and redo the step).
    pub on_oom: OnOom,
    /// Where training runs: `auto` (the GPU of this rank's local rank when this build has CUDA
    /// and the device opens, else the CPU), `cpu`, or `cuda` (an error where no GPU opens).
    pub device: DeviceChoice,
    /// CUDA: bytes of unused memory the stream-ordered pool keeps when the stream synchronises
    /// instead of handing them back to the driver (`max`: all of it, a cache like PyTorch's;
    /// `0`: the driver's default, every step maps its memory again).
    pub cuda_pool_release_threshold: ReleaseThreshold,
}

/// `training.device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl DeviceChoice {
    pub const NAMES: [&'static str; 3] = ["auto", "cpu", "cuda"];

    /// `auto`, `cpu` or `cuda`.
    pub fn parse(name: &str) -> Option<DeviceChoice> {
        match name {
            "auto" => Some(DeviceChoice::Auto),
            "cpu" => Some(DeviceChoice::Cpu),
            "cuda" => Some(DeviceChoice::Cuda),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        }
    }
}

/// `training.cuda_pool_release_threshold`: `max` or a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReleaseThreshold {
    #[default]
    Max,
    Bytes(ByteSize),
}

impl ReleaseThreshold {
    /// The driver's value (`u64::MAX` for `max`).
    pub fn bytes(self) -> u64 {
        match self {
            ReleaseThreshold::Max => u64::MAX,
            ReleaseThreshold::Bytes(b) => b.0,
        }
    }
}

impl std::fmt::Display for ReleaseThreshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReleaseThreshold::Max => f.write_str("max"),
            ReleaseThreshold::Bytes(b) => b.fmt(f),
        }
    }
}

impl Serialize for ReleaseThreshold {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ReleaseThreshold {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor of its own (not `untagged`), so that an error keeps the key's location.
        struct ThresholdVisitor;
        impl serde::de::Visitor<'_> for ThresholdVisitor {
            type Value = ReleaseThreshold;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "`max` or a size such as 2GB")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ReleaseThreshold, E> {
                Ok(ReleaseThreshold::Bytes(ByteSize(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ReleaseThreshold, E> {
                u64::try_from(v)
                    .map(|b| ReleaseThreshold::Bytes(ByteSize(b)))
                    .map_err(|_| E::custom(format!("{v} bytes: a size must not be negative")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ReleaseThreshold, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ReleaseThreshold, E> {
                if v.trim().eq_ignore_ascii_case("max") {
                    return Ok(ReleaseThreshold::Max);
                }
                ByteSize::parse(v)
                    .map(ReleaseThreshold::Bytes)
                    .map_err(|e| E::custom(format!("{e}, or `max`")))
            }
        }
        d.deserialize_any(ThresholdVisitor)
    }
}

/// `training.on_oom`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnOom {
    Stop,
    Refit,
}

/// A size in bytes. YAML: `24GB`, `1.5 GB`, `512MiB` (decimal kB/MB/GB/TB, binary
/// KiB/MiB/GiB/TiB) or a number of bytes; written back in the largest unit that divides it
/// exactly, so a config reloads to the same value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

/// Units of [`ByteSize`], largest first (the order `Display` tries them in).
const SIZE_UNITS: [(&str, u64); 8] = [
    ("TB", 1_000_000_000_000),
    ("TiB", 1 << 40),
    ("GB", 1_000_000_000),
    ("GiB", 1 << 30),
    ("MB", 1_000_000),
    ("MiB", 1 << 20),
    ("kB", 1_000),
    ("KiB", 1 << 10),
];

impl ByteSize {
    /// Parses `97GB`, `97.9 GB`, `24GiB`, `512MB`, `1e9`, `0`.
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let value: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a size (examples: 97GB, 24GiB, 512MB)"))?;
        let unit = unit.trim().to_ascii_lowercase();
        let mult = match unit.as_str() {
            "" | "b" => 1,
            "k" => 1_000,
            "m" => 1_000_000,
            "g" => 1_000_000_000,
            "t" => 1_000_000_000_000,
            other => SIZE_UNITS
                .iter()
                .find(|(name, _)| name.to_ascii_lowercase() == other)
                .map(|(_, m)| *m)
                .ok_or_else(|| format!("unknown unit `{other}` in `{s}` (GB, GiB, MB, ...)"))?,
        };
        // Whole numbers exactly (f64 holds integers only up to 2^53).
        if let Ok(whole) = num.trim().parse::<u64>() {
            return whole
                .checked_mul(mult)
                .map(ByteSize)
                .ok_or_else(|| format!("`{s}` is more bytes than 64 bits count"));
        }
        let bytes = (value * mult as f64).round();
        if !(value.is_finite() && value >= 0.0) {
            return Err(format!("`{s}` must be a size of at least 0 bytes"));
        }
        if bytes >= u64::MAX as f64 {
            return Err(format!("`{s}` is more bytes than 64 bits count"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        match SIZE_UNITS.iter().find(|(_, m)| b > 0 && b % m == 0) {
            Some((name, m)) => write!(f, "{}{name}", b / m),
            None => write!(f, "{b}B"),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl serde::de::Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a size such as 24GB, 512MiB or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("{v} bytes: a size must not be negative")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ByteSize, E> {
                if v >= u64::MAX as f64 {
                    return Err(E::custom(format!("{v:e} bytes is more than 64 bits count")));
                }
                ByteSize::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(SizeVisitor)
    }
}

/// `ema ← momentum · ema + (1 − momentum) · weights` after every `every`-th optimizer step;
/// validation and `best_model` then use the EMA weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmaConfig {
    pub momentum: f64,
    pub every: u64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            momentum: 0.999,
            every: 1,
        }
    }
}

impl TrainingConfig {
    /// Examples per optimizer step over all ranks (saturating: absurd sizes must not panic).
    pub fn effective_batch(&self, world_size: usize) -> usize {
        self.batch_size
            .saturating_mul(self.gradient_accumulation_steps)
            .saturating_mul(world_size)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    pub lr: f64,
    pub betas: [f64; 2],
    pub weight_decay: f64,
    pub eps: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrDecay {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LrScheduleConfig {
    pub warmup_steps: usize,
    pub decay: LrDecay,
    /// Reduce-on-plateau of the validation mean uSDR on top of warmup and decay; `null`: off.
    pub plateau: Option<PlateauConfig>,
}

/// After `patience` validations in a row without the mean uSDR beating the best by more than
/// `threshold` dB, the learning rate is multiplied by `factor`, down to `min_lr` (PyTorch's
/// `ReduceLROnPlateau` in `max` mode with an absolute threshold).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlateauConfig {
    pub patience: u64,
    pub factor: f64,
    pub min_lr: f64,
    pub threshold: f64,
}

impl Default for PlateauConfig {
    fn default() -> Self {
        Self {
            patience: 3,
            factor: 0.5,
            min_lr: 0.0,
            threshold: 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    Bf16,
}

/// A weighted sum of waveform L1, waveform MSE and the multi-resolution complex-STFT L1 of
/// MODEL.md (default: L1 + 1 × multi-STFT, as MODEL.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Weight of `mean |ŝ − s|`.
    pub l1_weight: f64,
    /// Weight of `mean (ŝ − s)²`.
    pub mse_weight: f64,
    /// Weight of each source by name (absent: 1). Every loss part is then the weighted mean
    /// over sources.
    pub source_weights: std::collections::BTreeMap<String, f64>,
    pub multi_stft_resolution_loss_weight: f64,
    pub multi_stft_resolutions_window_sizes: Vec<usize>,
    pub multi_stft_hop_size: usize,
    /// Each resolution uses `n_fft = max(window, multi_stft_min_n_fft)`.
    pub multi_stft_min_n_fft: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Auto,
    Nccl,
    Mpi,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    pub backend: Backend,
    /// 0: replicated; 1: optimizer state sharded; 2: + gradients; 3: + parameters.
    pub zero_stage: u8,
    pub bucket_size_mb: f64,
    /// Deadline of every collective, seconds.
    pub timeout_s: u64,
}

/// The standard 14-track validation subset of the MUSDB18 train split, as listed in the
/// `musdb` Python package (`musdb/configs/mus.yaml`, key `validation_tracks`) and used by
/// open-unmix, demucs and the MDX/Cadenza challenges.
pub const MUSDB18_VALIDATION_TRACKS: [&str; 14] = [
    "Actions - One Minute Smile",
    "Alexander Ross - Goodbye Bolero",
    "ANiMAL - Rockshow",
    "Clara Berry And Wooldog - Waltz For My Victims",
    "Fergessen - Nos Palpitants",
    "James May - On The Line",
    "Johnny Lokke - Promises & Lies",
    "Leaf - Summerghost",
    "Meaxic - Take A Step",
    "Patrick Talbot - A Reason To Leave",
    "Skelpolu - Human Mistakes",
    "Traffic Experiment - Sirens",
    "Triviul - Angelsaint",
    "Young Griffo - Pennies",
];

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("data/musdb18hq"),
            format: DatasetFormat::Auto,
            sources: ["drums", "bass", "other", "vocals"]
                .map(String::from)
                .to_vec(),
            sample_rate: 44_100,
            segment_length: 441_000,
            samples_per_epoch: 10_000,
            augment: AugmentConfig::default(),
            validation_tracks: MUSDB18_VALIDATION_TRACKS.map(String::from).to_vec(),
            num_workers: 2,
            prefetch: 4,
            synthetic: SyntheticConfig::default(),
        }
    }
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            remix: true,
            gain: [0.25, 1.25],
            channel_swap: true,
            polarity_flip: true,
        }
    }
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            tracks: 10,
            seconds: 20.0,
            seed: 1234,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            n_fft: 2048,
            hop_length: 512,
            bands: Bands::BsRoformer62,
            n_layers: 12,
            emb_dim: 256,
            n_heads: 16,
            ffn_hidden_dim: [1024, 1024],
            mask_hidden_dim: Some(1024),
            mask_depth: 2,
        }
    }
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            batch_size: 8,
            gradient_accumulation_steps: 2,
            epochs: 100,
            optimizer: OptimizerConfig::default(),
            lr_schedule: LrScheduleConfig::default(),
            grad_clip: Some(5.0),
            precision: Precision::Fp32,
            tf32: true,
            gradient_checkpointing: false,
            seed: 42,
            output_dir: PathBuf::from("experiments"),
            loss: LossConfig::default(),
            max_steps: None,
            log_every: 10,
            eval_every: 0,
            checkpoint_every: 500,
            keep_last: 3,
            max_consecutive_skips: 10,
            ema: None,
            memory_budget: None,
            memory_reserve: ByteSize(1_000_000_000),
            on_oom: OnOom::Stop,
            device: DeviceChoice::Auto,
            cuda_pool_release_threshold: ReleaseThreshold::Max,
        }
    }
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            lr: 3.0e-4,
            betas: [0.9, 0.999],
            weight_decay: 0.01,
            eps: 1.0e-8,
        }
    }
}

impl Default for LrScheduleConfig {
    fn default() -> Self {
        Self {
            warmup_steps: 500,
            decay: LrDecay::Cosine,
            plateau: None,
        }
    }
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            l1_weight: 1.0,
            mse_weight: 0.0,
            source_weights: std::collections::BTreeMap::new(),
            multi_stft_resolution_loss_weight: 1.0,
            multi_stft_resolutions_window_sizes: vec![4096, 2048, 1024, 512, 256],
            multi_stft_hop_size: 147,
            multi_stft_min_n_fft: 2048,
        }
    }
}

impl Default for DistributedConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Auto,
            zero_stage: 0,
            bucket_size_mb: 25.0,
            timeout_s: 600,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_decimal_and_binary_units_and_print_back_exactly() {
        for (text, bytes) in [
            ("24GB", 24_000_000_000),
            ("97.9 GB", 97_900_000_000),
            ("24GiB", 24 << 30),
            ("512MB", 512_000_000),
            ("1e9", 1_000_000_000),
            ("3k", 3_000),
            ("0", 0),
            ("123B", 123),
        ] {
            assert_eq!(ByteSize::parse(text), Ok(ByteSize(bytes)), "{text}");
        }
        for bad in ["lots", "3 parsecs", "-1GB", "NaN", "inf", "1e30GB"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad}");
        }
        for bytes in [
            0,
            1,
            999,
            1000,
            1024,
            1_500_000,
            24 << 30,
            97_900_000_000,
            u64::MAX / 2,
        ] {
            let size = ByteSize(bytes);
            assert_eq!(ByteSize::parse(&size.to_string()), Ok(size), "{size}");
        }
        assert_eq!(ByteSize(24 << 30).to_string(), "24GiB");
        assert_eq!(ByteSize(97_900_000_000).to_string(), "97900MB");
    }

    #[test]
    fn sizes_deserialize_from_strings_and_numbers() {
        let t: TrainingConfig =
            serde_yaml_ng::from_str("memory_budget: 24GB\nmemory_reserve: 0\non_oom: refit\n")
                .expect("valid");
        assert_eq!(t.memory_budget, Some(ByteSize(24_000_000_000)));
        assert_eq!((t.memory_reserve, t.on_oom), (ByteSize(0), OnOom::Refit));
        let t: TrainingConfig = serde_yaml_ng::from_str("memory_budget: 1.5e9\n").expect("valid");
        assert_eq!(t.memory_budget, Some(ByteSize(1_500_000_000)));
        let e =
            serde_yaml_ng::from_str::<TrainingConfig>("memory_budget: -5\n").expect_err("negative");
        assert!(e.to_string().contains("must not be negative"), "{e}");
    }

    #[test]
    fn device_and_pool_threshold_parse_and_print_back() {
        let t = TrainingConfig::default();
        assert_eq!(t.device, DeviceChoice::Auto);
        assert_eq!(t.cuda_pool_release_threshold.bytes(), u64::MAX);
        for name in DeviceChoice::NAMES {
            let t: TrainingConfig =
                serde_yaml_ng::from_str(&format!("device: {name}\n")).expect("valid");
            assert_eq!(t.device.name(), name);
            assert_eq!(DeviceChoice::parse(name), Some(t.device));
        }
        let e = serde_yaml_ng::from_str::<TrainingConfig>("device: gpu\n").expect_err("gpu");
        assert!(e.to_string().contains("unknown variant `gpu`"), "{e}");
        for (text, bytes) in [
            ("max", u64::MAX),
            ("MAX", u64::MAX),
            ("2GB", 2_000_000_000),
            ("0", 0),
        ] {
            let t: TrainingConfig =
                serde_yaml_ng::from_str(&format!("cuda_pool_release_threshold: {text}\n"))
                    .expect("valid");
            assert_eq!(t.cuda_pool_release_threshold.bytes(), bytes, "{text}");
            // Written back, it reads the same.
            let again: TrainingConfig =
                serde_yaml_ng::from_str(&serde_yaml_ng::to_string(&t).expect("yaml"))
                    .expect("reload");
            assert_eq!(again, t);
        }
        let e = serde_yaml_ng::from_str::<TrainingConfig>("cuda_pool_release_threshold: lots\n")
            .expect_err("lots");
        assert!(e.to_string().contains("or `max`"), "{e}");
    }
}
