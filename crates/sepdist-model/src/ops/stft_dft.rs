//! The loss' multi-resolution STFT L1 on a GPU: each resolution's STFT as a matmul of the
//! signal's frames with a DFT basis, in chunks of frames, so that the device never holds a
//! whole spectrogram.
//!
//! Per resolution (window `w` centred in `n_fft`, hop `h`, `T` frames) and chunk of frames:
//! `F = frames(x)` (`[S·fc, w]`: only the window's samples, the rest of `n_fft` is zero),
//! `Y = F·B` with `B` `[w, n_fft]` the windowed DFT basis (the real parts of the `n_fft/2 + 1`
//! bins, then the imaginary parts of the interior bins: those of DC and Nyquist are zero),
//! `Σ|Y|` into the value and, when `x` needs a gradient, `sign(Y)·Bᵀ` overlap-added back
//! through the reflect padding into `dx` (`+1` at zero, as the CPU kernel and candle's `abs`
//! have it). The value and the gradient are computed together in the forward (the backward
//! of an L1 sum needs the same spectra again; the gradient is as large as `x`, the spectra
//! are not), and the gradient is attached to the value by [`AttachGradient`].
//!
//! The matmuls run in plain fp32 even where fp32 matmuls use TF32 ([`FullPrecisionGemm`]):
//! the L1 of a spectrum's small bins is not to be rounded at 10 bits. The framing and its
//! adjoint are CUDA kernels on a GPU (`stft.cu`) and loops on the CPU, where this path runs
//! under [`super::with_composed_ops`] (a GPU's memory on the CPU) and in tests.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Device, DeviceLocation, InplaceOp2, Layout, Result,
    Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::cpu::{Real, contiguous_slice, contiguous_slice_mut, unsupported_dtype};
use super::stft::{Geometry, Kind, SpecOp, Stft};
use std::sync::Arc;

/// Bytes of the largest per-chunk tensor (a chunk's spectra `[S·fc, n_fft]`).
pub const CHUNK_BYTES: usize = 32 << 20;

/// One chunk of a resolution's framing: frame `f0 + f` (`f < fc`) of signal `s` holds
/// `x[s, reflect((f0 + f)·hop + offset + k)]` for `k < w`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameMap {
    pub signals: usize,
    /// Samples per signal.
    pub n: usize,
    pub f0: usize,
    pub fc: usize,
    pub hop: usize,
    /// Frame 0's first windowed sample relative to the unpadded signal: the window's offset
    /// inside `n_fft` less the centred STFT's padding `n_fft/2`.
    pub offset: isize,
    /// Window length (samples per frame).
    pub w: usize,
    /// Positions outside the signal reflect into it (the STFT's padding); without, they read
    /// zero and receive nothing (the iSTFT's overlap-add, trimmed).
    pub reflect: bool,
}

/// Frames per chunk for `signals` signals and FFT size `n_fft` in elements of `elem_size`
/// bytes: the chunk's spectra stay within [`CHUNK_BYTES`].
pub fn frames_per_chunk(signals: usize, n_fft: usize, elem_size: usize, frames: usize) -> usize {
    chunk_frames(signals, n_fft, elem_size, frames, CHUNK_BYTES)
}

fn chunk_frames(
    signals: usize,
    n_fft: usize,
    elem_size: usize,
    frames: usize,
    chunk_bytes: usize,
) -> usize {
    let per_frame = (signals * n_fft * elem_size).max(1);
    (chunk_bytes / per_frame).clamp(1, frames.max(1))
}

/// Device bytes this path adds while it runs, for `signals` signals of `n` samples in
/// elements of `elem_size` bytes: `(bases, working_set, gradient)`: the cached DFT bases (kept
/// for the process), the largest transient of a chunk on top of the gradient, and the
/// gradient (`x`'s size, held by the graph until the backward).
pub fn device_bytes(stfts: &[Stft], signals: usize, n: usize, elem_size: usize) -> (u64, u64, u64) {
    let mut bases = 0u64;
    let mut working = 0u64;
    for stft in stfts {
        let (nf, w) = (stft.n_fft(), stft.win_length());
        bases += (w * nf * elem_size) as u64;
        let fc = frames_per_chunk(signals, nf, elem_size, stft.n_frames(n));
        let rows = (signals * fc) as u64;
        let (frames, spectra) = (rows * w as u64, rows * nf as u64);
        let es = elem_size.max(1) as u64;
        // Frames with their spectra; the spectra with |Y|; the spectra with the u8 mask of
        // their signs, then the mask with its f32 copy; that copy with the sign; the sign with
        // its projection back.
        let steps = [
            frames + spectra,
            2 * spectra,
            spectra + spectra / es,
            spectra / es + spectra,
            2 * spectra,
            spectra + frames,
        ];
        let step_max = steps.iter().copied().max().unwrap_or(0);
        working = working.max(step_max * elem_size as u64);
    }
    (bases, working, (signals * n * elem_size) as u64)
}

