//! `sepdist plan`: per-rank memory and step time predicted from the config alone.
//!
//! Nothing of the model's size is allocated. The prediction has two parts:
//!
//! - **Buffers of known size** (closed forms of the parameter count `n`, padded to a multiple
//!   of the world size `W`, and of the batch): the parameters as `Var`s and the trainer's flat
//!   fp32 copy, the flat gradient, the AdamW moments, the batch, the communication buffers of
//!   each ZeRO stage, and (CPU) gemm's per-thread packing slab.
//! - **Activations** (kept for the backward, and the transient working set on top of them):
//!   the micro-batch is replayed op by op on shapes ([`tape`], [`model`]) with the rules by
//!   which candle allocates, keeps and frees tensors, in the engine's block order and policy
//!   (keep or recompute). Summed per block these are closed forms in the batch, frames,
//!   bands and widths; the replay also finds the moment of the peak (which block, forward or
//!   backward), which a sum of closed forms cannot.
//!
//! The planner describes this code as it is (including its inefficiencies: ZeRO-2 keeps the
//! whole flat gradient, every gradient bucket's send and receive copies are in flight at the
//! end of the backward, the weights exist both as `Var`s and as the flat master copy).
//! bf16 is predicted from its design (issue 7) until it exists and can be measured; such
//! settings are marked.
//!
//! Step time model (relative, for comparing settings of one config and device): compute =
//! model FLOPs of the step × (3 + r) / 3 with `r` the forward FLOPs recomputed by activation
//! checkpointing as a fraction of the forward (backward = 2 × forward; a checkpointed
//! transformer's QKV projection runs three times), at the device's peak;
//! communication = bytes sent per rank by the collectives of the ZeRO stage (ring algorithms:
//! all-reduce `2(W−1)/W · 4n`, reduce-scatter and all-gather `(W−1)/W · 4n` each), at the
//! device's link bandwidth, not overlapped. Micro-batch size does not change the model's
//! FLOPs; among equal predictions the larger micro-batch is preferred (better device
//! utilisation, which the model does not quantify).

pub(crate) mod model;
pub(crate) mod tape;
pub mod text;

use crate::buckets::BucketPlan;
use crate::engine::FlatLayout;
use sepdist_config::{Config, Precision};
use sepdist_model::Separator;

/// Decimal gigabyte (vendor capacities are quoted in it).
pub const GB: f64 = 1e9;

/// Devices the planner knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    H200,
    RtxPro6000,
    Cpu,
}

impl DeviceKind {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "h200" => Ok(DeviceKind::H200),
            "rtx-pro-6000" | "rtxpro6000" | "rtx_pro_6000" => Ok(DeviceKind::RtxPro6000),
            "cpu" => Ok(DeviceKind::Cpu),
            other => Err(format!(
                "unknown device `{other}`: expected h200, rtx-pro-6000 or cpu"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::H200 => "h200",
            DeviceKind::RtxPro6000 => "rtx-pro-6000",
            DeviceKind::Cpu => "cpu",
        }
    }

    pub fn is_gpu(self) -> bool {
        self != DeviceKind::Cpu
    }
}

/// Capacity and speeds of a device (vendor figures; CPU from this machine).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSpec {
    pub kind: DeviceKind,
    /// Bytes a rank can use.
    pub capacity: u64,
    /// Where the capacity comes from.
    pub capacity_note: String,
    /// Peak FLOP/s for fp32 work (TF32 tensor cores on GPUs) and for bf16.
    pub flops_fp32: f64,
    pub flops_bf16: f64,
    /// Bytes per second a rank sends to its peers.
    pub link_bytes_per_s: f64,
    /// Compute threads (CPU) and the per-thread gemm packing slab (L2 size), bytes.
    pub threads: usize,
    pub gemm_slab: u64,
}

