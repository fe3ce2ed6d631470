//! GPU memory figures of a CUDA device (cargo feature `cuda`), through the cudarc that candle
//! re-exports: the driver's free and total memory (`cuMemGetInfo`) and the counters of the
//! stream-ordered memory pool that candle's tensors are allocated from.
//!
//! **Which allocations the pool counts.** cudarc 0.19 allocates every `CudaSlice` (so every
//! candle tensor) with `cuMemAllocAsync` on the device's stream when the device supports memory
//! pools (`CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED`, every GPU since Pascal under Linux), and
//! frees it with `cuMemFreeAsync`; such allocations come from the device's *current* memory
//! pool (`cuDeviceGetMemPool`, the default pool unless someone calls `cuDeviceSetMemPool`, which
//! nothing in sepdist does). So the pool's "used" counters are the bytes of live tensors and its
//! "reserved" counters what the pool holds from the driver. Not counted: the workspaces that
//! cuBLAS and cuFFT allocate themselves, NCCL's buffers, the CUDA context and module images
//! (they show in `cuMemGetInfo` only). On a device without memory pools cudarc falls back to
//! `cuMemAlloc` and [`DevicePool::counters`] reports `None`: use `total − free` then.
//!
//! **Release threshold.** The pool returns unused memory to the driver at every stream
//! synchronisation while it holds more than its release threshold (default 0: everything).
//! A training step synchronises many times (gradients go to the host), so with threshold 0 every
//! step re-maps its activations; [`DevicePool::set_release_threshold`] with `u64::MAX` keeps what
//! the pool once held as a cache, as PyTorch's caching allocator does.

use std::sync::Arc;

use candle_core::Device;
use candle_core::cuda_backend::cudarc::driver::result::{device, mem_pool};
use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUmemPool_attribute};
use candle_core::cuda_backend::cudarc::driver::{CudaContext, DriverError};

/// A CUDA driver call that failed, and which.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {source}")]
pub struct CudaMemError {
    /// The driver call (`cuMemGetInfo`, `cuMemPoolGetAttribute(USED_MEM_CURRENT)`, ...).
    pub call: &'static str,
    #[source]
    pub source: DriverError,
}

fn fail(call: &'static str) -> impl FnOnce(DriverError) -> CudaMemError {
    move |source| CudaMemError { call, source }
}

/// The pool's four byte counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolCounters {
    /// Bytes of live allocations now (`CU_MEMPOOL_ATTR_USED_MEM_CURRENT`).
    pub used: u64,
    /// High-water mark of `used` since the last [`DevicePool::reset_high_water`].
    pub used_high: u64,
    /// Bytes the pool holds from the driver now (`CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`).
    pub reserved: u64,
    /// High-water mark of `reserved` since the last reset.
    pub reserved_high: u64,
}

/// The memory of one CUDA device as seen from this process: its context (candle's device holds
/// the same primary context) and, through it, the device's current memory pool.
#[derive(Debug, Clone)]
pub struct DevicePool {
    ctx: Arc<CudaContext>,
}

impl DevicePool {
    /// The pool of candle's CUDA `device`; `None` for any other device.
    pub fn of(device: &Device) -> Option<DevicePool> {
        match device {
            Device::Cuda(d) => Some(DevicePool {
                ctx: Arc::clone(d.cuda_stream().context()),
            }),
            _ => None,
        }
    }

    /// Ordinal of the device among the visible ones.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The device's name (`NVIDIA H200`).
    pub fn name(&self) -> Result<String, CudaMemError> {
        self.ctx.name().map_err(fail("cuDeviceGetName"))
    }

