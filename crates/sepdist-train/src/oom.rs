//! Out of memory as a decision instead of a crash.
//!
//! - **Pre-flight** ([`preflight`]): before the model is allocated, every rank compares the
//!   planner's predicted peak with what it may use ([`available`]: `training.memory_budget`
//!   when set, else the device's free memory less `training.memory_reserve`). The ranks
//!   exchange their figures; if any rank is short, all refuse to start (rank 0 prints the
//!   predicted breakdown, the available memory and the fitted setting as `--set` overrides),
//!   unless `--force` is given or `training.on_oom: refit` starts them with the fitted setting.
//! - **At run time** (the trainer's step): the memory meter measures the heap of each step
//!   against `training.memory_budget` ([`crate::memory::Window`]); a step over it on any rank
//!   is discarded on every rank (one flag in the step's scalar all-reduce), and the trainer
//!   stops or refits ([`fitted_after_failure`]).
//! - **A CUDA out-of-memory error** ([`cuda_out_of_memory`]) from an op of the step (the batch's
//!   copy to the device, forward, backward, the gradients' copies out, the parameters' refresh
//!   after the update) sets the same flag: the failing rank records where it failed (phase,
//!   block, micro-batch, the pool's figures), drops the step's tensors and still takes part in
//!   the step's remaining collectives (gradient buckets, ZeRO-2's reduce-scatter, ZeRO-3's
//!   gathers and reduces, replayed in the engine's order with values that are discarded), so
//!   that every rank reaches the step's scalar all-reduce. A failure in the parameters' refresh
//!   comes after that decision (the update is applied on every rank, the host copy is whole):
//!   it sets the flag of the next step, which is discarded. The limit the refit is fitted to is
//!   [`capacity_after_failure`]. Not recoverable: an out-of-memory inside a collective (NCCL's
//!   staging buffers, allocated in the first step of each message size: the backend aborts the
//!   process group, see `sepdist_comm`'s NCCL module), and one outside a step (model set-up,
//!   validation): the run ends with the error, as [`TrainError::OutOfMemory`].
//!
//! Free memory comes from a [`DeviceMemory`]: [`CpuMemory`] on CPUs (`MemAvailable`, or the
//! headroom of the process's memory cgroups if smaller), `cuMemGetInfo`'s free bytes on a CUDA
//! device ([`crate::device::memory`]), which also gives the planner its device spec (the GPU
//! kind by name).

use crate::plan::text::{breakdown, describe_fit, set_args};
use crate::plan::{DeviceKind, DeviceSpec, Fit, PlanError, Planner, Prediction, Setting};
use crate::plan::{cpu_threads, format_bytes};
use crate::trainer::TrainError;
use sepdist_comm::Communicator;
use sepdist_config::{Config, OnOom, TrainingConfig};
use serde::{Deserialize, Serialize};
use std::path::{Component, Path, PathBuf};

/// Free memory as measured on a device, and where the figure comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measured {
    pub bytes: u64,
    /// E.g. `MemAvailable` or `cgroup /sys/fs/cgroup/memory.max 8.0 GB − usage 2.1 GB`.
    pub source: String,
    /// The memory the figure describes: ranks reporting the same pool share its bytes (CPU
    /// ranks on one node; a GPU is one rank's own).
    pub pool: String,
}

/// A device that can say how much memory this process can still allocate on it.
pub trait DeviceMemory {
    /// `None` when the device cannot tell (no `/proc`): nothing is checked then.
    fn free(&self) -> Option<Measured>;

    /// The planner's spec of this device (the CPU's unless overridden).
    fn spec(&self) -> DeviceSpec {
        DeviceSpec::new(DeviceKind::Cpu, cpu_threads())
    }
}

/// Host memory: `MemAvailable` of `/proc/meminfo`, or the headroom (limit − usage) of the
/// tightest memory cgroup containing this process (v2 `memory.max` − `memory.current`, v1
/// `memory.limit_in_bytes` − `memory.usage_in_bytes`, every level up to the root), whichever
/// is smaller.
#[derive(Debug, Clone)]
pub struct CpuMemory {
    meminfo: PathBuf,
    proc_cgroup: PathBuf,
    cgroup_root: PathBuf,
}

impl CpuMemory {
    /// This machine's `/proc/meminfo`, `/proc/self/cgroup` and `/sys/fs/cgroup`.
    pub fn system() -> Self {
        Self::at("/proc/meminfo", "/proc/self/cgroup", "/sys/fs/cgroup")
    }

    /// The same files elsewhere (tests).
    pub fn at(
        meminfo: impl Into<PathBuf>,
        proc_cgroup: impl Into<PathBuf>,
        cgroup_root: impl Into<PathBuf>,
    ) -> Self {
        Self {
            meminfo: meminfo.into(),
            proc_cgroup: proc_cgroup.into(),
            cgroup_root: cgroup_root.into(),
        }
    }
}

