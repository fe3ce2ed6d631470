//! The device that `train`, `bench`, `separate` and `eval` run on (`training.device`,
//! `--device auto|cpu|cuda`), and what the rest of the trainer needs to know about it: its
//! memory for the pre-flight check ([`memory`]), the counters behind the progress line's
//! `mem=allocated/reserved` ([`memory_counter`]), the planner's device spec ([`spec`]).
//!
//! - `cpu`: the CPU.
//! - `cuda`: GPU `local_rank % visible GPUs` (the GPU NCCL's backend opens for the same local
//!   rank); an error naming the driver's message when none opens, or when this build has no
//!   CUDA.
//! - `auto`: that GPU when this build has CUDA and it opens (probed with `Device::new_cuda`;
//!   candle's `cuda_is_available()` only says the feature was compiled), else the CPU, with a
//!   note saying why.
//!
//! Parameters, gradients and the optimizer stay in host memory whatever the device (the engine
//! copies the weights in and the gradients out); the device holds the model's tensors and
//! activations.

use crate::memory::HeapCounter;
use crate::oom::{CpuMemory, DeviceMemory};
use crate::plan::{DeviceKind, DeviceSpec, cpu_threads};
use crate::trainer::TrainError;
use candle_core::{Device, DeviceLocation};
use sepdist_comm::Communicator;
use sepdist_config::{DeviceChoice, TrainingConfig};
use std::sync::Arc;

/// Whether this build has candle's CUDA backend (cargo feature `cuda`).
pub const CUDA_COMPILED: bool = cfg!(feature = "cuda");

/// What a user who asks for CUDA from a build without it is told.
pub const NO_CUDA: &str = "training.device: cuda, but this build has no CUDA; build with launch/build-cuda.sh --release --features cuda";

/// The device picked, and when `auto` fell back to the CPU in a CUDA build, why.
#[derive(Debug, Clone)]
pub struct Selected {
    pub device: Device,
    pub note: Option<String>,
}

/// The device of `choice` for the process with local rank `local_rank`. See the module docs.
pub fn select(choice: DeviceChoice, local_rank: usize) -> Result<Selected, TrainError> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    match decide(
        choice,
        CUDA_COMPILED,
        || open_cuda(local_rank),
        visible.as_deref(),
    ) {
        Ok(Pick::Cuda(device)) => Ok(Selected { device, note: None }),
        Ok(Pick::Cpu(note)) => Ok(Selected {
            device: Device::Cpu,
            note,
        }),
        Err(message) => Err(TrainError::Setup(message)),
    }
}

/// This rank's device for `train` and `bench`: [`select`]ed by `training.device` for the
/// rank's local rank (rank 0 prints why `auto` fell back to the CPU), then [`configure`]d.
pub fn open(t: &TrainingConfig, comm: &dyn Communicator) -> Result<Device, TrainError> {
    let selected = select(t.device, comm.topology().local_rank)?;
    if let (Some(note), 0) = (&selected.note, comm.rank()) {
        eprintln!("{note}");
    }
    configure(&selected.device, t)?;
    Ok(selected.device)
}

/// What [`decide`] picked: the opened GPU, or the CPU (with the reason when `auto` had to).
#[derive(Debug, PartialEq)]
enum Pick<D> {
    Cuda(D),
    Cpu(Option<String>),
}

/// The selection rules, apart from the driver: `open` opens the GPU (or says why not),
/// `visible` is `CUDA_VISIBLE_DEVICES`.
fn decide<D>(
    choice: DeviceChoice,
    compiled: bool,
    open: impl FnOnce() -> Result<D, String>,
    visible: Option<&str>,
) -> Result<Pick<D>, String> {
    let visible = visible.map_or_else(String::new, |v| format!("; CUDA_VISIBLE_DEVICES={v:?}"));
    match (choice, compiled) {
        (DeviceChoice::Cpu, _) | (DeviceChoice::Auto, false) => Ok(Pick::Cpu(None)),
        (DeviceChoice::Cuda, false) => Err(NO_CUDA.into()),
        (DeviceChoice::Cuda, true) => open()
            .map(Pick::Cuda)
            .map_err(|e| format!("training.device: cuda, but no CUDA device opens: {e}{visible}")),
        (DeviceChoice::Auto, true) => Ok(match open() {
            Ok(d) => Pick::Cuda(d),
            Err(e) => Pick::Cpu(Some(format!(
                "training.device: auto: no CUDA device opens ({e}{visible}); running on the CPU"
            ))),
        }),
    }
}