    /// `domain:bus:device` of the PCI address: one physical GPU whatever `CUDA_VISIBLE_DEVICES`
    /// numbers it (ranks that see the same address share its memory).
    pub fn pci_address(&self) -> Result<String, CudaMemError> {
        let get = |a| {
            self.ctx
                .attribute(a)
                .map_err(fail("cuDeviceGetAttribute(PCI address)"))
        };
        Ok(format!(
            "{:04x}:{:02x}:{:02x}",
            get(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?,
            get(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?,
            get(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?
        ))
    }

    /// `(free, total)` bytes of the device (`cuMemGetInfo`): free counts memory that any
    /// process, this one's pool included, has not taken from the driver.
    pub fn mem_get_info(&self) -> Result<(u64, u64), CudaMemError> {
        let (free, total) = self.ctx.mem_get_info().map_err(fail("cuMemGetInfo"))?;
        Ok((free as u64, total as u64))
    }

    /// Whether allocations go through the pool (`cuMemAllocAsync`), see the module docs.
    pub fn has_pool(&self) -> bool {
        self.ctx.has_async_alloc()
    }

    fn get(&self, attr: CUmemPool_attribute, call: &'static str) -> Result<u64, CudaMemError> {
        let pool = self.pool()?;
        let mut value: u64 = 0;
        // SAFETY: `pool` is the device's live current pool; the four byte counters and the
        // release threshold are `cuuint64_t`, which `value` is.
        #[allow(unsafe_code)]
        unsafe { mem_pool::get_attribute(pool, attr, (&raw mut value).cast()) }
            .map_err(fail(call))?;
        Ok(value)
    }

    fn set(
        &self,
        attr: CUmemPool_attribute,
        mut value: u64,
        call: &'static str,
    ) -> Result<(), CudaMemError> {
        let pool = self.pool()?;
        // SAFETY: as in `get`; the driver reads one `cuuint64_t` from `value`.
        #[allow(unsafe_code)]
        unsafe { mem_pool::set_attribute(pool, attr, (&raw mut value).cast()) }.map_err(fail(call))
    }

    /// The pool that `cuMemAllocAsync` on this device draws from.
    fn pool(
        &self,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool, CudaMemError> {
        // SAFETY: `cu_device` comes from the context, which is alive (held by `self`).
        #[allow(unsafe_code)]
        unsafe { device::get_mem_pool(self.ctx.cu_device()) }.map_err(fail("cuDeviceGetMemPool"))
    }

    /// The pool's used and reserved bytes and their high-water marks; `None` when the device
    /// allocates without a pool (then only [`DevicePool::mem_get_info`] tells anything).
    pub fn counters(&self) -> Result<Option<PoolCounters>, CudaMemError> {
        use CUmemPool_attribute as A;
        if !self.has_pool() {
            return Ok(None);
        }
        Ok(Some(PoolCounters {
            used: self.get(
                A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
                "cuMemPoolGetAttribute(USED_MEM_CURRENT)",
            )?,
            used_high: self.get(
                A::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                "cuMemPoolGetAttribute(USED_MEM_HIGH)",
            )?,
            reserved: self.get(
                A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                "cuMemPoolGetAttribute(RESERVED_MEM_CURRENT)",
            )?,
            reserved_high: self.get(
                A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
                "cuMemPoolGetAttribute(RESERVED_MEM_HIGH)",
            )?,
        }))
    }

    /// Lowers the used high-water mark to the current use (the driver's only allowed value for
    /// a reset is 0, meaning "current"); `reserved` too when `reserved` is set.
    pub fn reset_high_water(&self, reserved: bool) -> Result<(), CudaMemError> {
        use CUmemPool_attribute as A;
        if !self.has_pool() {
            return Ok(());
        }
        self.set(
            A::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            0,
            "cuMemPoolSetAttribute(USED_MEM_HIGH)",
        )?;
        if reserved {
            self.set(
                A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
                0,
                "cuMemPoolSetAttribute(RESERVED_MEM_HIGH)",
            )?;
        }
        Ok(())
    }

    /// Bytes the pool keeps when the stream synchronises instead of returning them to the
    /// driver (`u64::MAX`: everything it once held).
    pub fn set_release_threshold(&self, bytes: u64) -> Result<(), CudaMemError> {
        if !self.has_pool() {
            return Ok(());
        }
        self.set(
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            bytes,
            "cuMemPoolSetAttribute(RELEASE_THRESHOLD)",
        )
    }

    /// The current release threshold.
    pub fn release_threshold(&self) -> Result<u64, CudaMemError> {
        self.get(
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            "cuMemPoolGetAttribute(RELEASE_THRESHOLD)",
        )
    }
}

/// For the crate's GPU tests: GPU 0, or `None` (with the reason printed) where none opens.
#[cfg(test)]
pub(crate) fn test_gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            println!("skipped: no CUDA device opens here ({e})");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Tensor};

    #[test]
    fn pool_counters_follow_an_allocation_and_its_drop() {
        let Some(device) = test_gpu() else { return };
        let pool = DevicePool::of(&device).expect("a CUDA device");
        assert!(DevicePool::of(&Device::Cpu).is_none());
        assert!(
            pool.has_pool(),
            "the device allocates without a memory pool"
        );
        pool.set_release_threshold(u64::MAX).expect("threshold");
        assert_eq!(pool.release_threshold().expect("threshold"), u64::MAX);
        device.synchronize().expect("sync");
        let before = pool.counters().expect("counters").expect("a pool");
        pool.reset_high_water(true).expect("reset");
        let bytes: u64 = 64 << 20;
        let t = Tensor::zeros((bytes as usize / 4,), DType::F32, &device).expect("alloc");
        device.synchronize().expect("sync");
        let during = pool.counters().expect("counters").expect("a pool");
        assert!(
            during.used >= before.used + bytes,
            "used {} -> {}",
            before.used,
            during.used
        );
        assert!(during.used_high >= during.used);
        assert!(during.reserved >= during.used);
        drop(t);
        device.synchronize().expect("sync");
        let after = pool.counters().expect("counters").expect("a pool");
        assert!(
            after.used + bytes <= during.used,
            "used {} after the drop, {} during",
            after.used,
            during.used
        );
        // The high-water mark remembers the tensor until it is reset.
        assert!(after.used_high >= during.used);
        // Kept as a cache: the threshold is the maximum.
        assert!(after.reserved >= bytes, "reserved {}", after.reserved);
        pool.reset_high_water(false).expect("reset");
        let reset = pool.counters().expect("counters").expect("a pool");
        assert!(reset.used_high < during.used);
        let (free, total) = pool.mem_get_info().expect("mem info");
        assert!(free <= total && total > bytes);
        assert!(!pool.name().expect("name").is_empty());
        assert_eq!(pool.pci_address().expect("pci").len(), 10);
    }
}