impl DeviceSpec {
    /// The spec of `kind`; `threads` is the CPU compute thread count (RAYON_NUM_THREADS).
    pub fn new(kind: DeviceKind, threads: usize) -> Self {
        match kind {
            // NVIDIA H200 SXM: 141 GB HBM3e; dense BF16 989 TFLOP/s, TF32 494 TFLOP/s;
            // NVLink 900 GB/s in both directions together.
            DeviceKind::H200 => DeviceSpec {
                kind,
                capacity: 141_000_000_000,
                capacity_note: "141 GB, NVIDIA's decimal figure for the H200's HBM3e".into(),
                flops_fp32: 494e12,
                flops_bf16: 989e12,
                link_bytes_per_s: 450e9,
                threads: 1,
                gemm_slab: 0,
            },
            // RTX PRO 6000 Blackwell, the originating guide's card: 97.9 GB as the guide's
            // tools report it; dense BF16 about 500 TFLOP/s, TF32 about 250; PCIe 5.0 ×16
            // between cards (no NVLink).
            DeviceKind::RtxPro6000 => DeviceSpec {
                kind,
                capacity: 97_900_000_000,
                capacity_note: "97.9 GB, the originating guide's card".into(),
                flops_fp32: 250e12,
                flops_bf16: 500e12,
                link_bytes_per_s: 64e9,
                threads: 1,
                gemm_slab: 0,
            },
            // This machine: MemAvailable; about 50 GFLOP/s per thread (fp32 SIMD gemm); MPI
            // ranks on one node exchange through shared memory, about 10 GB/s.
            DeviceKind::Cpu => DeviceSpec {
                kind,
                capacity: mem_available().unwrap_or(0),
                capacity_note: "MemAvailable of this machine".into(),
                flops_fp32: threads.max(1) as f64 * 50e9,
                flops_bf16: threads.max(1) as f64 * 50e9,
                link_bytes_per_s: 10e9,
                threads: threads.max(1),
                gemm_slab: l2_cache_bytes().unwrap_or(1 << 20),
            },
        }
    }

    /// Bytes of gemm's thread-local packing slabs once every compute thread ran a matmul:
    /// one L2 cache per thread that gemm runs on (the calling thread, plus the rayon workers
    /// when candle runs gemm in parallel, i.e. with more than one thread).
    pub fn gemm_slabs(&self) -> u64 {
        if self.kind.is_gpu() {
            return 0;
        }
        let threads = if self.threads > 1 {
            self.threads as u64 + 1
        } else {
            1
        };
        threads * self.gemm_slab
    }
}

/// `MemAvailable` of `/proc/meminfo`, bytes.
pub fn mem_available() -> Option<u64> {
    mem_available_in(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// `MemAvailable` of the text of a `/proc/meminfo`, bytes.
pub fn mem_available_in(text: &str) -> Option<u64> {
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Per-core L2 cache size (gemm sizes its per-thread packing slab by it).
fn l2_cache_bytes() -> Option<u64> {
    for index in 0..8 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{index}");
        let level = std::fs::read_to_string(format!("{dir}/level")).ok()?;
        if level.trim() != "2" {
            continue;
        }
        let size = std::fs::read_to_string(format!("{dir}/size")).ok()?;
        let size = size.trim();
        let (digits, mult) = match size.chars().last() {
            Some('K') => (&size[..size.len() - 1], 1024),
            Some('M') => (&size[..size.len() - 1], 1 << 20),
            _ => (size, 1),
        };
        return digits.parse::<u64>().ok().map(|v| v * mult);
    }
    None
}

/// Compute threads of this process: `RAYON_NUM_THREADS`, else the available parallelism.
pub fn cpu_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The knobs the planner varies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub micro_batch: usize,
    pub accumulation: usize,
    pub checkpointing: bool,
    pub zero_stage: u8,
    pub segment_length: usize,
    pub precision: Precision,
}

impl Setting {
    pub fn of(cfg: &Config) -> Self {
        Self {
            micro_batch: cfg.training.batch_size,
            accumulation: cfg.training.gradient_accumulation_steps,
            checkpointing: cfg.training.gradient_checkpointing,
            zero_stage: cfg.distributed.zero_stage,
            segment_length: cfg.dataset.segment_length,
            precision: cfg.training.precision,
        }
    }

    /// `cfg` with this setting.
    pub fn apply(&self, cfg: &Config) -> Config {
        let mut c = cfg.clone();
        c.training.batch_size = self.micro_batch;
        c.training.gradient_accumulation_steps = self.accumulation;
        c.training.gradient_checkpointing = self.checkpointing;
        c.distributed.zero_stage = self.zero_stage;
        c.dataset.segment_length = self.segment_length;
        c.training.precision = self.precision;
        c
    }

    /// `--set` overrides that turn `base` into this setting.
    pub fn overrides(&self, base: &Setting) -> Vec<String> {
        let mut v = Vec::new();
        if self.micro_batch != base.micro_batch {
            v.push(format!("training.batch_size={}", self.micro_batch));
        }
        if self.accumulation != base.accumulation {
            v.push(format!(
                "training.gradient_accumulation_steps={}",
                self.accumulation
            ));
        }
        if self.checkpointing != base.checkpointing {
            v.push(format!(
                "training.gradient_checkpointing={}",
                self.checkpointing
            ));
        }
        if self.zero_stage != base.zero_stage {
            v.push(format!("distributed.zero_stage={}", self.zero_stage));
        }
        if self.segment_length != base.segment_length {
            v.push(format!("dataset.segment_length={}", self.segment_length));
        }
        if self.precision != base.precision {
            v.push(format!(
                "training.precision={}",
                match self.precision {
                    Precision::Fp32 => "fp32",
                    Precision::Bf16 => "bf16",
                }
            ));
        }
        v
    }

    /// A short description: `8×2, ckpt off, ZeRO 0, 15.0 s, fp32`.
    pub fn describe(&self, sample_rate: u32) -> String {
        format!(
            "{}×{}, ckpt {}, ZeRO {}, {:.1} s, {}",
            self.micro_batch,
            self.accumulation,
            if self.checkpointing { "on" } else { "off" },
            self.zero_stage,
            self.segment_length as f64 / f64::from(sample_rate.max(1)),
            precision_name(self.precision)
        )
    }
}

pub fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::Fp32 => "fp32",
        Precision::Bf16 => "bf16",
    }
}