/// GPU `local_rank % visible`, opened by candle (its per-thread stream on the primary context,
/// the context and stream NCCL's backend uses for the same GPU).
#[cfg(feature = "cuda")]
fn open_cuda(local_rank: usize) -> Result<Device, String> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    let count = CudaContext::device_count()
        .map_err(|e| format!("cannot query the CUDA devices (cuInit/cuDeviceGetCount): {e}"))?;
    let count = usize::try_from(count).unwrap_or(0);
    if count == 0 {
        return Err("the driver sees no CUDA device".into());
    }
    let ordinal = local_rank % count;
    Device::new_cuda(ordinal).map_err(|e| format!("cannot open CUDA device {ordinal}: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_local_rank: usize) -> Result<Device, String> {
    Err(NO_CUDA.into())
}

/// `cpu`, `cuda:0`: for logs and metrics.
pub fn label(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The planner's device kind for a GPU named `name` (`NVIDIA H200`), when it is one it knows.
pub fn gpu_kind(name: &str) -> Option<DeviceKind> {
    let name = name.to_ascii_lowercase();
    if name.contains("h200") {
        Some(DeviceKind::H200)
    } else if name.contains("rtx pro 6000") {
        Some(DeviceKind::RtxPro6000)
    } else {
        None
    }
}

/// The planner's spec of `device`: the CPU's; for a GPU the spec of its kind by name (H200,
/// RTX PRO 6000), else an H200's speeds with the GPU's measured total memory (the planner's
/// memory prediction is the same for every GPU kind; the speeds only rank settings).
pub fn spec(device: &Device) -> DeviceSpec {
    #[cfg(feature = "cuda")]
    if let Some(pool) = sepdist_comm::cuda_memory::DevicePool::of(device) {
        return cuda::gpu_spec(&pool);
    }
    let _ = device;
    DeviceSpec::new(DeviceKind::Cpu, cpu_threads())
}

/// Sets up `device` for training: on CUDA, the pool's release threshold
/// (`training.cuda_pool_release_threshold`) and the matmuls' precision (`training.tf32`).
/// Nothing on the CPU.
pub fn configure(device: &Device, t: &TrainingConfig) -> Result<(), TrainError> {
    if device.is_cuda() {
        // cuBLAS' compute type of candle's GEMMs, process-wide: TF32 tensor cores for fp32,
        // reduced-precision reductions for bf16 (candle's defaults are off for both).
        candle_core::cuda::set_gemm_reduced_precision_f32(t.tf32);
        candle_core::cuda::set_gemm_reduced_precision_bf16(t.tf32);
    }
    #[cfg(feature = "cuda")]
    if let Some(pool) = sepdist_comm::cuda_memory::DevicePool::of(device) {
        pool.set_release_threshold(t.cuda_pool_release_threshold.bytes())
            .map_err(|e| {
                TrainError::Setup(format!(
                    "training.cuda_pool_release_threshold: {}: {e}",
                    t.cuda_pool_release_threshold
                ))
            })?;
    }
    let _ = (device, t);
    Ok(())
}

/// Free memory of `device` for the pre-flight check: host memory ([`CpuMemory`]) or the GPU's
/// (`cuMemGetInfo`).
pub fn memory(device: &Device) -> Box<dyn DeviceMemory> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = sepdist_comm::cuda_memory::DevicePool::of(device) {
        return Box::new(cuda::GpuMemory {
            pool,
            label: label(device),
        });
    }
    let _ = device;
    Box::new(CpuMemory::system())
}

/// The counters behind the memory meter on `device`: the GPU's pool (allocated = pool used,
/// reserved = pool reserved); `None` on the CPU (the binary's counting allocator and RSS).
pub fn memory_counter(device: &Device) -> Option<Arc<dyn HeapCounter>> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = sepdist_comm::cuda_memory::DevicePool::of(device) {
        return Some(Arc::new(cuda::PoolCounter {
            pool,
            label: label(device),
        }));
    }
    let _ = device;
    None
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::oom::Measured;
    use sepdist_comm::cuda_memory::{DevicePool, PoolCounters};

    /// A GPU's free memory for the pre-flight check.
    pub(super) struct GpuMemory {
        pub pool: DevicePool,
        pub label: String,
    }

    impl DeviceMemory for GpuMemory {
        fn free(&self) -> Option<Measured> {
            let (free, _) = self.pool.mem_get_info().ok()?;
            let name = self.pool.name().unwrap_or_default();
            // Ranks that see the same physical GPU share its memory.
            let address = self
                .pool
                .pci_address()
                .unwrap_or_else(|_| self.label.clone());
            Some(Measured {
                bytes: free,
                source: format!("cuMemGetInfo free on {} ({name})", self.label),
                pool: format!("{} gpu {address}", crate::oom::hostname()),
            })
        }

        fn spec(&self) -> DeviceSpec {
            gpu_spec(&self.pool)
        }
    }

    /// See [`super::spec`].
    pub(super) fn gpu_spec(pool: &DevicePool) -> DeviceSpec {
        let name = pool.name().unwrap_or_default();
        if let Some(kind) = gpu_kind(&name) {
            return DeviceSpec::new(kind, 1);
        }
        let mut spec = DeviceSpec::new(DeviceKind::H200, 1);
        if let Ok((_, total)) = pool.mem_get_info() {
            spec.capacity = total;
            spec.capacity_note = format!(
                "{} total of {name} (cuMemGetInfo); speeds of an H200 assumed",
                crate::plan::format_bytes(total)
            );
        }
        spec
    }

    /// The pool's counters as the memory meter's allocator: current and peak = pool used,
    /// reserved = pool reserved. Without a pool (a device that allocates with `cuMemAlloc`),
    /// every figure is the device's `total − free` (no high-water mark exists then).
    pub(super) struct PoolCounter {
        pub pool: DevicePool,
        pub label: String,
    }

    impl PoolCounter {
        fn counters(&self) -> PoolCounters {
            match self.pool.counters() {
                Ok(Some(c)) => c,
                // No pool, or the query failed: what the device has handed out.
                _ => {
                    let used = self
                        .pool
                        .mem_get_info()
                        .map_or(0, |(free, total)| total.saturating_sub(free));
                    PoolCounters {
                        used,
                        used_high: used,
                        reserved: used,
                        reserved_high: used,
                    }
                }
            }
        }
    }

    fn bytes(b: u64) -> usize {
        usize::try_from(b).unwrap_or(usize::MAX)
    }

    impl HeapCounter for PoolCounter {
        fn current(&self) -> usize {
            bytes(self.counters().used)
        }
        fn peak(&self) -> usize {
            bytes(self.counters().used_high)
        }
        fn reset_peak(&self) {
            // A failed reset leaves a higher peak: never wrong in the safe direction.
            let _ = self.pool.reset_high_water(false);
        }
        fn reserved(&self) -> (usize, usize) {
            let c = self.counters();
            (bytes(c.reserved), bytes(c.reserved_high))
        }
        fn describe(&self) -> String {
            format!("the CUDA memory pool of {}", self.label)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opens() -> Result<&'static str, String> {
        Ok("gpu")
    }

    fn fails() -> Result<&'static str, String> {
        Err("cuInit: CUDA_ERROR_NO_DEVICE".into())
    }

    #[test]
    fn cpu_is_the_cpu_whatever_the_build() {
        for compiled in [false, true] {
            let pick = decide(DeviceChoice::Cpu, compiled, opens, None);
            assert_eq!(pick, Ok(Pick::Cpu(None)));
        }
    }

    #[test]
    fn cuda_without_the_feature_says_how_to_build() {
        let e = decide(DeviceChoice::Cuda, false, opens, None).expect_err("no CUDA");
        assert_eq!(e, NO_CUDA);
        assert!(
            e.contains("launch/build-cuda.sh --release --features cuda"),
            "{e}"
        );
        // Not even probed.
        let probe = || -> Result<(), String> { panic!("probed a build without CUDA") };
        assert_eq!(
            decide(DeviceChoice::Auto, false, probe, None),
            Ok(Pick::Cpu(None))
        );
    }

    #[test]
    fn cuda_that_does_not_open_names_the_driver_and_the_visible_devices() {
        assert_eq!(
            decide(DeviceChoice::Cuda, true, opens, None),
            Ok(Pick::Cuda("gpu"))
        );
        let e = decide(DeviceChoice::Cuda, true, fails, None).expect_err("no device");
        assert!(
            e.starts_with("training.device: cuda, but no CUDA device opens"),
            "{e}"
        );
        assert!(e.contains("CUDA_ERROR_NO_DEVICE"), "{e}");
        assert!(!e.contains("CUDA_VISIBLE_DEVICES"), "{e}");
        let e = decide(DeviceChoice::Cuda, true, fails, Some("")).expect_err("no device");
        assert!(e.contains("CUDA_VISIBLE_DEVICES=\"\""), "{e}");
    }

    #[test]
    fn auto_takes_the_gpu_when_it_opens_else_the_cpu_with_the_reason() {
        assert_eq!(
            decide(DeviceChoice::Auto, true, opens, None),
            Ok(Pick::Cuda("gpu"))
        );
        match decide(DeviceChoice::Auto, true, fails, Some("3")) {
            Ok(Pick::Cpu(Some(note))) => {
                assert!(note.contains("CUDA_ERROR_NO_DEVICE"), "{note}");
                assert!(note.contains("CUDA_VISIBLE_DEVICES=\"3\""), "{note}");
                assert!(note.ends_with("running on the CPU"), "{note}");
            }
            other => panic!("expected the CPU with a note, got {other:?}"),
        }
    }

    #[test]
    fn this_build_selects_consistently() {
        // No GPU is needed: on a machine without one, `auto` is the CPU and `cuda` an error.
        let auto = select(DeviceChoice::Auto, 0).expect("auto always selects");
        match &auto.device {
            Device::Cpu => assert_eq!(auto.note.is_some(), CUDA_COMPILED),
            other => {
                assert!(
                    cfg!(feature = "cuda") && auto.note.is_none(),
                    "{other:?} from a build without CUDA, or with a note"
                );
            }
        }
        let cuda = select(DeviceChoice::Cuda, 0);
        match (&auto.device, cuda) {
            (Device::Cpu, Err(TrainError::Setup(m))) => {
                assert!(m.starts_with("training.device: cuda, but"), "{m}");
            }
            (Device::Cpu, other) => panic!("auto found no GPU but cuda gave {other:?}"),
            (_, Ok(s)) => assert_eq!(label(&s.device), label(&auto.device)),
            (_, Err(e)) => panic!("auto opened a GPU but cuda failed: {e}"),
        }
        assert_eq!(label(&Device::Cpu), "cpu");
        assert!(matches!(
            select(DeviceChoice::Cpu, 5).map(|s| s.device),
            Ok(Device::Cpu)
        ));
    }

    #[test]
    fn known_gpus_get_their_spec_by_name() {
        assert_eq!(gpu_kind("NVIDIA H200"), Some(DeviceKind::H200));
        assert_eq!(gpu_kind("NVIDIA H200 NVL"), Some(DeviceKind::H200));
        assert_eq!(
            gpu_kind("NVIDIA RTX PRO 6000 Blackwell Workstation Edition"),
            Some(DeviceKind::RtxPro6000)
        );
        assert_eq!(gpu_kind("NVIDIA A100-SXM4-80GB"), None);
        assert_eq!(spec(&Device::Cpu).kind, DeviceKind::Cpu);
    }
}