impl DeviceMemory for CpuMemory {
    fn free(&self) -> Option<Measured> {
        let available = std::fs::read_to_string(&self.meminfo)
            .ok()
            .and_then(|text| crate::plan::mem_available_in(&text))
            .map(|bytes| Measured {
                bytes,
                source: "MemAvailable".into(),
                pool: "MemAvailable".into(),
            });
        let cgroup = std::fs::read_to_string(&self.proc_cgroup)
            .ok()
            .and_then(|text| cgroup_headroom(&text, &self.cgroup_root));
        let mut m = match (available, cgroup) {
            (Some(a), Some(c)) => Some(if c.bytes < a.bytes { c } else { a }),
            (a, c) => a.or(c),
        }?;
        // Every rank on this node (in this cgroup) draws from the same memory.
        m.pool = format!("{} {}", hostname(), m.pool);
        Some(m)
    }
}

/// This machine's name (`/proc/sys/kernel/hostname`, else `HOSTNAME`).
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map_or_else(|| "localhost".into(), |h| h.trim().to_string())
}

/// Limits at or above this are "no limit" (cgroup v1 writes one as 2^63 rounded to pages).
const NO_LIMIT: u64 = 1 << 60;

/// The smallest `limit − usage` over the memory cgroups named in `proc_self_cgroup` (the text
/// of `/proc/self/cgroup`) and their ancestors under `root`; `None` when none has a limit.
/// In a cgroup namespace the named path may not exist under the mount: the levels that do
/// exist (at least the mount's root, which is the namespace's own cgroup) are read.
pub fn cgroup_headroom(proc_self_cgroup: &str, root: &Path) -> Option<Measured> {
    let mut best: Option<Measured> = None;
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (base, limit_file, usage_file) = if id == "0" && controllers.is_empty() {
            // v2; in hybrid mode its hierarchy is mounted at `unified`.
            let base = if root.join("cgroup.controllers").is_file() {
                root.to_path_buf()
            } else {
                root.join("unified")
            };
            (base, "memory.max", "memory.current")
        } else if controllers.split(',').any(|c| c == "memory") {
            (
                root.join("memory"),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            )
        } else {
            continue;
        };
        let mut dir = base.clone();
        let mut levels = vec![base];
        for c in Path::new(path).components() {
            if let Component::Normal(name) = c {
                dir.push(name);
                levels.push(dir.clone());
            }
        }
        for level in levels {
            let read = |file: &str| -> Option<u64> {
                std::fs::read_to_string(level.join(file))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            };
            // `max` (v2) does not parse: no limit at this level.
            let Some(limit) = read(limit_file).filter(|&l| l < NO_LIMIT) else {
                continue;
            };
            let usage = read(usage_file).unwrap_or(0);
            let headroom = limit.saturating_sub(usage);
            if best.as_ref().is_none_or(|b| headroom < b.bytes) {
                best = Some(Measured {
                    bytes: headroom,
                    pool: level.join(limit_file).display().to_string(),
                    source: format!(
                        "cgroup {} {} − usage {}",
                        level.join(limit_file).display(),
                        format_bytes(limit),
                        format_bytes(usage)
                    ),
                });
            }
        }
    }
    best
}

/// What a rank may use, per the config and the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Available {
    pub bytes: u64,
    /// `training.memory_budget 30MB`, or `MemAvailable 24.6 GB − training.memory_reserve 1GB`.
    pub source: String,
    /// Set when an explicit budget is more than the device has free now.
    pub warning: Option<String>,
}

/// `training.memory_budget` when set (the reserve is not taken off it), else this rank's share
/// of the device's free memory `measured` (shared by `sharing` ranks) less
/// `training.memory_reserve`; `None` when neither is known.
pub fn available(
    t: &TrainingConfig,
    measured: Option<Measured>,
    sharing: usize,
) -> Option<Available> {
    let sharing = sharing.max(1);
    let measured = measured.map(|m| {
        if sharing > 1 {
            Measured {
                bytes: m.bytes / sharing as u64,
                source: format!(
                    "{} {} shared by {sharing} ranks:",
                    m.source,
                    format_bytes(m.bytes)
                ),
                ..m
            }
        } else {
            m
        }
    });
    if let Some(budget) = t.memory_budget {
        let warning = measured.filter(|m| m.bytes < budget.0).map(|m| {
            format!(
                "training.memory_budget {budget} is more than the {} free now ({}): a step \
                 may be killed by the system before the budget check sees it",
                format_bytes(m.bytes),
                m.source.trim_end_matches(':')
            )
        });
        return Some(Available {
            bytes: budget.0,
            source: format!("training.memory_budget {budget}"),
            warning,
        });
    }
    let m = measured?;
    Some(Available {
        bytes: m.bytes.saturating_sub(t.memory_reserve.0),
        source: format!(
            "{} {} − training.memory_reserve {}",
            m.source,
            format_bytes(m.bytes),
            t.memory_reserve
        ),
        warning: None,
    })
}

/// The heap budget the trainer checks at every step boundary: `training.memory_budget` (on a
/// CPU the counting allocator measures the heap; without a budget nothing is checked at run
/// time, since the system's own limit cannot be caught before it kills the process).
pub fn runtime_budget(cfg: &Config) -> Option<usize> {
    cfg.training
        .memory_budget
        .map(|b| usize::try_from(b.0).unwrap_or(usize::MAX))
}