/// Per-rank prediction of one setting.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub setting: Setting,
    pub world_size: usize,
    /// Trainable scalars.
    pub params: u64,
    /// Parameters as `Var`s plus the flat fp32 master copy (ZeRO-3: the shard only; the
    /// gathered pieces are in the micro-batch's replay).
    pub parameters: u64,
    /// The flat fp32 gradient (and ZeRO-2's shard scratch).
    pub gradients: u64,
    /// AdamW's two moments over this rank's shard, fp32.
    pub optimizer: u64,
    /// Batches on the rank: the one in use (vectors and tensors; GPU: its tensors) and, on
    /// CPU, the loader's prefetched ones.
    pub data: u64,
    /// gemm's per-thread packing slabs (CPU); the loss' DFT bases (GPU).
    pub runtime: u64,
    /// Activations the forward keeps for the backward (context, block graphs or block inputs,
    /// head and loss graphs), at the start of the backward.
    pub activations: u64,
    /// The forward/backward working set above the kept activations at its highest (including
    /// gradient buckets in flight then).
    pub transient: u64,
    /// Largest communication buffers of any phase (buckets in flight at the end of the
    /// backward, ZeRO-2's reduce-scatter, ZeRO ≥ 1's parameter all-gather).
    pub communication: u64,
    /// What the optimizer phase allocates: ZeRO's all-gather buffers and the copy of one
    /// parameter into its `Var`.
    pub optimizer_buffers: u64,
    /// Absolute peaks per phase.
    pub forward_peak: u64,
    pub backward_peak: u64,
    pub communication_peak: u64,
    pub optimizer_peak: u64,
    pub peak: u64,
    /// Phase of the peak and what ran (e.g. `backward: head and loss`).
    pub peak_phase: &'static str,
    pub peak_at: String,
    pub kept_per_block: Vec<(String, u64)>,
    pub head_and_loss: u64,
    /// `[B, T, K, D]` activation bytes.
    pub unit: u64,
    /// Model FLOPs: forward per sample, and the whole optimizer step on all ranks.
    pub flops_per_sample: f64,
    pub flops_per_step: f64,
    /// Forward FLOPs recomputed by checkpointing, as a fraction of the forward.
    pub recompute_fraction: f64,
    pub compute_s: f64,
    pub comm_bytes: f64,
    pub comm_s: f64,
    /// False when the prediction is not of the path this build runs: bf16 is predicted from
    /// its design (fused bf16 kernels and memory-lean attention, as fp32 has on the CPU);
    /// this build runs bf16 through composed ops and needs several times more.
    pub implemented: bool,
}

impl Prediction {
    pub fn step_s(&self) -> f64 {
        self.compute_s + self.comm_s
    }
    pub fn persistent(&self) -> u64 {
        self.parameters + self.gradients + self.optimizer + self.runtime
    }