/// `Σ_r mean |STFT_r(x)|` (see [`super::stft_l1::multi_stft_l1`]) by DFT matmuls on `x`'s
/// device; `x` is f32 or f64 `[..., N]`, `N > n_fft/2` for every resolution (checked by the
/// caller).
pub(crate) fn multi_stft_l1_dft(x: &Tensor, stfts: &[Stft]) -> Result<Tensor> {
    multi_stft_l1_dft_chunked(x, stfts, CHUNK_BYTES)
}

/// [`multi_stft_l1_dft`] with chunks of at most `chunk_bytes` of spectra.
fn multi_stft_l1_dft_chunked(x: &Tensor, stfts: &[Stft], chunk_bytes: usize) -> Result<Tensor> {
    let n = x.dim(x.rank() - 1)?;
    let signals = x.elem_count() / n.max(1);
    let xd = x.detach().contiguous()?.reshape((signals, n))?;
    let dtype = x.dtype();
    let need_grad = x.track_op();
    let _full = FullPrecisionGemm::on();
    // The sum in f64: a chunk's spectra are millions of terms.
    let mut value = Tensor::zeros((), DType::F64, x.device())?;
    let grad = if need_grad {
        Some(Tensor::zeros((signals, n), dtype, x.device())?)
    } else {
        None
    };
    for stft in stfts {
        let frames = stft.n_frames(n);
        let (nf, w) = (stft.n_fft(), stft.win_length());
        let count = (signals * stft.n_bins() * frames * 2) as f64;
        let basis = basis(Basis::Forward, stft.window(), w, x.device(), dtype)?;
        let fc = chunk_frames(signals, nf, dtype.size_in_bytes(), frames, chunk_bytes);
        for f0 in (0..frames).step_by(fc) {
            let map = FrameMap {
                signals,
                n,
                f0,
                fc: fc.min(frames - f0),
                hop: stft.hop(),
                offset: frame_offset(nf, w),
                w,
                reflect: true,
            };
            let spectra = xd.apply_op1_no_bwd(&Frames(map))?.matmul(&basis)?;
            let chunk_sum = spectra.abs()?.sum(1)?.to_dtype(DType::F64)?.sum_all()?;
            value = (value + (chunk_sum / count)?)?;
            if let Some(acc) = &grad {
                // One temporary at a time (a chained expression keeps each until its end).
                let non_negative = spectra.ge(0.0)?;
                drop(spectra);
                let ones = non_negative.to_dtype(dtype)?;
                drop(non_negative);
                let sign = ones.affine(2.0, -1.0)?;
                drop(ones);
                let back = sign.matmul(&basis.t()?)?;
                drop(sign);
                acc.inplace_op2(
                    &back,
                    &AdjointAdd {
                        map,
                        alpha: 1.0 / count,
                    },
                )?;
            }
        }
    }
    let value = value.to_dtype(dtype)?;
    match grad {
        None => Ok(value),
        Some(g) => {
            // The loss is a scalar: its gradient is `g` times the upstream one.
            let g = g.reshape(x.shape())?;
            let backward: Backward =
                Box::new(move |_, gamma| g.broadcast_mul(&gamma.to_dtype(g.dtype())?));
            x.apply_op2(
                &value,
                Attach {
                    name: "multi-stft-l1-dft",
                    backward,
                },
            )
        }
    }
}

/// TF32 off for candle's fp32 GEMMs while it lives (a process-wide switch, read at each
/// GEMM's launch; the previous setting comes back on drop).
struct FullPrecisionGemm(bool);

impl FullPrecisionGemm {
    fn on() -> Self {
        let before = candle_core::cuda::gemm_reduced_precision_f32();
        candle_core::cuda::set_gemm_reduced_precision_f32(false);
        Self(before)
    }
}