/// The planner for the CPU and `world` ranks.
pub fn planner(cfg: &Config, world: usize) -> Result<Planner, TrainError> {
    planner_on(cfg, world, DeviceSpec::new(DeviceKind::Cpu, cpu_threads()))
}

/// The planner for `device` (see [`crate::device::spec`]) and `world` ranks.
pub fn planner_for(
    cfg: &Config,
    world: usize,
    device: &candle_core::Device,
) -> Result<Planner, TrainError> {
    planner_on(cfg, world, crate::device::spec(device))
}

/// The planner for a device of spec `spec` and `world` ranks.
pub fn planner_on(cfg: &Config, world: usize, spec: DeviceSpec) -> Result<Planner, TrainError> {
    Planner::new(cfg, world, spec).map_err(plan_error)
}

pub(crate) fn plan_error(e: PlanError) -> TrainError {
    match e {
        PlanError::Model(m) => TrainError::Model(m),
        PlanError::Input(m) => TrainError::Setup(format!("memory plan: {m}")),
    }
}

/// Share of a budget a fitted setting leaves free: the planner's prediction is within a few
/// per cent of the measured peak (2.7 % worst on the larger grid, mostly the process's own heap,
/// which it does not predict), and a setting fitted to the last byte fails the run-time check.
pub const FIT_MARGIN: f64 = 0.03;

/// `budget` less [`FIT_MARGIN`].
fn with_margin(budget: u64) -> u64 {
    (budget as f64 * (1.0 - FIT_MARGIN)) as u64
}

/// The fastest setting with the configured effective batch whose predicted peak fits
/// `budget` less [`FIT_MARGIN`], among those this build can run: `sepdist plan --fit` less the
/// design-only settings (bf16 without CUDA training).
pub fn fit_to(planner: &Planner, budget: u64) -> Result<Fit, TrainError> {
    let base = planner.configured();
    let effective = base.micro_batch * base.accumulation * planner.world;
    let candidates: Vec<Setting> = planner
        .fit_candidates(effective)
        .map_err(plan_error)?
        .into_iter()
        .filter(|s| planner.predict(s).implemented)
        .collect();
    planner
        .fit_among(&candidates, with_margin(budget))
        .map_err(plan_error)
}

/// After a step measured `measured` bytes against `budget`: the fastest setting of the same
/// effective batch predicted to fit `budget` once the prediction is corrected by what was
/// measured (`budget × predicted / measured` when the plan was low), with a lower predicted
/// peak than the running one, so that refitting again always makes progress. `same_stage`
/// keeps the ZeRO stage (a running trainer's shards are laid out for it). `None`: nothing
/// smaller fits.
pub fn fitted_after_failure(
    planner: &Planner,
    budget: u64,
    shortfall: f64,
    same_stage: bool,
) -> Result<Option<Prediction>, TrainError> {
    let current = planner.configured();
    let predicted = planner.predict(&current).peak;
    let corrected = if shortfall > 1.0 {
        (budget as f64 / shortfall) as u64
    } else {
        budget
    };
    let corrected = with_margin(corrected);
    let base = &current;
    let effective = base.micro_batch * base.accumulation * planner.world;
    let candidates: Vec<Setting> = planner
        .fit_candidates(effective)
        .map_err(plan_error)?
        .into_iter()
        .filter(|s| !same_stage || s.zero_stage == base.zero_stage)
        .filter(|s| {
            let p = planner.predict(s);
            p.implemented && p.peak < predicted
        })
        .collect();
    if candidates.is_empty() {
        return Ok(None);
    }
    Ok(
        match planner
            .fit_among(&candidates, corrected)
            .map_err(plan_error)?
        {
            Fit::Fits(best) => Some(*best),
            Fit::Short(_) => None,
        },
    )
}

/// Text of a fitted setting: what it is, its predicted peak, and the `--set` line.
pub fn fitted_text(best: &Prediction, base: &Setting) -> String {
    format!(
        "{}: predicted peak {}\n  {}",
        describe_fit(&best.setting),
        format_bytes(best.peak),
        set_args(&best.setting.overrides(base))
    )
}

/// One rank's pre-flight figures, exchanged between the ranks.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RankCheck {
    peak: u64,
    measured: Option<Measured>,
}