    /// The predicted memory once the first micro-batch's forward has run the blocks up to
    /// `block` (engine index, inclusive): the step's start, the mixture's context and what
    /// those blocks keep. A failure part-way through the forward is measured against this, not
    /// against the step's peak.
    pub fn forward_reached(&self, block: usize) -> u64 {
        let blocks: u64 = self.kept_per_block.iter().map(|(_, b)| b).sum();
        let context = self.activations.saturating_sub(blocks + self.head_and_loss);
        let kept: u64 = self
            .kept_per_block
            .iter()
            .take(block.saturating_add(1))
            .map(|(_, b)| b)
            .sum();
        self.persistent() + self.data + context + kept
    }
}

/// Everything the planner needs that does not change between settings.
pub struct Planner {
    pub cfg: Config,
    pub world: usize,
    pub device: DeviceSpec,
    sep: Separator,
    blocks: Vec<model::BlockInfo>,
    layout: FlatLayout,
    block_params: Vec<Vec<usize>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Model(#[from] sepdist_model::ModelError),
    #[error("{0}")]
    Input(String),
}

impl Planner {
    pub fn new(cfg: &Config, world: usize, device: DeviceSpec) -> Result<Self, PlanError> {
        if world == 0 {
            return Err(PlanError::Input("the world size must be at least 1".into()));
        }
        // The trainer's model: mask estimators named by source, in the same flat layout.
        let sep = Separator::with_sources(&cfg.model, &cfg.dataset.sources)?;
        let layout = FlatLayout::new(sep.param_specs());
        let index: std::collections::BTreeMap<&str, usize> = layout
            .specs
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let block_params: Vec<Vec<usize>> = sep
            .blocks()
            .iter()
            .map(|b| {
                b.param_specs()
                    .iter()
                    .filter_map(|s| index.get(s.name.as_str()).copied())
                    .collect()
            })
            .collect();
        let blocks = model::block_infos(&sep);
        Ok(Self {
            cfg: cfg.clone(),
            world,
            device,
            sep,
            blocks,
            layout,
            block_params,
        })
    }

    pub fn params(&self) -> u64 {
        self.layout.len as u64
    }

    /// Bytes of communication buffers the trainer starts after each block's backward on the
    /// last micro-batch (ZeRO 0/1 with several ranks): each bucket's send copy and receive
    /// buffer.
    fn buckets_after(&self) -> Vec<u64> {
        let bucket_bytes = (self.cfg.distributed.bucket_size_mb * 1e6) as usize;
        let plan = BucketPlan::new(&self.layout, &self.block_params, bucket_bytes);
        let mut done = vec![false; self.block_params.len()];
        let mut after = vec![0u64; self.block_params.len()];
        for block in (0..self.block_params.len()).rev() {
            done[block] = true;
            for b in plan.ready_after(block, &done) {
                after[block] += 8 * plan.buckets[b].range.len() as u64;
            }
        }
        after
    }

    /// ZeRO-3's pieces (as `Engine::pieces`) with shards of `per` elements: their sizes and
    /// per-rank chunks, exactly as the trainer's `zero3::Zero3` lays them out.
    fn gathers(&self, per: usize) -> model::Gathers {
        let piece = |ids: &mut dyn Iterator<Item = usize>| -> (u64, u64) {
            let exchange =
                crate::zero3::PieceExchange::of_params(&self.layout, ids, per, self.world);
            (exchange.len() as u64, exchange.chunk() as u64)
        };
        let last = self.block_params.len().saturating_sub(1);
        let blocks = self.block_params[..last]
            .iter()
            .map(|ids| piece(&mut ids.iter().copied()))
            .collect();
        let head_block = &self.sep.blocks()[last];
        let head = (0..head_block.head_sources())
            .map(|src| {
                let local = head_block.head_source_params(src).unwrap_or_default();
                piece(&mut local.iter().map(|&j| self.block_params[last][j]))
            })
            .collect();
        model::Gathers {
            world: self.world as u64,
            blocks,
            head,
        }
    }

