//! The CUDA kernels of the STFT's index maps (`stft.cu`: framing and its adjoint), compiled
//! once per process with NVRTC like the attention's, launched on the tensors' own stream.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{Error, Layout, Result};

use super::stft_dft::FrameMap;

const SOURCE: &str = include_str!("stft.cu");
const MODULE: &str = "sepdist_stft";
const THREADS: u32 = 256;
/// Grid-stride loops: enough blocks to fill any current GPU, never more than CUDA allows.
const MAX_BLOCKS: usize = 1 << 20;

static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();

fn ptx() -> Result<&'static str> {
    super::attention_cuda::compiled(&PTX, SOURCE, "stft.cu")
}

fn launch_config(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn offset_of(layout: &Layout, what: &str) -> Result<usize> {
    layout
        .contiguous_offsets()
        .map(|(start, _)| start)
        .ok_or_else(|| Error::Msg(format!("{what}: expected a contiguous input")))
}

/// The map's sizes as the kernels take them.
fn args(m: &FrameMap) -> Result<[i64; 7]> {
    let i =
        |v: usize| i64::try_from(v).map_err(|_| Error::Msg(format!("stft: size {v} exceeds i64")));
    Ok([
        i(m.signals)?,
        i(m.n)?,
        i(m.f0)?,
        i(m.fc)?,
        i(m.hop)?,
        m.offset as i64,
        i(m.w)?,
    ])
}

/// `[signals·fc, w]` frames of `x` (`[signals, n]` at `layout`, contiguous).
pub(crate) fn frames(x: &CudaStorage, layout: &Layout, m: &FrameMap) -> Result<CudaStorage> {
    let dev = x.device.clone();
    let start = offset_of(layout, "stft frames")?;
    match &x.slice {
        CudaStorageSlice::F32(s) => {
            let out = frames_typed(&dev, "stft_frames_f32", s, start, m)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        CudaStorageSlice::F64(s) => {
            let out = frames_typed(&dev, "stft_frames_f64", s, start, m)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        _ => Err(Error::Msg(format!(
            "stft frames: f32 or f64 on CUDA, got {:?}",
            x.dtype()
        ))),
    }
}

// Kernel launches are FFI calls: unsafe by nature, the argument lists checked by hand.
#[allow(unsafe_code)]
fn frames_typed<T: DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    x: &CudaSlice<T>,
    start: usize,
    m: &FrameMap,
) -> Result<CudaSlice<T>> {
    let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
    let xv = x.slice(start..start + m.signals * m.n);
    let total = m.signals * m.fc * m.w;
    // SAFETY: the kernel writes every element (one per (signal, frame, sample)).
    let out = unsafe { dev.alloc::<T>(total)? };
    let a = args(m)?;
    let reflect = i32::from(m.reflect);
    let mut b = func.builder();
    b.arg(&xv).arg(&out);
    for v in &a {
        b.arg(v);
    }
    b.arg(&reflect);
    // SAFETY: the argument list matches stft_frames_* in stft.cu.
    unsafe { b.launch(launch_config(total)) }.w()?;
    Ok(out)
}

/// `acc` (`[signals, n]`, contiguous at `acc_layout`) += `alpha` · the adjoint of the framing
/// applied to `g` (`[signals·fc, w]` at `g_layout`, contiguous).
pub(crate) fn adjoint_add(
    acc: &mut CudaStorage,
    acc_layout: &Layout,
    g: &CudaStorage,
    g_layout: &Layout,
    m: &FrameMap,
    alpha: f64,
) -> Result<()> {
    let dev = acc.device.clone();
    let acc_start = offset_of(acc_layout, "stft adjoint (accumulator)")?;
    let g_start = offset_of(g_layout, "stft adjoint (frames)")?;
    match (&mut acc.slice, &g.slice) {
        (CudaStorageSlice::F32(a), CudaStorageSlice::F32(g)) => adjoint_typed(
            &dev,
            "stft_adjoint_f32",
            (a, acc_start),
            (g, g_start),
            m,
            alpha as f32,
        ),
        (CudaStorageSlice::F64(a), CudaStorageSlice::F64(g)) => adjoint_typed(
            &dev,
            "stft_adjoint_f64",
            (a, acc_start),
            (g, g_start),
            m,
            alpha,
        ),
        _ => Err(Error::Msg(format!(
            "stft adjoint: f32 or f64 of one dtype on CUDA, got {:?} and {:?}",
            acc.dtype(),
            g.dtype()
        ))),
    }
}

// Kernel launches are FFI calls: unsafe by nature, the argument lists checked by hand.
#[allow(unsafe_code)]
fn adjoint_typed<T: DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    (acc, acc_start): (&mut CudaSlice<T>, usize),
    (g, g_start): (&CudaSlice<T>, usize),
    m: &FrameMap,
    alpha: T,
) -> Result<()> {
    let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
    let total = m.signals * m.n;
    let gv = g.slice(g_start..g_start + m.signals * m.fc * m.w);
    let mut av = acc.slice_mut(acc_start..acc_start + total);
    let a = args(m)?;
    let reflect = i32::from(m.reflect);
    let mut b = func.builder();
    b.arg(&gv).arg(&mut av);
    for v in &a {
        b.arg(v);
    }
    b.arg(&reflect).arg(&alpha);
    // SAFETY: the argument list matches stft_adjoint_* in stft.cu; each thread writes only
    // its own element of acc.
    unsafe { b.launch(launch_config(total)) }.w()?;
    Ok(())
}
