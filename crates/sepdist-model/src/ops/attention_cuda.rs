//! The CUDA kernels of the memory-lean attention (`attention.cu`), compiled once per process
//! with NVRTC (no CUDA toolkit needed at run time beyond libnvrtc, which candle's CUDA backend
//! loads anyway) and launched on the tensors' own stream.
//!
//! q, k, v are f32 or bf16; the forward's output ‖ log-sum-exp is always f32 (a bf16 lse
//! would put a relative error of ~2⁻⁸·|lse| into every recomputed probability of the
//! backward), the backward's (dq, dk, dv) have the inputs' dtype.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{DType, Error, Layout, Result};

const SOURCE: &str = include_str!("attention.cu");
const MODULE: &str = "sepdist_attention";
/// Rows (queries or keys) per thread block: `ROWS` in attention.cu.
const ROWS: usize = 64;
/// The largest head size a kernel is instantiated for.
pub(crate) const MAX_HEAD: usize = 128;

static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();

fn ptx() -> Result<&'static str> {
    compiled(&PTX, SOURCE, "attention.cu")
}

/// The PTX of `source` (`file`), compiled with NVRTC at the first call and kept in `cell`; a
/// compilation error is kept too, and returned each time.
pub(crate) fn compiled(
    cell: &'static OnceLock<std::result::Result<String, String>>,
    source: &str,
    file: &str,
) -> Result<&'static str> {
    cell.get_or_init(|| {
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(source)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile {file}: {e}"))
    })
    .as_deref()
    .map_err(|e| Error::Msg(e.clone()))
}

/// Whether the CUDA kernels take q/k/v of `dtype` with head size `d`.
pub(crate) fn takes(dtype: DType, d: usize) -> bool {
    matches!(dtype, DType::F32 | DType::BF16) && (1..=MAX_HEAD).contains(&d)
}

/// The kernels' head size for `d`: the register arrays are sized at compile time.
fn padded_head(d: usize) -> Result<usize> {
    [16, 32, 64, 128]
        .into_iter()
        .find(|&p| d <= p)
        .ok_or_else(|| Error::Msg(format!("attention: head size {d} > {MAX_HEAD} on CUDA")))
}

fn kernel_name(kind: &str, dtype: DType, d: usize) -> Result<String> {
    let ty = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        dt => {
            return Err(Error::Msg(format!(
                "attention: no CUDA kernel for {dt:?} (f32 and bf16)"
            )));
        }
    };
    Ok(format!("flash_{kind}_{ty}_{}", padded_head(d)?))
}

/// One input of a kernel: a CUDA storage and the start of its contiguous `[BH, T, d]` part.
#[derive(Clone, Copy)]
pub(crate) struct Part<'a> {
    pub storage: &'a CudaStorage,
    pub offset: usize,
}

impl<'a> Part<'a> {
    /// `storage` at `layout`, which must be contiguous.
    pub(crate) fn of(storage: &'a CudaStorage, layout: &Layout, op: &str) -> Result<Self> {
        let (offset, _) = layout
            .contiguous_offsets()
            .ok_or_else(|| Error::Msg(format!("{op}: expected a contiguous input")))?;
        Ok(Self { storage, offset })
    }