    /// Forward FLOPs per sample that checkpointing recomputes (the band split and the
    /// transformers, whose QKV projections run a third time), as a fraction of the whole
    /// forward.
    fn recompute_fraction(&self, segment: usize) -> f64 {
        let m = &self.cfg.model;
        let s = self.cfg.dataset.sources.len();
        let full = sepdist_model::flops_per_sample(m, s, segment);
        let mut no_layers = m.clone();
        no_layers.n_layers = 0;
        // Without layers: STFT + iSTFT + band split + mask estimators.
        let rest = sepdist_model::flops_per_sample(&no_layers, s, segment);
        let t = m.frames(segment) as f64;
        let band_split = 2.0 * t * 4.0 * m.freq_bins() as f64 * m.emb_dim as f64;
        if full <= 0.0 {
            return 0.0;
        }
        let qkv = sepdist_model::qkv_flops_per_sample(m, segment);
        (full - rest + band_split + qkv) / full
    }

    /// Predicts `setting` per rank.
    pub fn predict(&self, setting: &Setting) -> Prediction {
        let cfg = setting.apply(&self.cfg);
        let w = self.world as u64;
        let n = self.params();
        let padded = n.div_ceil(w) * w;
        let stage = setting.zero_stage;
        let bf16 = setting.precision == Precision::Bf16;
        let es: u64 = if bf16 { 2 } else { 4 };
        let sharded = w > 1 && stage >= 1;
        let shard = if sharded { padded / w } else { padded };
        let dims = self.sep.dims();
        let shapes = model::Shapes::new(
            dims,
            &cfg.training.loss,
            &cfg.dataset.sources,
            setting.micro_batch,
            setting.segment_length,
            es,
        );
        // Buffers of known size.
        let gpu = self.device.kind.is_gpu();
        let (parameters, gradients, optimizer) = if gpu {
            // The trainer's flat fp32 master copy, flat gradient and AdamW moments (and ZeRO's
            // shards of them) live in host memory; the device holds the engine's Vars (none
            // under ZeRO-3, whose gathered pieces are in the replay).
            (if stage >= 3 { 0 } else { n * es }, 0, 0)
        } else if stage >= 3 {
            // This rank's shards of the fp32 parameters, gradient and moments; the gathered
            // pieces are in the micro-batch's replay.
            (padded / w * 4, padded / w * 4, 2 * (padded / w) * 4)
        } else {
            let scratch = if w > 1 && stage >= 2 {
                padded / w * 4
            } else {
                0
            };
            (n * es + padded * 4, padded * 4 + scratch, 2 * shard * 4)
        };
        // The EMA of the weights (`training.ema`) is an fp32 copy of this rank's shard.
        let optimizer = optimizer
            + if cfg.training.ema.is_some() && !gpu {
                optimizer / 2
            } else {
                0
            };
        let audio = (setting.micro_batch * (1 + cfg.dataset.sources.len()) * 2) as u64
            * setting.segment_length as u64
            * 4;
        let target =
            audio / (1 + cfg.dataset.sources.len() as u64) * cfg.dataset.sources.len() as u64;
        // The micro-batch's stems tensor is in the replay (the loss' target); outside it: the
        // batch vectors and the mixture tensor, and the prefetched batches.
        // The loader keeps up to `prefetch` batches ready beyond the one in use, no more than the
        // run still needs.
        let t = &cfg.training;
        let jobs = t.max_steps.map_or(u64::MAX, |m| {
            m.saturating_mul(t.gradient_accumulation_steps as u64)
        });
        let prefetched = (cfg.dataset.prefetch.max(1) as u64).min(jobs.saturating_sub(1));
        let data = if gpu {
            audio - target
        } else {
            (2 + prefetched) * audio - target
        };
        // On a GPU: the loss' DFT bases, cached on the device from the first forward on.
        let runtime = self.device.gemm_slabs() + if gpu { shapes.loss_dft_bases() } else { 0 };
        // On a GPU the gradient buckets are staged through host buffers (NCCL and MPI alike).
        let buckets = if w > 1 && stage < 2 && !gpu {
            self.buckets_after()
        } else {
            Vec::new()
        };
        let gathers = (stage >= 3).then(|| self.gathers((padded / w) as usize));
        let mut shapes = shapes;
        shapes.gathered = gathers.is_some();
        shapes.gpu = gpu;
        let micro = model::micro_batch(
            &shapes,
            &self.blocks,
            setting.checkpointing,
            &buckets,
            gathers.as_ref(),
        );
        let persistent = parameters + gradients + optimizer + runtime;
        let forward_peak = persistent + data + target + micro.forward_peak;
        let backward_peak = persistent + data + target + micro.backward_peak;
        // Communication phase: buckets awaited (ZeRO 0/1), or ZeRO-2's reduce-scatter (a send
        // copy of the flat gradient and the shard received).
        let comm_phase = if gpu {
            // Host buffers (see `buckets`).
            0
        } else if w > 1 && stage < 2 {
            micro.comm_in_flight
        } else if w > 1 && stage == 2 {
            padded * 4 + padded / w * 4
        } else {
            // ZeRO-3 gathers and reduce-scatters inside the micro-batch (in its replay).
            0
        };
        // Optimizer phase: ZeRO ≥ 1 all-gathers the parameters (this rank's shard copied
        // twice, the whole vector received); then each parameter is copied into its Var.
        let opt_comm = if sharded && stage < 3 && !gpu {
            2 * shard * 4 + padded * 4
        } else {
            0
        };
        let largest_param = self
            .layout
            .specs
            .iter()
            .map(|s| s.numel() as u64)
            .max()
            .unwrap_or(0);
        // Between micro-batches only the loader's prefetched batches remain of the data.
        let queued = if gpu { 0 } else { prefetched * audio };
        let communication_peak = persistent + queued + comm_phase;
        // Each parameter's copy into its Var (none under ZeRO-3: the engine holds no Vars).
        let load_copy = if stage >= 3 { 0 } else { largest_param * 4 };
        let optimizer_peak = persistent + queued + opt_comm + load_copy;
        let fb = forward_peak.max(backward_peak);
        let peak = fb.max(communication_peak).max(optimizer_peak);
        let (peak_phase, peak_at) = if peak == fb {
            if backward_peak >= forward_peak {
                ("backward", micro.backward_peak_at.clone())
            } else {
                ("forward", micro.forward_peak_at.clone())
            }
        } else if peak == communication_peak {
            ("communication", "gradient reduction".to_string())
        } else {
            (
                "optimizer",
                "AdamW and the parameter all-gather".to_string(),
            )
        };
        let activations = micro.kept;
        let transient = micro.forward_peak.max(micro.backward_peak) - micro.kept;
        let communication = comm_phase.max(opt_comm).max(micro.comm_in_flight);
        // Cost model.
        let flops_per_sample = sepdist_model::flops_per_sample(
            &cfg.model,
            cfg.dataset.sources.len(),
            setting.segment_length,
        );
        let effective = (setting.micro_batch * setting.accumulation) as f64 * w as f64;
        let recompute_fraction = if setting.checkpointing {
            self.recompute_fraction(setting.segment_length)
        } else {
            0.0
        };
        let flops_per_step = 3.0 * flops_per_sample * effective;
        let per_rank = flops_per_step / w as f64 * (3.0 + recompute_fraction) / 3.0;
        let rate = if bf16 {
            self.device.flops_bf16
        } else {
            self.device.flops_fp32
        };
        let compute_s = per_rank / rate;
        let ring = (w as f64 - 1.0) / w as f64 * 4.0 * n as f64;
        let comm_bytes = match (w, stage) {
            (1, _) => 0.0,
            (_, 0) => 2.0 * ring,
            (_, 1) => 3.0 * ring,
            (_, 2) => 2.0 * ring,
            // Per micro-batch, one gather of every piece for the forward, a second one of
            // every recomputed block, one reduce-scatter of every piece.
            _ => {
                let gathers = if setting.checkpointing { 2.0 } else { 1.0 };
                (gathers + 1.0) * ring * setting.accumulation as f64
            }
        };
        let comm_s = comm_bytes / self.device.link_bytes_per_s;
        // bf16 runs through composed candle ops (no fused bf16 kernels, attention scores
        // materialised), which this replay does not model.
        let implemented = !bf16;
        Prediction {
            setting: setting.clone(),
            world_size: self.world,
            params: n,
            parameters,
            gradients,
            optimizer,
            data: data + target,
            runtime,
            activations,
            transient,
            communication,
            optimizer_buffers: opt_comm + load_copy,
            forward_peak,
            backward_peak,
            communication_peak,
            optimizer_peak,
            peak,
            peak_phase,
            peak_at,
            kept_per_block: micro.kept_per_block,
            head_and_loss: micro.head_and_loss,
            unit: shapes.unit() * es,
            flops_per_sample,
            flops_per_step,
            recompute_fraction,
            compute_s,
            comm_bytes,
            comm_s,
            implemented,
        }
    }