impl Drop for FullPrecisionGemm {
    fn drop(&mut self) {
        candle_core::cuda::set_gemm_reduced_precision_f32(self.0);
    }
}

/// Which DFT basis of a resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Basis {
    /// `[w, n_fft]`: window × (cos of bins `0..=n_fft/2` ‖ −sin of bins `1..n_fft/2`); frames
    /// times it are the STFT, spectra times its transpose the STFT's adjoint.
    Forward,
    /// `[n_fft, w]`: the inverse real DFT (`1/n_fft`, interior bins twice) times the window:
    /// spectra times it are the iSTFT's frames, frames times its transpose its adjoint.
    Inverse,
}

type BasisKey = (DeviceLocation, usize, usize, DType, Basis);

/// The bases built so far, per device, resolution, dtype and kind: built once per process (a
/// 4096-point basis is 16.8 M cosines and sines).
static BASES: Mutex<Option<HashMap<BasisKey, Tensor>>> = Mutex::new(None);

/// Basis `kind` of the window `window` (`n_fft` long, zero outside its centred `w` samples).
fn basis(kind: Basis, window: &[f64], w: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let nf = window.len();
    let key = (device.location(), nf, w, dtype, kind);
    let mut bases = BASES.lock().unwrap_or_else(PoisonError::into_inner);
    let bases = bases.get_or_insert_with(HashMap::new);
    if let Some(b) = bases.get(&key) {
        return Ok(b.clone());
    }
    let left = (nf - w) / 2;
    let window = &window[left..left + w];
    let bins = nf / 2 + 1;
    // The phase index reduced exactly before the angle: no large arguments.
    let angle = |j: usize, k: usize| {
        let m = (j as u64 * (left + k) as u64) % nf as u64;
        2.0 * std::f64::consts::PI * m as f64 / nf as f64
    };
    let mut values = vec![0f64; w * nf];
    match kind {
        Basis::Forward => values
            .par_chunks_mut(nf)
            .zip(window.par_iter())
            .enumerate()
            .for_each(|(k, (row, &win))| {
                let (re, im) = row.split_at_mut(bins);
                for (j, v) in re.iter_mut().enumerate() {
                    *v = win * angle(j, k).cos();
                }
                for (j, v) in im.iter_mut().enumerate() {
                    *v = -win * angle(j + 1, k).sin();
                }
            }),
        Basis::Inverse => values.par_chunks_mut(w).enumerate().for_each(|(row, out)| {
            // Rows: the real parts of bins 0..=n_fft/2, then the imaginary parts of 1..n_fft/2.
            let (j, imaginary) = if row < bins {
                (row, false)
            } else {
                (row - bins + 1, true)
            };
            let weight = if j == 0 || j == nf / 2 { 1.0 } else { 2.0 } / nf as f64;
            for (k, (v, &win)) in out.iter_mut().zip(window).enumerate() {
                *v = win
                    * weight
                    * if imaginary {
                        -angle(j, k).sin()
                    } else {
                        angle(j, k).cos()
                    };
            }
        }),
    }
    let shape = match kind {
        Basis::Forward => (w, nf),
        Basis::Inverse => (nf, w),
    };
    let basis = Tensor::from_vec(values, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?;
    bases.insert(key, basis.clone());
    Ok(basis)
}

/// `[S·T, n_fft]` (real parts of the bins ‖ imaginary parts of the interior bins, as the
/// bases order them) → `[S, F, T, 2]`, the imaginary parts of DC and Nyquist zero.
fn to_spectrogram(y: &Tensor, signals: usize, frames: usize, bins: usize) -> Result<Tensor> {
    let rows = signals * frames;
    let re = y.narrow(1, 0, bins)?;
    let zero = Tensor::zeros((rows, 1), y.dtype(), y.device())?;
    let im = Tensor::cat(&[&zero, &y.narrow(1, bins, bins - 2)?, &zero], 1)?;
    Tensor::stack(&[re, im], 2)?
        .reshape((signals, frames, bins, 2))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[S, F, T, 2]` → `[S·T, n_fft]` in the bases' order (the imaginary parts of DC and
/// Nyquist dropped: the inverse real DFT ignores them, the STFT has them zero).
fn from_spectrogram(spec: &Tensor, signals: usize, frames: usize, bins: usize) -> Result<Tensor> {
    let rows = signals * frames;
    let by_frame = spec
        .reshape((signals, bins, frames, 2))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, bins, 2))?;
    let re = by_frame.narrow(2, 0, 1)?.squeeze(2)?;
    let im = by_frame
        .narrow(2, 1, 1)?
        .squeeze(2)?
        .narrow(1, 1, bins - 2)?;
    Tensor::cat(&[re, im], 1)
}

/// Where frame 0's window starts relative to the unpadded signal: the window's offset inside
/// `n_fft` less the centred STFT's padding `n_fft/2`.
fn frame_offset(n_fft: usize, w: usize) -> isize {
    ((n_fft - w) / 2) as isize - (n_fft / 2) as isize
}

/// The whole-signal framing of `geom` for `signals` signals.
fn whole_frames(geom: &Geometry, signals: usize, reflect: bool) -> FrameMap {
    let (nf, w) = (geom.n_fft, geom.win_length);
    FrameMap {
        signals,
        n: geom.n,
        f0: 0,
        fc: geom.frames,
        hop: geom.hop,
        offset: frame_offset(nf, w),
        w,
        reflect,
    }
}

/// `1 / envelope` of the iSTFT's output samples `[1, n]` (see `Geometry::inverse_envelope`).
fn inverse_envelope(geom: &Geometry, dtype: DType, device: &Device) -> Result<Tensor> {
    let pad = geom.n_fft / 2;
    let inv = geom.inverse_envelope()?;
    let kept: Vec<f64> = (0..geom.n)
        .map(|i| inv.get(i + pad).copied().unwrap_or(0.0))
        .collect();
    Tensor::from_vec(kept, (1, geom.n), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// The STFT family's linear map `kind` of `x` (f32 or f64, shape checked as [`SpecOp`] does)
/// by DFT matmuls on `x`'s device, without a graph.
pub(super) fn spec_map(kind: Kind, geom: &Arc<Geometry>, x: &Tensor) -> Result<Tensor> {
    let op = SpecOp {
        kind,
        geom: geom.clone(),
    };
    let (signals, out_shape) = op.shapes(x.dims())?;
    let g = geom.as_ref();
    let (dtype, device) = (x.dtype(), x.device());
    let (w, bins, frames) = (g.win_length, g.bins(), g.frames);
    let _full = FullPrecisionGemm::on();
    let x = x.detach().contiguous()?;
    let out = match kind {
        Kind::Stft => {
            let fr = x
                .reshape((signals, g.n))?
                .apply_op1_no_bwd(&Frames(whole_frames(g, signals, true)))?;
            let y = fr.matmul(&basis(Basis::Forward, &g.window, w, device, dtype)?)?;
            drop(fr);
            to_spectrogram(&y, signals, frames, bins)?
        }
        Kind::StftAdjoint => {
            let y = from_spectrogram(&x, signals, frames, bins)?;
            let back = y.matmul(&basis(Basis::Forward, &g.window, w, device, dtype)?.t()?)?;
            drop(y);
            let acc = Tensor::zeros((signals, g.n), dtype, device)?;
            acc.inplace_op2(
                &back,
                &AdjointAdd {
                    map: whole_frames(g, signals, true),
                    alpha: 1.0,
                },
            )?;
            acc
        }
        Kind::Istft => {
            let y = from_spectrogram(&x, signals, frames, bins)?;
            let fr = y.matmul(&basis(Basis::Inverse, &g.window, w, device, dtype)?)?;
            drop(y);
            let acc = Tensor::zeros((signals, g.n), dtype, device)?;
            acc.inplace_op2(
                &fr,
                &AdjointAdd {
                    map: whole_frames(g, signals, false),
                    alpha: 1.0,
                },
            )?;
            acc.broadcast_mul(&inverse_envelope(g, dtype, device)?)?
        }
        Kind::IstftAdjoint => {
            let scaled = x
                .reshape((signals, g.n))?
                .broadcast_mul(&inverse_envelope(g, dtype, device)?)?;
            let fr = scaled.apply_op1_no_bwd(&Frames(whole_frames(g, signals, false)))?;
            drop(scaled);
            let y = fr.matmul(&basis(Basis::Inverse, &g.window, w, device, dtype)?.t()?)?;
            drop(fr);
            to_spectrogram(&y, signals, frames, bins)?
        }
    };
    out.reshape(out_shape)
}

/// [`spec_map`] with a graph: the gradient is the adjoint map of the upstream gradient.
pub(super) fn spec_map_tracked(kind: Kind, geom: &Arc<Geometry>, x: &Tensor) -> Result<Tensor> {
    let value = spec_map(kind, geom, x)?;
    if !x.track_op() {
        return Ok(value);
    }
    // A linear map's gradient is its adjoint applied to the upstream gradient.
    let geom = geom.clone();
    let backward: Backward =
        Box::new(move |x, gamma| spec_map(kind.adjoint(), &geom, &gamma.to_dtype(x.dtype())?));
    x.apply_op2(
        &value,
        Attach {
            name: "stft-dft",
            backward,
        },
    )
}

/// `mask · spec` per complex value (last dim (re, im)): `mask` `[B, S, ...]`, `spec` `[B, ...]`
/// broadcast over the `S` sources; `conj` takes `conj(spec)`.
fn complex_product(mask: &Tensor, spec: &Tensor, conj: bool) -> Result<Tensor> {
    let last = mask.rank() - 1;
    let spec = spec.unsqueeze(1)?;
    let (mr, mi) = (mask.narrow(last, 0, 1)?, mask.narrow(last, 1, 1)?);
    let (sr, si) = (spec.narrow(last, 0, 1)?, spec.narrow(last, 1, 1)?);
    // One half at a time: its two partial products die with it.
    let re = {
        let (a, b) = (mr.broadcast_mul(&sr)?, mi.broadcast_mul(&si)?);
        if conj { a + b } else { a - b }
    }?;
    let im = {
        let (a, b) = (mi.broadcast_mul(&sr)?, mr.broadcast_mul(&si)?);
        if conj { a - b } else { a + b }
    }?;
    Tensor::cat(&[re, im], last)
}

/// `Stft::inverse_masked` by DFT matmuls: the product and its iSTFT without a graph, then
/// attached to `mask` and `spec` with their gradients (`dy = iSTFT*(γ)`, `dmask = dy ·
/// conj(spec)`, `dspec = Σ_s dy · conj(mask)`), so the graph keeps the mask and the
/// spectrogram only, as the CPU kernel's does. f32 or f64 (checked by the caller).
pub(super) fn inverse_masked_dft(
    geom: &Arc<Geometry>,
    mask: &Tensor,
    spec: &Tensor,
) -> Result<Tensor> {
    let product = complex_product(&mask.detach(), &spec.detach(), false)?;
    let value = spec_map(Kind::Istft, geom, &product)?;
    drop(product);
    if !mask.track_op() && !spec.track_op() {
        return Ok(value);
    }
    mask.apply_op3(spec, &value, MaskedIstftDft { geom: geom.clone() })
}

/// `(mask, spec, value)` → `value` with the masked iSTFT's gradients.
struct MaskedIstftDft {
    geom: Arc<Geometry>,
}

impl candle_core::CustomOp3 for MaskedIstftDft {
    fn name(&self) -> &'static str {
        "masked-istft-dft"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((s3.try_clone(l3)?, l3.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((s3.try_clone(l3)?, l3.shape().clone()))
    }

    fn bwd(
        &self,
        mask: &Tensor,
        spec: &Tensor,
        _value: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = spec_map(
            Kind::IstftAdjoint,
            &self.geom,
            &grad.to_dtype(mask.dtype())?,
        )?;
        let dmask = if mask.track_op() {
            Some(complex_product(&dy, &spec.detach(), true)?)
        } else {
            None
        };
        let dspec = if spec.track_op() {
            // Σ_s dy_s · conj(mask_s) = conj(Σ_s mask_s · conj(dy_s)).
            let m = mask.detach();
            let last = m.rank() - 1;
            let (mr, mi) = (m.narrow(last, 0, 1)?, m.narrow(last, 1, 1)?);
            let (dr, di) = (dy.narrow(last, 0, 1)?, dy.narrow(last, 1, 1)?);
            let re = ((dr.broadcast_mul(&mr)? + di.broadcast_mul(&mi)?)?).sum(1)?;
            let im = ((di.broadcast_mul(&mr)? - dr.broadcast_mul(&mi)?)?).sum(1)?;
            Some(Tensor::cat(&[re, im], last - 1)?)
        } else {
            None
        };
        Ok((dmask, dspec, None))
    }
}

/// `[S, N]` → `[S·fc, w]`, the frames of one chunk ([`FrameMap`]); no backward (the path
/// computes its gradient itself).
struct Frames(FrameMap);

impl Frames {
    fn run<T: Real>(&self, x: &[T]) -> Vec<T> {
        let m = &self.0;
        let mut out = vec![T::zero(); m.signals * m.fc * m.w];
        out.par_chunks_mut(m.fc * m.w)
            .zip(x.par_chunks(m.n))
            .for_each(|(dst, sig)| {
                for (f, frame) in dst.chunks_mut(m.w).enumerate() {
                    let start = ((m.f0 + f) * m.hop) as isize + m.offset;
                    for (k, v) in frame.iter_mut().enumerate() {
                        *v = match position(start + k as isize, m) {
                            Some(i) => sig[i],
                            None => T::zero(),
                        };
                    }
                }
            });
        out
    }
}

/// The sample that position `i` of a frame reads: reflected, or none outside the signal.
fn position(i: isize, m: &FrameMap) -> Option<usize> {
    if m.reflect {
        Some(reflect(i, m.n))
    } else {
        usize::try_from(i).ok().filter(|&i| i < m.n)
    }
}

/// The single reflection of the centred STFT's padding (`|i|` and `2(n−1) − i` stay in range:
/// the padding is shorter than the signal).
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    let i = i.abs();
    (if i >= n { 2 * (n - 1) - i } else { i }) as usize
}

impl CustomOp1 for Frames {
    fn name(&self) -> &'static str {
        "stft-frames"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let m = &self.0;
        let shape = Shape::from((m.signals * m.fc, m.w));
        let out = match s.dtype() {
            DType::F32 => CpuStorage::F32(self.run(contiguous_slice::<f32>(s, l, self.name())?)),
            DType::F64 => CpuStorage::F64(self.run(contiguous_slice::<f64>(s, l, self.name())?)),
            dt => return Err(unsupported_dtype(self.name(), dt)),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let m = &self.0;
        let out = super::stft_cuda::frames(s, l, m)?;
        Ok((out, Shape::from((m.signals * m.fc, m.w))))
    }
}

/// `acc` (`[S, N]`) += `alpha` · the framing's adjoint of `g` (`[S·fc, w]`): each sample
/// gathers the frames of the chunk that read it (through the reflection too).
struct AdjointAdd {
    map: FrameMap,
    alpha: f64,
}

impl AdjointAdd {
    fn run<T: Real>(&self, acc: &mut [T], g: &[T]) {
        let m = &self.map;
        let alpha = <T as WithDType>::from_f64(self.alpha);
        acc.par_chunks_mut(m.n)
            .zip(g.par_chunks(m.fc * m.w))
            .for_each(|(dst, frames)| {
                for (f, frame) in frames.chunks(m.w).enumerate() {
                    let start = ((m.f0 + f) * m.hop) as isize + m.offset;
                    for (k, v) in frame.iter().enumerate() {
                        if let Some(i) = position(start + k as isize, m) {
                            dst[i] += alpha * *v;
                        }
                    }
                }
            });
    }
}

impl InplaceOp2 for AdjointAdd {
    fn name(&self) -> &'static str {
        "stft-frames-adjoint"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let name = self.name();
        match s1 {
            CpuStorage::F32(acc) => {
                let g = contiguous_slice::<f32>(s2, l2, name)?;
                self.run(contiguous_slice_mut(acc, l1, name)?, g);
            }
            CpuStorage::F64(acc) => {
                let g = contiguous_slice::<f64>(s2, l2, name)?;
                self.run(contiguous_slice_mut(acc, l1, name)?, g);
            }
            other => return Err(unsupported_dtype(name, other.dtype())),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        super::stft_cuda::adjoint_add(s1, l1, s2, l2, &self.map, self.alpha)
    }
}

/// `x`'s gradient from the upstream one (`x`, `γ`).
type Backward = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// `(x, value)` → `value`, computed without a graph, with the gradient `backward(x, γ)` for
/// `x`: a map whose value and gradient the DFT path computes itself joins candle's graph.
struct Attach {
    name: &'static str,
    backward: Backward,
}

impl CustomOp2 for Attach {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _value: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None));
        }
        Ok((Some((self.backward)(x, grad)?.to_dtype(x.dtype())?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::stft_l1::multi_stft_l1;
    use candle_core::{Error, Var};

    /// Deterministic values in [-1, 1) (a 64-bit LCG).
    fn signal(shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let v: Vec<f64> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
    }

    /// The loss' geometry in small: windows shorter than n_fft, hops that divide nothing.
    fn resolutions() -> Result<Vec<Stft>> {
        Ok(vec![
            Stft::new(64, 7, 64)?,
            Stft::new(64, 7, 24)?,
            Stft::new(32, 5, 9)?,
            Stft::new(16, 3, 16)?,
        ])
    }

    fn value_and_grad(
        x: &Tensor,
        f: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(f64, Vec<f64>)> {
        let v = Var::from_tensor(x)?;
        let y = f(v.as_tensor())?;
        let g = y.backward()?;
        let dx = g
            .get(v.as_tensor())
            .ok_or_else(|| Error::Msg("no gradient".into()))?;
        Ok((
            y.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            dx.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
        ))
    }

    fn rel(a: &[f64], b: &[f64]) -> f64 {
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
        a.iter()
            .zip(b)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    #[test]
    fn the_dft_path_equals_the_fft_kernel_in_value_and_gradient() -> Result<()> {
        let stfts = resolutions()?;
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            let x = signal(&[2, 3, 101], 7, dtype)?;
            let (v_fft, g_fft) = value_and_grad(&x, |x| multi_stft_l1(x, &stfts))?;
            // One chunk per resolution, then a few frames per chunk.
            for chunk_bytes in [CHUNK_BYTES, 6 * 64 * dtype.size_in_bytes() * 3] {
                let (v, g) =
                    value_and_grad(&x, |x| multi_stft_l1_dft_chunked(x, &stfts, chunk_bytes))?;
                assert!(
                    ((v - v_fft) / v_fft).abs() < tol,
                    "{dtype:?}, chunks of {chunk_bytes} B: value {v} against {v_fft}"
                );
                let e = rel(&g, &g_fft);
                assert!(
                    e < tol,
                    "{dtype:?}, chunks of {chunk_bytes} B: gradient off by {e:e}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn silence_has_the_fft_kernels_gradient_plus_one_at_zero() -> Result<()> {
        let stfts = resolutions()?;
        let x = Tensor::zeros((2, 50), DType::F64, &Device::Cpu)?;
        let (v_fft, g_fft) = value_and_grad(&x, |x| multi_stft_l1(x, &stfts))?;
        let (v, g) = value_and_grad(&x, |x| multi_stft_l1_dft_chunked(x, &stfts, 4096))?;
        assert_eq!(v, 0.0);
        assert_eq!(v_fft, 0.0);
        assert!(
            g_fft.iter().any(|&d| d != 0.0),
            "the subgradient at zero is +1"
        );
        let e = rel(&g, &g_fft);
        assert!(e < 1e-12, "gradient off by {e:e}");
        Ok(())
    }

    #[test]
    fn without_a_gradient_only_the_value_is_computed() -> Result<()> {
        let stfts = resolutions()?;
        let x = signal(&[3, 80], 3, DType::F64)?;
        let y = multi_stft_l1_dft(&x, &stfts)?;
        assert!(!y.track_op());
        let fft = multi_stft_l1(&x, &stfts)?;
        let (a, b) = (y.to_scalar::<f64>()?, fft.to_scalar::<f64>()?);
        assert!(((a - b) / b).abs() < 1e-12, "{a} against {b}");
        Ok(())
    }

    /// `⟨frames(x), g⟩ = ⟨x, adjoint(g)⟩` for every chunk, reflections at both ends included.
    #[test]
    fn the_adjoint_add_is_the_framings_adjoint() -> Result<()> {
        let (signals, n) = (2, 37);
        let cases = [(5usize, 16usize, -8isize), (3, 9, -12), (7, 30, -16)];
        for ((hop, w, offset), reflect) in cases.into_iter().flat_map(|c| [(c, true), (c, false)]) {
            let frames = n / hop + 1;
            for (f0, fc) in [(0, frames), (1, 2), (frames - 1, 1)] {
                let map = FrameMap {
                    signals,
                    n,
                    f0,
                    fc,
                    hop,
                    offset,
                    w,
                    reflect,
                };
                let x = signal(&[signals, n], 11, DType::F64)?;
                let g = signal(&[signals * fc, w], 12, DType::F64)?;
                let fx = x.apply_op1_no_bwd(&Frames(map))?;
                let lhs = (fx * &g)?.sum_all()?.to_scalar::<f64>()?;
                let acc = Tensor::zeros((signals, n), DType::F64, &Device::Cpu)?;
                acc.inplace_op2(&g, &AdjointAdd { map, alpha: 1.0 })?;
                let rhs = (acc * &x)?.sum_all()?.to_scalar::<f64>()?;
                assert!(
                    (lhs - rhs).abs() < 1e-12 * lhs.abs().max(1.0),
                    "hop {hop}, w {w}, offset {offset}, reflect {reflect}, frames {f0}+{fc}: {lhs} against {rhs}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn the_working_set_stays_near_the_chunk_budget() {
        let stfts: Vec<Stft> = [4096, 2048, 1024, 512, 256]
            .iter()
            .map(|&w| Stft::new(w.max(2048), 147, w).expect("valid"))
            .collect();
        let (bases, working, grad) = device_bytes(&stfts, 16, 441_000, 4);
        // 4096 × 4096 + 2048 × 2048 + (1024 + 512 + 256) × 2048 floats.
        assert_eq!(bases, 4 * (4096 * 4096 + 2048 * 2048 + 1792 * 2048));
        assert_eq!(grad, 16 * 441_000 * 4);
        assert!(
            working <= 2 * CHUNK_BYTES as u64 + CHUNK_BYTES as u64 / 4 + 1,
            "{working}"
        );
        assert!(working >= 2 * CHUNK_BYTES as u64 * 9 / 10, "{working}");
    }

    /// Value and gradients of `⟨r, f(inputs)⟩` for a fixed projection `r`.
    fn projected(
        f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
        inputs: &[Tensor],
    ) -> Result<Vec<Vec<f64>>> {
        let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts)?;
        let r = signal(y.dims(), 99, y.dtype())?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let mut out = vec![y.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?];
        for v in &vars {
            let g = grads
                .get(v.as_tensor())
                .ok_or_else(|| Error::Msg("no gradient".into()))?;
            out.push(g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        }
        Ok(out)
    }

    /// `f` by DFT matmuls (under `with_composed_ops`) equals `f` by the FFT kernels, in value and
    /// gradients.
    fn same_as_the_fft_kernels(
        what: &str,
        f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
        inputs: &[Tensor],
    ) -> Result<()> {
        let fft = projected(f, inputs)?;
        let dft = crate::ops::with_composed_ops(|| projected(f, inputs))?;
        for (i, (a, b)) in dft.iter().zip(&fft).enumerate() {
            assert_eq!(a.len(), b.len(), "{what}: part {i}");
            let e = rel(a, b);
            assert!(e < 1e-10, "{what}: part {i} (0: value) off by {e:e}");
        }
        Ok(())
    }

    #[test]
    fn the_stft_and_istft_by_dft_equal_the_fft_kernels() -> Result<()> {
        for stft in [
            Stft::new(16, 5, 16)?,
            Stft::new(24, 4, 12)?,
            Stft::new(8, 3, 8)?,
        ] {
            let n = 41;
            let x = signal(&[2, 3, n], 1, DType::F64)?;
            same_as_the_fft_kernels("stft", &|a| stft.forward(&a[0]), std::slice::from_ref(&x))?;
            let spec = signal(&[2, stft.n_bins(), stft.n_frames(n), 2], 2, DType::F64)?;
            same_as_the_fft_kernels(
                "istft",
                &|a| stft.inverse(&a[0], n),
                std::slice::from_ref(&spec),
            )?;
            // Masks of 3 sources on a [B = 2, 2 channels] spectrogram; the mask strided.
            let frames = stft.n_frames(n);
            let mask = signal(&[2, 2, 3, stft.n_bins(), frames, 2], 3, DType::F64)?;
            let spec = signal(&[2, 2, stft.n_bins(), frames, 2], 4, DType::F64)?;
            same_as_the_fft_kernels(
                "masked istft",
                &|a| stft.inverse_masked(&a[0].transpose(1, 2)?, &a[1], n),
                &[mask, spec],
            )?;
        }
        Ok(())
    }
}