    /// q, k and v, each `storage` at `layout` (contiguous).
    pub(crate) fn three(inputs: [(&'a CudaStorage, &Layout); 3], op: &str) -> Result<[Self; 3]> {
        let [q, k, v] = inputs;
        Ok([
            Self::of(q.0, q.1, op)?,
            Self::of(k.0, k.1, op)?,
            Self::of(v.0, v.1, op)?,
        ])
    }

    /// The same storage `elems` further on (k and v of a packed q ‖ k ‖ v).
    pub(crate) fn at(self, elems: usize) -> Self {
        Self {
            offset: self.offset + elems,
            ..self
        }
    }
}

/// The problem's sizes: `bh` batch·head rows of `t` steps of head size `d`, and the scores'
/// scale.
#[derive(Clone, Copy)]
pub(crate) struct Sizes {
    pub bh: usize,
    pub t: usize,
    pub d: usize,
    pub scale: f64,
}

impl Sizes {
    /// The sizes of q `[B, H, T, Dh]` at `layout`, with the scores' `scale`.
    pub(crate) fn of(layout: &Layout, scale: f64) -> Result<Self> {
        let (b, h, t, d) = layout.shape().dims4()?;
        Ok(Self {
            bh: b * h,
            t,
            d,
            scale,
        })
    }

    /// Elements of q (or k, or v).
    fn n(&self) -> usize {
        self.bh * self.t * self.d
    }

    /// Elements of the output ‖ lse.
    fn m(&self) -> usize {
        self.bh * self.t * (self.d + 1)
    }

    /// The kernels' scalar arguments: T, Dh and the scale.
    fn args(&self) -> Result<(i32, i32, f32)> {
        let (t, d) = (self.t, self.d);
        let ti =
            i32::try_from(t).map_err(|_| Error::Msg(format!("attention: T = {t} too large")))?;
        let di =
            i32::try_from(d).map_err(|_| Error::Msg(format!("attention: Dh = {d} too large")))?;
        Ok((ti, di, self.scale as f32))
    }
}

fn launch_config(bh: usize, t: usize) -> Result<LaunchConfig> {
    let blocks_x = u32::try_from(bh).map_err(|_| {
        Error::Msg(format!(
            "attention: {bh} batch·head rows exceed CUDA's grid"
        ))
    })?;
    let blocks_y = u32::try_from(t.div_ceil(ROWS))
        .ok()
        .filter(|&y| y <= 65_535)
        .ok_or_else(|| {
            Error::Msg(format!(
                "attention: sequence length {t} exceeds CUDA's grid"
            ))
        })?;
    Ok(LaunchConfig {
        grid_dim: (blocks_x, blocks_y, 1),
        block_dim: (ROWS as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn f32_slice<'a>(part: &Part<'a>, what: &str) -> Result<&'a CudaSlice<f32>> {
    match &part.storage.slice {
        CudaStorageSlice::F32(s) => Ok(s),
        _ => Err(Error::Msg(format!(
            "attention backward: the saved {what} must be f32 on CUDA, got {:?}",
            part.storage.dtype()
        ))),
    }
}

/// `[BH, T, d+1]` f32 (output ‖ lse) of q, k, v `[BH, T, d]` (f32 or bf16).
pub(crate) fn forward(q: Part, k: Part, v: Part, sizes: Sizes) -> Result<CudaStorage> {
    let dev = q.storage.device.clone();
    let name = kernel_name("fwd", q.storage.dtype(), sizes.d)?;
    let out = match (&q.storage.slice, &k.storage.slice, &v.storage.slice) {
        (CudaStorageSlice::F32(qs), CudaStorageSlice::F32(ks), CudaStorageSlice::F32(vs)) => {
            forward_typed(&dev, &name, [(qs, q), (ks, k), (vs, v)], sizes)?
        }
        (CudaStorageSlice::BF16(qs), CudaStorageSlice::BF16(ks), CudaStorageSlice::BF16(vs)) => {
            forward_typed(&dev, &name, [(qs, q), (ks, k), (vs, v)], sizes)?
        }
        _ => return Err(mixed_dtypes("attention", [q, k, v])),
    };
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

fn mixed_dtypes(what: &str, parts: [Part; 3]) -> Error {
    let [q, k, v] = parts.map(|p| p.storage.dtype());
    Error::Msg(format!(
        "{what}: q, k, v must be all f32 or all bf16 on CUDA, got {q:?}, {k:?}, {v:?}"
    ))
}

/// q, k, v of one dtype `T` as views of `sizes.n()` elements from their offsets.
fn views<'a, T>(
    [(qs, q), (ks, k), (vs, v)]: [(&'a CudaSlice<T>, Part); 3],
    n: usize,
) -> [CudaView<'a, T>; 3] {
    [
        qs.slice(q.offset..q.offset + n),
        ks.slice(k.offset..k.offset + n),
        vs.slice(v.offset..v.offset + n),
    ]
}

// Kernel launches are FFI calls: unsafe by nature, the argument lists checked by hand.
#[allow(unsafe_code)]
fn forward_typed<T: DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    inputs: [(&CudaSlice<T>, Part); 3],
    sizes: Sizes,
) -> Result<CudaSlice<f32>> {
    let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
    let [qv, kv, vv] = views(inputs, sizes.n());
    // SAFETY: every element is written by the kernel (each row's d outputs and its lse).
    let out = unsafe { dev.alloc::<f32>(sizes.m())? };
    let (t, d, scale) = sizes.args()?;
    let mut b = func.builder();
    b.arg(&qv).arg(&kv).arg(&vv).arg(&out);
    b.arg(&t).arg(&d).arg(&scale);
    // SAFETY: the argument list matches flash_fwd_* in attention.cu; sizes checked above.
    unsafe { b.launch(launch_config(sizes.bh, sizes.t)?) }.w()?;
    Ok(out)
}

/// `[3, BH, T, d]` = (dq, dk, dv) in q's dtype, from q, k, v, the forward's f32 output ‖ lse
/// `o` and its gradient `g` (both `[BH, T, d+1]`).
pub(crate) fn backward(
    [q, k, v]: [Part; 3],
    o: Part,
    g: Part,
    sizes: Sizes,
) -> Result<CudaStorage> {
    let dev = q.storage.device.clone();
    let m = sizes.m();
    let saved = [
        f32_slice(&o, "output")?.slice(o.offset..o.offset + m),
        f32_slice(&g, "output gradient")?.slice(g.offset..g.offset + m),
    ];
    let dtype = q.storage.dtype();
    match (&q.storage.slice, &k.storage.slice, &v.storage.slice) {
        (CudaStorageSlice::F32(qs), CudaStorageSlice::F32(ks), CudaStorageSlice::F32(vs)) => {
            let out = backward_typed(&dev, dtype, [(qs, q), (ks, k), (vs, v)], saved, sizes)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        (CudaStorageSlice::BF16(qs), CudaStorageSlice::BF16(ks), CudaStorageSlice::BF16(vs)) => {
            let out = backward_typed(&dev, dtype, [(qs, q), (ks, k), (vs, v)], saved, sizes)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        _ => Err(mixed_dtypes("attention backward", [q, k, v])),
    }
}

// Kernel launches are FFI calls: unsafe by nature, the argument lists checked by hand.
#[allow(unsafe_code)]
fn backward_typed<T: DeviceRepr + CudaDType>(
    dev: &CudaDevice,
    dtype: DType,
    inputs: [(&CudaSlice<T>, Part); 3],
    [ov, gv]: [CudaView<'_, f32>; 2],
    sizes: Sizes,
) -> Result<CudaSlice<T>> {
    let n = sizes.n();
    let dq_func =
        dev.get_or_load_custom_func(&kernel_name("bwd_dq", dtype, sizes.d)?, MODULE, ptx()?)?;
    let dkdv_func =
        dev.get_or_load_custom_func(&kernel_name("bwd_dkdv", dtype, sizes.d)?, MODULE, ptx()?)?;
    let [qv, kv, vv] = views(inputs, n);
    // SAFETY: the kernels write every element of dq, dk, dv and of delta.
    let mut out = unsafe { dev.alloc::<T>(3 * n)? };
    let delta = unsafe { dev.alloc::<f32>(sizes.bh * sizes.t)? };
    let (t, d, scale) = sizes.args()?;
    let cfg = launch_config(sizes.bh, sizes.t)?;
    let (mut dq, mut rest) = out.split_at_mut(n);
    let (mut dk, mut dv) = rest.split_at_mut(n);
    let mut b = dq_func.builder();
    b.arg(&qv)
        .arg(&kv)
        .arg(&vv)
        .arg(&ov)
        .arg(&gv)
        .arg(&mut dq)
        .arg(&delta);
    b.arg(&t).arg(&d).arg(&scale);
    // SAFETY: the argument list matches flash_bwd_dq_* in attention.cu.
    unsafe { b.launch(cfg) }.w()?;
    let mut b = dkdv_func.builder();
    b.arg(&qv).arg(&kv).arg(&vv).arg(&ov).arg(&gv).arg(&delta);
    b.arg(&mut dk).arg(&mut dv).arg(&t).arg(&d).arg(&scale);
    // SAFETY: the argument list matches flash_bwd_dkdv_* in attention.cu; the dq kernel,
    // which writes delta, ran before it on the same stream.
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}