/// The pre-flight check of every rank (a collective: every rank calls it). Returns the config
/// to train with: the given one, or with `training.on_oom: refit` the fitted setting when the
/// configured one does not fit. Refuses with [`TrainError::OutOfMemory`] on every rank when
/// the prediction exceeds what some rank has, unless `force`.
pub fn preflight(
    cfg: Config,
    comm: &dyn Communicator,
    force: bool,
    device: &dyn DeviceMemory,
) -> Result<Config, TrainError> {
    let world = comm.world_size();
    let planner = planner_on(&cfg, world, device.spec())?;
    let predicted = planner.predict(&planner.configured());
    let mine = RankCheck {
        peak: predicted.peak,
        measured: device.free(),
    };
    let bytes = serde_json::to_vec(&mine)
        .map_err(|e| TrainError::Setup(format!("cannot encode the memory check: {e}")))?;
    let all: Vec<RankCheck> = comm
        .all_gather_bytes(&bytes)?
        .iter()
        .map(|b| serde_json::from_slice(b))
        .collect::<Result<_, _>>()
        .map_err(|e| TrainError::Setup(format!("a rank sent a bad memory check: {e}")))?;
    let rank0 = comm.rank() == 0;
    // What each rank may use, its pool's free memory split between the ranks drawing on it.
    let pool = |c: &RankCheck| c.measured.as_ref().map(|m| m.pool.clone());
    let avail: Vec<Option<Available>> = all
        .iter()
        .map(|c| {
            let sharing = all.iter().filter(|o| pool(o) == pool(c)).count();
            available(&cfg.training, c.measured.clone(), sharing)
        })
        .collect();
    let mut text = String::new();
    for (r, a) in avail.iter().enumerate() {
        if let Some(w) = a.as_ref().and_then(|a| a.warning.as_ref()) {
            text.push_str(&format!("warning: rank {r}: {w}\n"));
        }
    }
    let short: Vec<(usize, &Available)> = all
        .iter()
        .zip(&avail)
        .enumerate()
        .filter_map(|(r, (c, a))| a.as_ref().map(|a| (r, c, a)))
        .filter(|(_, c, a)| c.peak > a.bytes)
        .map(|(r, _, a)| (r, a))
        .collect();
    let tightest = avail
        .iter()
        .enumerate()
        .filter_map(|(r, a)| a.as_ref().map(|a| (r, a)))
        .min_by_key(|(_, a)| a.bytes);
    // Within the budget (or nothing known to check against): say nothing, the run's output
    // stays as it was; only warnings.
    let Some((tight_rank, tight)) = tightest.filter(|_| !short.is_empty()) else {
        print_once(rank0, &text);
        return Ok(cfg);
    };
    let on = if world > 1 {
        format!(" on rank {tight_rank}")
    } else {
        String::new()
    };
    let ranks: Vec<String> = short.iter().map(|(r, _)| r.to_string()).collect();
    text.push_str(&format!(
        "memory check: the predicted peak {} per rank does not fit the {} available{on} ({}){}",
        format_bytes(predicted.peak),
        format_bytes(tight.bytes),
        tight.source,
        if world > 1 {
            format!("; short on rank(s) {}", ranks.join(", "))
        } else {
            String::new()
        }
    ));
    breakdown(&planner, &predicted, tight.bytes, &mut text);
    let base = planner.configured();
    let g = base.micro_batch * base.accumulation * world;
    let fitted = match fit_to(&planner, tight.bytes)? {
        Fit::Fits(best) => {
            text.push_str(&format!(
                "fitted setting for {} with the same effective batch {g} (`sepdist plan --fit`, keeping {:.0} % free): {}\n",
                format_bytes(tight.bytes),
                FIT_MARGIN * 100.0,
                fitted_text(&best, &base)
            ));
            Some(best)
        }
        Fit::Short(closest) => {
            text.push_str(&format!(
                "no micro-batch, accumulation, checkpointing or ZeRO setting of the effective batch {g} fits {}: the closest, {}, needs {}; shorter segments (dataset.segment_length), more ranks or more memory are left\n",
                format_bytes(tight.bytes),
                describe_fit(&closest.setting),
                format_bytes(closest.peak)
            ));
            None
        }
    };
    let summary = format!(
        "out of memory before training: the predicted peak {} per rank exceeds the {} available{on}; nothing was allocated",
        format_bytes(predicted.peak),
        format_bytes(tight.bytes)
    );
    if force {
        text.push_str("--force: starting anyway\n");
        print_once(rank0, &text);
        return Ok(cfg);
    }
    if let (OnOom::Refit, Some(best)) = (cfg.training.on_oom, &fitted) {
        text.push_str("training.on_oom: refit: starting with the fitted setting\n");
        print_once(rank0, &text);
        return Ok(best.setting.apply(&cfg));
    }
    text.push_str(if fitted.is_some() {
        "nothing was allocated; run with the overrides above, set training.on_oom: refit to apply them by itself, or start anyway with --force\n"
    } else {
        "nothing was allocated; start anyway with --force\n"
    });
    print_once(rank0, &text);
    // No rank exits before rank 0's message is out (launchers kill the rest on the first
    // non-zero exit).
    comm.barrier()?;
    Err(TrainError::OutOfMemory(summary))
}

/// How the CUDA libraries that candle calls name an allocation failure in their errors' text:
/// cudarc prints a driver error as `DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")` and
/// cuBLAS's and cuDNN's as `CublasError(CUBLAS_STATUS_ALLOC_FAILED)`, `...(CUDNN_STATUS_ALLOC_FAILED)`.
/// Only these codes count: "out of memory" alone also names host failures (which abort the
/// process before any error is returned anyway).
const CUDA_OOM_CODES: [&str; 3] = [
    "CUDA_ERROR_OUT_OF_MEMORY",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
];