    /// The configured setting.
    pub fn configured(&self) -> Setting {
        Setting::of(&self.cfg)
    }

    /// Alternatives of the configured setting with the same effective batch: every
    /// micro-batch × accumulation split, checkpointing toggled, each ZeRO stage (several
    /// ranks), shorter segments (10 s and 5 s when longer), and the other precision on GPUs.
    pub fn alternatives(&self) -> Vec<(String, Setting)> {
        let base = self.configured();
        let sr = self.cfg.dataset.sample_rate.max(1) as usize;
        let mut out = vec![("as configured".to_string(), base.clone())];
        let per_rank = base.micro_batch * base.accumulation;
        for b in divisors(per_rank) {
            if b == base.micro_batch {
                continue;
            }
            let s = Setting {
                micro_batch: b,
                accumulation: per_rank / b,
                ..base.clone()
            };
            out.push((format!("micro-batch {b} × {}", per_rank / b), s));
        }
        out.push((
            format!(
                "checkpointing {}",
                if base.checkpointing { "off" } else { "on" }
            ),
            Setting {
                checkpointing: !base.checkpointing,
                ..base.clone()
            },
        ));
        out.push((
            format!("micro-batch 1 × {per_rank}, checkpointing on"),
            Setting {
                micro_batch: 1,
                accumulation: per_rank,
                checkpointing: true,
                ..base.clone()
            },
        ));
        if self.world > 1 {
            for z in 0..=3u8 {
                if z != base.zero_stage {
                    out.push((
                        format!("ZeRO {z}"),
                        Setting {
                            zero_stage: z,
                            ..base.clone()
                        },
                    ));
                }
            }
        }
        for secs in [10usize, 5] {
            let seg = secs * sr;
            if seg < base.segment_length && seg >= self.cfg.model.n_fft {
                out.push((
                    format!("segment {secs} s"),
                    Setting {
                        segment_length: seg,
                        ..base.clone()
                    },
                ));
            }
        }
        if self.device.kind.is_gpu() {
            let other = match base.precision {
                Precision::Fp32 => Precision::Bf16,
                Precision::Bf16 => Precision::Fp32,
            };
            out.push((
                precision_name(other).to_string(),
                Setting {
                    precision: other,
                    ..base.clone()
                },
            ));
        }
        // Same setting twice (e.g. the 1 × n split with checkpointing already on): keep one.
        let mut seen: Vec<Setting> = Vec::new();
        out.retain(|(_, s)| {
            if seen.contains(s) {
                false
            } else {
                seen.push(s.clone());
                true
            }
        });
        out
    }