/// The message of the CUDA out-of-memory error inside `e` (the contexts candle added, without
/// its backtrace), or `None` when `e` is any other error. candle wraps a cudarc error as
/// `Error::Cuda(CudaError::Cuda(DriverError))` (`.w()`), cuDNN's build as
/// `Error::Wrapped(DriverError)`, either possibly inside `WithBacktrace` (`RUST_BACKTRACE`),
/// `Context`, `WithPath` or `WrappedContext`; the chain is walked through each.
pub fn cuda_out_of_memory(e: &candle_core::Error) -> Option<String> {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => cuda_out_of_memory(inner),
        E::Context { inner, context } => {
            cuda_out_of_memory(inner).map(|m| format!("{context}: {m}"))
        }
        E::WithPath { inner, path } => {
            cuda_out_of_memory(inner).map(|m| format!("{}: {m}", path.display()))
        }
        E::Cuda(inner) => oom_in_error(inner.as_ref()),
        E::WrappedContext { wrapped, context } => {
            oom_in_error(wrapped.as_ref()).map(|m| format!("{context}: {m}"))
        }
        E::Wrapped(inner) => oom_in_text(&inner.to_string()),
        E::Msg(text) => oom_in_text(text),
        _ => None,
    }
}

/// [`cuda_out_of_memory`] of a boxed error and its sources.
fn oom_in_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(inner) = e.downcast_ref::<candle_core::Error>() {
        return cuda_out_of_memory(inner);
    }
    #[cfg(feature = "cuda")]
    if let Some(c) = e.downcast_ref::<candle_core::cuda_backend::CudaError>() {
        return cuda_error_is_oom(c).then(|| c.to_string());
    }
    oom_in_text(&e.to_string()).or_else(|| e.source().and_then(oom_in_error))
}

fn oom_in_text(text: &str) -> Option<String> {
    CUDA_OOM_CODES
        .iter()
        .any(|code| text.contains(code))
        .then(|| text.trim().to_string())
}

/// The codes themselves, where the build has the types.
#[cfg(feature = "cuda")]
fn cuda_error_is_oom(e: &candle_core::cuda_backend::CudaError) -> bool {
    use candle_core::cuda_backend::CudaError;
    use candle_core::cuda_backend::cudarc::cublas::sys::cublasStatus_t;
    use candle_core::cuda_backend::cudarc::driver::sys::CUresult;
    match e {
        CudaError::Cuda(d) | CudaError::Load { cuda: d, .. } => {
            d.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY
        }
        CudaError::Cublas(c) => c.0 == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED,
        _ => false,
    }
}

/// Whether `e` (one link of an error chain) is a CUDA out-of-memory error of a tensor op: a
/// candle error or a [`TrainError`] that carries one.
pub fn is_cuda_out_of_memory(e: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(c) = e.downcast_ref::<candle_core::Error>() {
        return cuda_out_of_memory(c).is_some();
    }
    e.downcast_ref::<TrainError>()
        .is_some_and(|t| t.cuda_out_of_memory().is_some())
}

/// How many times over the plan a failed step was (1 when the plan was not low): its measured
/// peak over the predicted peak, or, when it failed in the first micro-batch's forward at block
/// `reached.1` needing at least `reached.0` bytes, those bytes over the plan's prediction at
/// that block ([`Prediction::forward_reached`]): a failure a few blocks in, still below the
/// plan's peak, then shows how low the plan is. The refit divides the budget by it.
pub fn shortfall(
    prediction: &Prediction,
    measured: u64,
    reached: Option<(u64, usize)>,
) -> Shortfall {
    let mut low = Shortfall {
        factor: 1.0,
        needed: measured,
        predicted: prediction.peak,
        block: None,
    };
    if measured > prediction.peak && prediction.peak > 0 {
        low.factor = measured as f64 / prediction.peak as f64;
    }
    if let Some((bytes, block)) = reached {
        let at = prediction.forward_reached(block);
        if at > 0 && bytes as f64 / at as f64 > low.factor {
            low = Shortfall {
                factor: bytes as f64 / at as f64,
                needed: bytes,
                predicted: at,
                block: Some(block),
            };
        }
    }
    low
}

/// What [`shortfall`] found: the factor and the two figures it is the ratio of.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shortfall {
    /// `needed / predicted`, at least 1.
    pub factor: f64,
    pub needed: u64,
    pub predicted: u64,
    /// The block of the first micro-batch's forward the figures are at; `None`: the step's
    /// peak.
    pub block: Option<usize>,
}

impl TrainError {
    /// The message of a CUDA out-of-memory error raised by a tensor op ([`cuda_out_of_memory`]);
    /// `None` for every other error, including a collective's (whose CUDA failures break the
    /// process group: they are not recoverable at a step boundary).
    pub fn cuda_out_of_memory(&self) -> Option<String> {
        match self {
            TrainError::Model(sepdist_model::ModelError::Candle(e)) => cuda_out_of_memory(e),
            _ => None,
        }
    }
}

/// What a rank could use when an op ran out of device memory: what its pool held from the
/// driver at the failure (`reserved`) plus the device's free memory (`free`, measured after
/// the step's tensors were dropped), less `training.memory_reserve`; or
/// `training.memory_budget` when that is smaller (or nothing was measured).
pub fn capacity_after_failure(
    t: &TrainingConfig,
    reserved: u64,
    free: Option<Measured>,
) -> Option<Available> {
    let device = free.map(|m| Available {
        bytes: (reserved + m.bytes).saturating_sub(t.memory_reserve.0),
        source: format!(
            "reserved {} + {} {} − training.memory_reserve {}",
            format_bytes(reserved),
            m.source,
            format_bytes(m.bytes),
            t.memory_reserve
        ),
        warning: None,
    });
    let budget = t.memory_budget.map(|b| Available {
        bytes: b.0,
        source: format!("training.memory_budget {b}"),
        warning: None,
    });
    match (device, budget) {
        (Some(d), Some(b)) => Some(if b.bytes < d.bytes { b } else { d }),
        (d, b) => d.or(b),
    }
}