    /// The settings `--fit` searches for an effective batch of `effective` examples: every
    /// micro-batch × accumulation split of `effective / world`, checkpointing off and on, and
    /// each ZeRO stage (stage 0 only for one rank); segment length and precision stay.
    pub fn fit_candidates(&self, effective: usize) -> Result<Vec<Setting>, PlanError> {
        if effective == 0 || effective % self.world != 0 {
            return Err(PlanError::Input(format!(
                "the effective batch {effective} is not a multiple of the world size {}",
                self.world
            )));
        }
        let base = self.configured();
        let per_rank = effective / self.world;
        let stages: Vec<u8> = if self.world > 1 {
            vec![0, 1, 2, 3]
        } else {
            vec![0]
        };
        let mut out = Vec::new();
        for b in divisors(per_rank) {
            for ckpt in [false, true] {
                for &z in &stages {
                    out.push(Setting {
                        micro_batch: b,
                        accumulation: per_rank / b,
                        checkpointing: ckpt,
                        zero_stage: z,
                        ..base.clone()
                    });
                }
            }
        }
        Ok(out)
    }

    /// `--fit`: the fastest predicted setting whose peak fits `budget` (ties: larger
    /// micro-batch, then implemented ones, lower ZeRO stage, no checkpointing), or the one
    /// that gets closest.
    pub fn fit(&self, effective: usize, budget: u64) -> Result<Fit, PlanError> {
        self.fit_among(&self.fit_candidates(effective)?, budget)
    }

    /// [`Planner::fit`] over `candidates` (the trainer's out-of-memory handling narrows
    /// [`Planner::fit_candidates`] to what it can run).
    pub fn fit_among(&self, candidates: &[Setting], budget: u64) -> Result<Fit, PlanError> {
        let mut all: Vec<Prediction> = candidates.iter().map(|s| self.predict(s)).collect();
        let key = |p: &Prediction| {
            (
                (p.step_s() * 1e9).round() as u64,
                std::cmp::Reverse(p.setting.micro_batch),
                !p.implemented,
                p.setting.zero_stage,
                p.setting.checkpointing,
            )
        };
        all.sort_by_key(key);
        if let Some(best) = all.iter().find(|p| p.peak <= budget) {
            return Ok(Fit::Fits(Box::new(best.clone())));
        }
        let closest = all
            .iter()
            .min_by_key(|p| p.peak)
            .cloned()
            .ok_or_else(|| PlanError::Input("no candidate setting".into()))?;
        Ok(Fit::Short(Box::new(closest)))
    }
}

/// Outcome of `--fit`.
#[derive(Debug, Clone)]
pub enum Fit {
    Fits(Box<Prediction>),
    /// Nothing fits; the setting with the smallest predicted peak.
    Short(Box<Prediction>),
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n % d == 0).collect()
}

/// Parses `97GB`, `97.9 GB`, `24GiB`, `512MB`, `1e9` (bytes; the config's sizes).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    match sepdist_config::ByteSize::parse(s)? {
        sepdist_config::ByteSize(0) => Err(format!("`{s}` must be a positive size")),
        sepdist_config::ByteSize(b) => Ok(b),
    }
}

/// `97.9 GB`, `812.3 MB`, `4.1 kB` (decimal units).
pub fn format_bytes(b: u64) -> String {
    let x = b as f64;
    if x >= 1e12 {
        format!("{:.2} TB", x / 1e12)
    } else if x >= 1e9 {
        format!("{:.1} GB", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.1} MB", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} kB", x / 1e3)
    } else {
        format!("{b} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_parse_bytes_units() {
        assert_eq!(parse_bytes("97GB"), Ok(97_000_000_000));
        assert_eq!(parse_bytes("97.9 GB"), Ok(97_900_000_000));
        assert_eq!(parse_bytes("24GiB"), Ok(24 << 30));
        assert_eq!(parse_bytes("512MB"), Ok(512_000_000));
        assert_eq!(parse_bytes("1e9"), Ok(1_000_000_000));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }

    fn planner(world: usize) -> Planner {
        let mut cfg = Config::default();
        cfg.model.n_layers = 2;
        cfg.dataset.segment_length = 44_100;
        cfg.training.batch_size = 2;
        cfg.training.gradient_accumulation_steps = 2;
        Planner::new(&cfg, world, DeviceSpec::new(DeviceKind::H200, 1)).expect("planner")
    }

    #[test]
    fn plan_checkpointing_cuts_kept_activations_and_costs_a_recompute() {
        let p = planner(1);
        let keep = p.predict(&p.configured());
        let ckpt = p.predict(&Setting {
            checkpointing: true,
            ..p.configured()
        });
        assert!(ckpt.activations < keep.activations);
        assert!(ckpt.recompute_fraction > 0.5 && ckpt.recompute_fraction < 1.0);
        assert!(ckpt.step_s() > keep.step_s());
    }

    #[test]
    fn plan_zero_stages_shard_the_optimizer_state() {
        let p = planner(4);
        let at = |z: u8| {
            p.predict(&Setting {
                zero_stage: z,
                ..p.configured()
            })
        };
        let (z0, z1, z3) = (at(0), at(1), at(3));
        assert_eq!(z1.optimizer * 4, z0.optimizer);
        assert!(z3.parameters < z0.parameters);
        assert!(z3.comm_s > z1.comm_s && z1.comm_s > z0.comm_s);
    }

    #[test]
    fn plan_fit_keeps_the_effective_batch() {
        let p = planner(2);
        let Fit::Fits(best) = p.fit(8, 1 << 60).expect("fit") else {
            panic!("a huge budget fits");
        };
        assert_eq!(best.setting.micro_batch * best.setting.accumulation * 2, 8);
        assert_eq!(
            best.setting.micro_batch, 4,
            "the largest micro-batch wins a tie"
        );
        let Fit::Short(closest) = p.fit(8, 1).expect("fit") else {
            panic!("one byte never fits");
        };
        assert!(closest.setting.checkpointing && closest.setting.micro_batch == 1);
        assert!(p.fit(7, 1 << 40).is_err());
    }
}