/// Rank 0 writes `text` to stderr in one piece (the launcher forwards it whole).
fn print_once(rank0: bool, text: &str) {
    if rank0 && !text.is_empty() {
        let _ = std::io::Write::write_all(&mut std::io::stderr(), text.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sepdist_config::ByteSize;

    fn measured(bytes: u64) -> Option<Measured> {
        Some(Measured {
            bytes,
            source: "test".into(),
            pool: "node".into(),
        })
    }

    #[test]
    fn cgroup_v2_takes_the_tightest_level_and_ignores_max() {
        let root = tempfile::tempdir().expect("tempdir");
        let job = root.path().join("slurm/job_7");
        std::fs::create_dir_all(&job).expect("mkdir");
        std::fs::write(root.path().join("cgroup.controllers"), "memory\n").expect("write");
        std::fs::write(root.path().join("memory.max"), "max\n").expect("write");
        std::fs::write(root.path().join("slurm/memory.max"), "10000\n").expect("write");
        std::fs::write(root.path().join("slurm/memory.current"), "9000\n").expect("write");
        std::fs::write(job.join("memory.max"), "8000\n").expect("write");
        std::fs::write(job.join("memory.current"), "2000\n").expect("write");
        let m = cgroup_headroom("0::/slurm/job_7\n", root.path()).expect("a limit");
        // The job has 6000 left, its parent only 1000.
        assert_eq!(m.bytes, 1000);
        assert!(m.source.contains("slurm/memory.max"), "{}", m.source);
        // Ranks in this cgroup share it whatever its usage was when each looked.
        assert_eq!(
            m.pool,
            root.path().join("slurm/memory.max").display().to_string()
        );
        assert!(cgroup_headroom("0::/\n", root.path()).is_none());
    }

    #[test]
    fn cgroup_v1_memory_controller_and_its_unlimited_value() {
        let root = tempfile::tempdir().expect("tempdir");
        let mem = root.path().join("memory");
        std::fs::create_dir_all(mem.join("box")).expect("mkdir");
        std::fs::write(mem.join("memory.limit_in_bytes"), "9223372036854771712\n").expect("w");
        std::fs::write(mem.join("box/memory.limit_in_bytes"), "5000\n").expect("w");
        std::fs::write(mem.join("box/memory.usage_in_bytes"), "1500\n").expect("w");
        let text = "5:devices:/\n4:memory:/box\n0::/\n";
        assert_eq!(
            cgroup_headroom(text, root.path()).map(|m| m.bytes),
            Some(3500)
        );
        // A path outside the namespace's view: only the mount's root is read (no limit).
        assert!(cgroup_headroom("4:memory:/../elsewhere\n", root.path()).is_none());
    }

    #[test]
    fn cpu_memory_is_the_smaller_of_memavailable_and_the_cgroup() {
        let root = tempfile::tempdir().expect("tempdir");
        let meminfo = root.path().join("meminfo");
        std::fs::write(&meminfo, "MemTotal: 100 kB\nMemAvailable: 4 kB\n").expect("w");
        let cg = root.path().join("cgroup");
        std::fs::write(&cg, "0::/\n").expect("w");
        let sys = root.path().join("sys");
        std::fs::create_dir_all(&sys).expect("mkdir");
        std::fs::write(sys.join("cgroup.controllers"), "").expect("w");
        std::fs::write(sys.join("memory.max"), "10000\n").expect("w");
        std::fs::write(sys.join("memory.current"), "0\n").expect("w");
        let m = CpuMemory::at(&meminfo, &cg, &sys).free().expect("measured");
        assert_eq!((m.bytes, m.source.as_str()), (4096, "MemAvailable"));
        std::fs::write(sys.join("memory.current"), "9000\n").expect("w");
        let m = CpuMemory::at(&meminfo, &cg, &sys).free().expect("measured");
        assert_eq!(m.bytes, 1000);
        assert!(
            CpuMemory::at("/nonexistent", "/nonexistent", "/nonexistent")
                .free()
                .is_none()
        );
    }

    #[test]
    fn the_budget_wins_over_the_device_and_the_reserve_applies_to_the_device_only() {
        let mut t = TrainingConfig {
            memory_reserve: ByteSize(100),
            ..TrainingConfig::default()
        };
        let a = available(&t, measured(1000), 1).expect("known");
        assert_eq!(a.bytes, 900);
        assert!(a.source.contains("memory_reserve 100B"), "{}", a.source);
        // Two ranks on one node: each has half of it, less its own reserve.
        let a = available(&t, measured(1000), 2).expect("known");
        assert_eq!(a.bytes, 400);
        assert!(a.source.contains("shared by 2 ranks"), "{}", a.source);
        assert!(available(&t, None, 1).is_none());
        t.memory_budget = Some(ByteSize(500));
        let a = available(&t, measured(1000), 1).expect("known");
        assert_eq!((a.bytes, a.warning), (500, None));
        t.memory_budget = Some(ByteSize(5000));
        let a = available(&t, measured(1000), 1).expect("known");
        assert_eq!(a.bytes, 5000);
        assert!(
            a.warning
                .is_some_and(|w| w.contains("more than the 1.0 kB free"))
        );
    }

    /// cudarc's `DriverError` as it prints (its `Display` is its `Debug`: the code's name and
    /// `cuGetErrorString`'s text); the type exists only in CUDA builds.
    #[derive(Debug)]
    #[allow(dead_code)] // read through `Debug`, as cudarc's `Display` does
    struct DriverError(Code, &'static str);

    #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
    #[derive(Debug)]
    enum Code {
        CUDA_ERROR_OUT_OF_MEMORY,
        CUDA_ERROR_ILLEGAL_ADDRESS,
    }

    impl std::fmt::Display for DriverError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{self:?}")
        }
    }

    impl std::error::Error for DriverError {}

    /// candle's `CudaError`, which wraps the driver's error transparently.
    #[derive(Debug, thiserror::Error)]
    enum CudaError {
        #[error(transparent)]
        Cuda(#[from] DriverError),
    }

    fn out_of_memory() -> DriverError {
        DriverError(Code::CUDA_ERROR_OUT_OF_MEMORY, "out of memory")
    }

    /// As candle's `.w()` builds it, with a backtrace as under `RUST_BACKTRACE=1`.
    fn candle_cuda(e: DriverError) -> candle_core::Error {
        candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Cuda(Box::new(CudaError::from(e)))),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        }
    }

    #[test]
    fn a_cuda_out_of_memory_is_recognised_through_candle_s_wrappers_without_the_backtrace() {
        let expected = r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#;
        let e = candle_cuda(out_of_memory());
        // The error's own text carries the backtrace; the message does not.
        assert!(e.to_string().len() > expected.len());
        assert_eq!(cuda_out_of_memory(&e).as_deref(), Some(expected));
        let e = candle_cuda(out_of_memory()).context("qkv projection");
        assert_eq!(
            cuda_out_of_memory(&e).as_deref(),
            Some(format!("qkv projection: {expected}").as_str())
        );
        // cuDNN builds: `Error::wrap(DriverError)`; a `Result<_, candle::Error>` with context.
        let e = candle_core::Error::wrap(out_of_memory());
        assert_eq!(cuda_out_of_memory(&e).as_deref(), Some(expected));
        let r: Result<(), candle_core::Error> = Err(candle_cuda(out_of_memory()));
        let e = candle_core::Context::context(r, "iSTFT").expect_err("an error");
        assert_eq!(
            cuda_out_of_memory(&e).as_deref(),
            Some(format!("iSTFT: {expected}").as_str())
        );
        let e = candle_core::Error::Cuda(Box::new(CudaError::from(DriverError(
            Code::CUDA_ERROR_OUT_OF_MEMORY,
            "out of memory",
        ))));
        assert!(cuda_out_of_memory(&e).is_some());
        // cuBLAS's workspace.
        let e = candle_core::Error::Cuda("CublasError(CUBLAS_STATUS_ALLOC_FAILED)".into());
        assert!(cuda_out_of_memory(&e).is_some());
        // Through the trainer's error.
        let t = TrainError::from(candle_cuda(out_of_memory()));
        assert_eq!(t.cuda_out_of_memory().as_deref(), Some(expected));
    }

    #[test]
    fn other_errors_are_not_a_cuda_out_of_memory() {
        let illegal = DriverError(
            Code::CUDA_ERROR_ILLEGAL_ADDRESS,
            "an illegal memory access was encountered",
        );
        assert!(cuda_out_of_memory(&candle_cuda(illegal)).is_none());
        // "out of memory" alone names no CUDA failure.
        assert!(cuda_out_of_memory(&candle_core::Error::Msg("out of memory".into())).is_none());
        let host = std::io::Error::new(std::io::ErrorKind::OutOfMemory, "out of memory");
        assert!(cuda_out_of_memory(&candle_core::Error::from(host)).is_none());
        let shape = candle_core::Error::ShapeMismatch {
            buffer_size: 3,
            shape: candle_core::Shape::from(4),
        };
        assert!(cuda_out_of_memory(&shape).is_none());
        // A collective's CUDA failure breaks the process group: not a step's to decide.
        let broken = TrainError::Comm(sepdist_comm::CommError::Broken {
            reason: format!(
                "NCCL staging buffers: device allocation of 8 floats: {}",
                out_of_memory()
            ),
        });
        assert!(broken.cuda_out_of_memory().is_none());
        assert!(
            TrainError::Setup("CUDA_ERROR_OUT_OF_MEMORY".into())
                .cuda_out_of_memory()
                .is_none()
        );
    }

    /// The real types of a CUDA build (the text needs the driver: only where a device opens).
    #[cfg(feature = "cuda")]
    #[test]
    fn the_driver_s_out_of_memory_code_is_recognised() {
        use candle_core::cuda_backend::CudaError;
        use candle_core::cuda_backend::cudarc::driver::{DriverError, sys::CUresult};
        if candle_core::Device::new_cuda(0).is_err() {
            eprintln!("skipped: no CUDA device");
            return;
        }
        let oom = candle_core::Error::Cuda(Box::new(CudaError::from(DriverError(
            CUresult::CUDA_ERROR_OUT_OF_MEMORY,
        ))))
        .bt();
        let message = cuda_out_of_memory(&oom).expect("an out-of-memory");
        assert!(message.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{message}");
        let other = candle_core::Error::Cuda(Box::new(CudaError::from(DriverError(
            CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
        ))));
        assert!(cuda_out_of_memory(&other).is_none());
    }

    #[test]
    fn the_capacity_after_a_failure_is_the_pool_and_the_free_memory_or_a_smaller_budget() {
        let mut t = TrainingConfig {
            memory_reserve: ByteSize(100),
            ..TrainingConfig::default()
        };
        let a = capacity_after_failure(&t, 700, measured(1000)).expect("known");
        assert_eq!(a.bytes, 1600);
        assert!(a.source.contains("reserved 700 B + test"), "{}", a.source);
        assert!(capacity_after_failure(&t, 700, None).is_none());
        t.memory_budget = Some(ByteSize(1200));
        let a = capacity_after_failure(&t, 700, measured(1000)).expect("known");
        assert_eq!(
            (a.bytes, a.source.as_str()),
            (1200, "training.memory_budget 1200B")
        );
        assert_eq!(
            capacity_after_failure(&t, 700, None).map(|a| a.bytes),
            Some(1200)
        );
        t.memory_budget = Some(ByteSize(5000));
        assert_eq!(
            capacity_after_failure(&t, 700, measured(1000)).map(|a| a.bytes),
            Some(1600)
        );
    }

    fn tiny() -> Config {
        let mut cfg = Config::default();
        cfg.model.n_layers = 1;
        cfg.model.emb_dim = 16;
        cfg.model.n_heads = 2;
        cfg.model.ffn_hidden_dim = [32, 32];
        cfg.model.mask_hidden_dim = Some(32);
        cfg.model.n_fft = 256;
        cfg.model.hop_length = 64;
        cfg.model.bands =
            sepdist_config::Bands::Widths(vec![4, 4, 4, 4, 4, 4, 4, 4, 8, 8, 8, 8, 16, 16, 33]);
        cfg.dataset.segment_length = 2048;
        cfg.training.batch_size = 4;
        cfg.training.gradient_accumulation_steps = 1;
        cfg
    }

    #[test]
    fn a_failed_step_refits_to_a_smaller_setting_of_the_same_batch() {
        let cfg = tiny();
        let p = planner(&cfg, 1).expect("planner");
        let prediction = p.predict(&p.configured());
        let peak = prediction.peak;
        let best = fitted_after_failure(
            &p,
            peak * 3 / 4,
            shortfall(&prediction, peak, None).factor,
            true,
        )
        .expect("fit")
        .expect("a smaller setting fits");
        let s = &best.setting;
        assert_eq!(s.micro_batch * s.accumulation, 4);
        assert!(best.peak <= peak * 3 / 4 && s.micro_batch < 4, "{s:?}");
        // Measured 10 % above the plan: the plan of the refit must leave that much room.
        let over = shortfall(&prediction, peak + peak / 10, None).factor;
        let corrected = fitted_after_failure(&p, peak * 3 / 4, over, true)
            .expect("fit")
            .expect("fits");
        assert!(corrected.peak as f64 * 1.1 <= (peak * 3 / 4) as f64 * 1.001);
        // Nothing fits one byte.
        assert!(
            fitted_after_failure(&p, 1, 1.0, true)
                .expect("fit")
                .is_none()
        );
    }

    /// A failure part-way through the first forward, below the plan's peak, still scales the
    /// plan: by what that block needed over what the plan predicted there.
    #[test]
    fn a_failure_early_in_the_forward_scales_the_plan_at_that_block() {
        let cfg = tiny();
        let p = planner(&cfg, 1).expect("planner");
        let prediction = p.predict(&p.configured());
        // Block 1 (the first transformer) needed three times the plan there.
        let at = prediction.forward_reached(1);
        assert!(at > prediction.forward_reached(0) && at < prediction.peak);
        let needed = 3 * at;
        let factor = shortfall(&prediction, needed, Some((needed, 1))).factor;
        assert!((factor - 3.0).abs() < 1e-9, "{factor}");
        // Without the block: only the peak's ratio, below 3.
        assert!(shortfall(&prediction, needed, None).factor < 3.0);
        // A plan that was not low is not scaled.
        assert_eq!(
            shortfall(&prediction, at / 2, Some((at / 2, 1))).factor,
            1.0
        );
        // The refit leaves room for the factor.
        let budget = prediction.peak;
        if let Some(best) = fitted_after_failure(&p, budget, factor, true).expect("fit") {
            assert!(
                best.peak as f64 * 3.0 <= budget as f64 * 1.001,
                "{:?}",
                best.setting
            );
        }
    }
}
