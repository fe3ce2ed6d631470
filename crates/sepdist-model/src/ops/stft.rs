//! Differentiable STFT / iSTFT with the conventions of `torch.stft(center=True,
//! pad_mode="reflect")` and `torch.istft(center=True, length=...)`.
//!
//! All four linear maps (STFT, its adjoint, iSTFT, its adjoint) are one custom op,
//! [`SpecOp`], parameterised by [`Kind`]. Each map's backward is its adjoint applied to the
//! upstream gradient, and the adjoint of the adjoint is the map itself, so the graph stays
//! differentiable to any order. The CPU kernels use realfft and rayon over (signal, frame);
//! a `cuda_fwd` can be added to [`SpecOp`] without touching the wrappers.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use realfft::RealFftPlanner;
use realfft::num_complex::Complex;

use super::cpu::{
    Real, cast, contiguous_slice, fused_kernels_on, in_f32, is_half, stft_kernel_takes,
    unsupported_dtype,
};

/// Smallest overlap-added squared window accepted by the iSTFT (torch uses the same bound).
const ENVELOPE_MIN: f64 = 1e-11;

/// Short-time Fourier transform with a periodic Hann window.
#[derive(Debug, Clone)]
pub struct Stft {
    n_fft: usize,
    hop: usize,
    win_length: usize,
    /// Periodic Hann of `win_length`, zero-padded centred to `n_fft` (as torch.stft does).
    window: Arc<[f64]>,
}

impl Stft {
    /// `n_fft` must be even and ≥ 2, `1 ≤ win_length ≤ n_fft`, `hop ≥ 1`.
    pub fn new(n_fft: usize, hop: usize, win_length: usize) -> Result<Stft> {
        if n_fft < 2 || n_fft % 2 != 0 {
            return Err(Error::Msg(format!(
                "stft: n_fft must be even and >= 2, got {n_fft}"
            )));
        }
        if hop == 0 {
            return Err(Error::Msg("stft: hop must be >= 1".into()));
        }
        if win_length == 0 || win_length > n_fft {
            return Err(Error::Msg(format!(
                "stft: win_length must be in 1..={n_fft}, got {win_length}"
            )));
        }
        let left = (n_fft - win_length) / 2;
        let mut window = vec![0.0; n_fft];
        for (i, w) in window[left..left + win_length].iter_mut().enumerate() {
            // Periodic Hann (torch.hann_window(periodic=True)): denominator win_length.
            *w = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / win_length as f64).cos();
        }
        Ok(Stft {
            n_fft,
            hop,
            win_length,
            window: window.into(),
        })
    }

    /// FFT size.
    pub fn n_fft(&self) -> usize {
        self.n_fft
    }

    /// Hop between frames, in samples.
    pub fn hop(&self) -> usize {
        self.hop
    }

    /// Length of the Hann window before its centred zero-padding to `n_fft`.
    pub fn win_length(&self) -> usize {
        self.win_length
    }

    /// Number of frequency bins `F = n_fft/2 + 1`.
    pub fn n_bins(&self) -> usize {
        self.n_fft / 2 + 1
    }

    /// Number of frames `T = n/hop + 1` of a signal of `n` samples.
    pub fn n_frames(&self, n: usize) -> usize {
        n / self.hop + 1
    }

    /// The window actually applied, zero-padded to `n_fft`.
    pub fn window(&self) -> &[f64] {
        &self.window
    }

    /// `[..., N]` → `[..., F, T, 2]` (last dim = (re, im)), centred with reflect padding of
    /// `n_fft/2` (which requires `N > n_fft/2`), unnormalised. Differentiable.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = *x
            .dims()
            .last()
            .ok_or_else(|| Error::Msg("stft: input must have at least one dim".into()))?;
        if n <= self.n_fft / 2 {
            return Err(Error::Msg(format!(
                "stft: signal length {n} must exceed n_fft/2 = {} for reflect padding",
                self.n_fft / 2
            )));
        }
        let op = SpecOp {
            kind: Kind::Stft,
            geom: self.geometry(n, self.n_frames(n))?,
        };
        apply_spec(x, op)
    }

    /// `[..., F, T, 2]` → `[..., length]`, like `torch.istft(center=True, length=length)`:
    /// overlap-add of windowed inverse real FFTs, divided by the overlap-added squared window
    /// (a fixed normalisation), trimmed by `n_fft/2` at the start; samples past the last frame
    /// are zero. Differentiable in `spec`.
    pub fn inverse(&self, spec: &Tensor, length: usize) -> Result<Tensor> {
        let dims = spec.dims();
        let r = dims.len();
        if r < 3 || dims[r - 1] != 2 || dims[r - 3] != self.n_bins() {
            return Err(Error::Msg(format!(
                "istft: expected [..., {}, T, 2], got {dims:?}",
                self.n_bins()
            )));
        }
        if length == 0 {
            return Err(Error::Msg("istft: length must be > 0".into()));
        }
        let frames = dims[r - 2];
        if frames == 0 {
            return Err(Error::Msg("istft: spectrogram has no frames".into()));
        }
        let op = SpecOp {
            kind: Kind::Istft,
            geom: self.geometry(length, frames)?,
        };
        apply_spec(spec, op)
    }

    /// The iSTFT ([`Stft::inverse`]) of the complex product `mask · spec` ((re, im) last):
    /// `mask` `[B, S, ..., F, T, 2]` (any layout), `spec` `[B, ..., F, T, 2]` shared by the `S`
    /// masks of each item; returns `[B, S, ..., length]`. Differentiable in both. One op on the
    /// CPU, so that the graph keeps the mask and the spectrogram but not the product's four
    /// partial products, its two halves and their concatenation ([`inverse_masked_composed`]).
    /// With a 16-bit mask or spectrogram both are taken to f32 (product and iSTFT in f32) and
    /// the result is in the spectrogram's dtype.
    pub fn inverse_masked(&self, mask: &Tensor, spec: &Tensor, length: usize) -> Result<Tensor> {
        let (md, sd) = (mask.dims(), spec.dims());
        let r = md.len();
        if r < 5 || sd.len() != r - 1 || sd[0] != md[0] || sd[1..] != md[2..] {
            return Err(Error::Msg(format!(
                "istft: mask {md:?} must be [B, S, ..., F, T, 2] for the spectrogram {sd:?}"
            )));
        }
        // Checks the spectrogram part of the shape as `inverse` does.
        if md[r - 1] != 2 || md[r - 3] != self.n_bins() || length == 0 || md[r - 2] == 0 {
            return Err(Error::Msg(format!(
                "istft: expected a mask [..., {}, T > 0, 2] and a length > 0, got {md:?}, {length}",
                self.n_bins()
            )));
        }
        if is_half(mask.dtype()) || is_half(spec.dtype()) {
            let (m, s) = (mask.to_dtype(DType::F32)?, spec.to_dtype(DType::F32)?);
            return self.inverse_masked(&m, &s, length)?.to_dtype(spec.dtype());
        }
        if !stft_kernel_takes(&[mask, spec]) {
            return inverse_masked_composed(self, mask, spec, length);
        }
        let geom = self.geometry(length, md[r - 2])?;
        if !mask.device().is_cpu() || !fused_kernels_on() {
            return super::stft_dft::inverse_masked_dft(&geom, mask, spec);
        }
        let op = MaskedIstft {
            istft: SpecOp {
                kind: Kind::Istft,
                geom,
            },
        };
        mask.apply_op2(&spec.contiguous()?, op)
    }

    pub(super) fn geometry(&self, n: usize, frames: usize) -> Result<Arc<Geometry>> {
        let geom = Geometry {
            n_fft: self.n_fft,
            hop: self.hop,
            window: self.window.clone(),
            win_length: self.win_length,
            n,
            frames,
        };
        Ok(Arc::new(geom))
    }
}

/// [`Stft::inverse_masked`] composed from candle ops: the complex product by narrows and
/// broadcast products, concatenated, then [`Stft::inverse`].
pub fn inverse_masked_composed(
    stft: &Stft,
    mask: &Tensor,
    spec: &Tensor,
    length: usize,
) -> Result<Tensor> {
    let last = mask.rank() - 1;
    let spec = spec.unsqueeze(1)?;
    let (mr, mi) = (mask.narrow(last, 0, 1)?, mask.narrow(last, 1, 1)?);
    let (sr, si) = (spec.narrow(last, 0, 1)?, spec.narrow(last, 1, 1)?);
    let re = (mr.broadcast_mul(&sr)? - mi.broadcast_mul(&si)?)?;
    let im = (mr.broadcast_mul(&si)? + mi.broadcast_mul(&sr)?)?;
    stft.inverse(&Tensor::cat(&[re, im], last)?, length)
}

/// `(mask, spec)` → iSTFT of their complex product. `mask` is read through its strides.
struct MaskedIstft {
    istft: SpecOp,
}

impl MaskedIstft {
    /// Items (the product of the leading dims) and sources of the mask, complex values per
    /// spectrogram.
    fn sizes(mask: &[usize]) -> (usize, usize, usize) {
        let r = mask.len();
        (mask[0], mask[1], mask[2..r - 1].iter().product())
    }

    /// `mask · spec` in the mask's logical order, `[B, S, ..., F, T, 2]` contiguous.
    fn product<T: Real>(mask: Vec<T>, spec: &[T], s: usize, per: usize) -> Vec<T> {
        let mut y = mask;
        y.par_chunks_mut(2 * per).enumerate().for_each(|(bs, yb)| {
            let sb = &spec[(bs / s) * 2 * per..(bs / s + 1) * 2 * per];
            for (m, x) in yb.chunks_mut(2).zip(sb.chunks(2)) {
                let (mr, mi) = (m[0], m[1]);
                m[0] = mr * x[0] - mi * x[1];
                m[1] = mr * x[1] + mi * x[0];
            }
        });
        y
    }

    fn forward<T: Real>(&self, mask: Vec<T>, spec: &[T], dims: &[usize]) -> Result<Vec<T>> {
        let (b, s, per) = Self::sizes(dims);
        let y = Self::product(mask, spec, s, per);
        let g = &self.istft.geom;
        istft_cpu(g, &y, b * s * per / (g.bins() * g.frames))
    }
}

/// The elements of a tensor in its logical (row-major) order, read through `layout`'s strides.
fn gather_strided<T: Copy + Send + Sync>(data: &[T], layout: &Layout) -> Vec<T> {
    if let Some((start, end)) = layout.contiguous_offsets() {
        return data[start..end].to_vec();
    }
    let dims = layout.dims();
    let strides = layout.stride();
    let r = dims.len();
    let inner = dims[r - 1];
    let rows: usize = dims[..r - 1].iter().product();
    let mut out = Vec::with_capacity(rows * inner);
    let mut idx = vec![0usize; r - 1];
    for _ in 0..rows {
        let base = layout.start_offset()
            + idx
                .iter()
                .zip(strides)
                .map(|(&i, &st)| i * st)
                .sum::<usize>();
        out.extend((0..inner).map(|j| data[base + j * strides[r - 1]]));
        for k in (0..r - 1).rev() {
            idx[k] += 1;
            if idx[k] < dims[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    out
}

impl candle_core::CustomOp2 for MaskedIstft {
    fn name(&self) -> &'static str {
        "masked-istft"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let dims = l1.dims();
        let out = match (s1, s2.dtype()) {
            (CpuStorage::F32(m), DType::F32) => CpuStorage::F32(self.forward(
                gather_strided(m, l1),
                contiguous_slice(s2, l2, name)?,
                dims,
            )?),
            (CpuStorage::F64(m), DType::F64) => CpuStorage::F64(self.forward(
                gather_strided(m, l1),
                contiguous_slice(s2, l2, name)?,
                dims,
            )?),
            _ => return Err(unsupported_dtype(name, s1.dtype())),
        };
        let mut shape = dims[..dims.len() - 3].to_vec();
        shape.push(self.istft.geom.n);
        Ok((out, Shape::from(shape)))
    }

    fn bwd(
        &self,
        mask: &Tensor,
        spec: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dims = mask.dims().to_vec();
        let (_, s, per) = Self::sizes(&dims);
        // The gradient of the product: the iSTFT's adjoint, `[B, S, ..., F, T, 2]`.
        let adjoint = SpecOp {
            kind: Kind::IstftAdjoint,
            geom: self.istft.geom.clone(),
        };
        let dy = grad.contiguous()?.apply_op1_no_bwd(&adjoint)?;
        let spec_d = spec.detach();
        // d spec = Σ_s dy · conj(mask) (only when the spectrogram is tracked; the model's is
        // data).
        let dspec = if spec.track_op() {
            let m = mask.detach().contiguous()?;
            let prod = |dy: &[f32]| {
                super::cpu::with_slice::<f32, _>(&m, "masked-istft-bwd", |m| {
                    Ok(conj_product_sum(dy, m, s, per))
                })
            };
            let prod64 = |dy: &[f64]| {
                super::cpu::with_slice::<f64, _>(&m, "masked-istft-bwd", |m| {
                    Ok(conj_product_sum(dy, m, s, per))
                })
            };
            Some(super::cpu::map_tensor(
                &dy,
                spec.shape(),
                "masked-istft-bwd",
                prod,
                prod64,
            )?)
        } else {
            None
        };
        // d mask = dy · conj(spec), broadcast over the sources.
        let dmask = if mask.track_op() {
            let prod = |dy: &[f32]| {
                super::cpu::with_slice::<f32, _>(&spec_d, "masked-istft-bwd", |x| {
                    Ok(conj_product(dy, x, s, per))
                })
            };
            let prod64 = |dy: &[f64]| {
                super::cpu::with_slice::<f64, _>(&spec_d, "masked-istft-bwd", |x| {
                    Ok(conj_product(dy, x, s, per))
                })
            };
            Some(super::cpu::map_tensor(
                &dy,
                dims,
                "masked-istft-bwd",
                prod,
                prod64,
            )?)
        } else {
            None
        };
        Ok((dmask, dspec))
    }
}

/// `g · conj(x)` per complex value, `x` `[B, P]` broadcast over the `s` sources of `g`
/// `[B, S, P]` (`P = per` complex values).
fn conj_product<T: Real>(g: &[T], x: &[T], s: usize, per: usize) -> Vec<T> {
    let mut out = vec![T::zero(); g.len()];
    out.par_chunks_mut(2 * per)
        .zip(g.par_chunks(2 * per))
        .enumerate()
        .for_each(|(bs, (ob, gb))| {
            let xb = &x[(bs / s) * 2 * per..(bs / s + 1) * 2 * per];
            for ((o, gv), xv) in ob.chunks_mut(2).zip(gb.chunks(2)).zip(xb.chunks(2)) {
                o[0] = gv[0] * xv[0] + gv[1] * xv[1];
                o[1] = gv[1] * xv[0] - gv[0] * xv[1];
            }
        });
    out
}

/// `Σ_s g_s · conj(m_s)` for `g`, `m` `[B, S, P]`: `[B, P]`.
fn conj_product_sum<T: Real>(g: &[T], m: &[T], s: usize, per: usize) -> Vec<T> {
    let mut out = vec![T::zero(); g.len() / s];
    out.par_chunks_mut(2 * per).enumerate().for_each(|(b, ob)| {
        for src in 0..s {
            let at = (b * s + src) * 2 * per;
            let (gb, mb) = (&g[at..at + 2 * per], &m[at..at + 2 * per]);
            for ((o, gv), mv) in ob.chunks_mut(2).zip(gb.chunks(2)).zip(mb.chunks(2)) {
                o[0] += gv[0] * mv[0] + gv[1] * mv[1];
                o[1] += gv[1] * mv[0] - gv[0] * mv[1];
            }
        }
    });
    out
}

/// Applies `op`: its CPU kernel on the CPU, DFT matmuls on a GPU and under
/// [`super::with_composed_ops`] ([`super::stft_dft::spec_map_tracked`]). A 16-bit `x` is
/// transformed in f32 and the result cast back (an FFT in bf16 would lose the small bins).
fn apply_spec(x: &Tensor, op: SpecOp) -> Result<Tensor> {
    in_f32(x, |x| {
        if x.device().is_cpu() && fused_kernels_on() {
            x.contiguous()?.apply_op1(op)
        } else {
            super::stft_dft::spec_map_tracked(op.kind, &op.geom, x)
        }
    })
}

/// Everything a kernel needs: transform sizes, window, signal length and frame count.
#[derive(Debug)]
pub(super) struct Geometry {
    pub(super) n_fft: usize,
    pub(super) hop: usize,
    pub(super) window: Arc<[f64]>,
    /// Length of the window inside `n_fft` (centred; zero outside).
    pub(super) win_length: usize,
    /// Signal length (input of the STFT, output of the iSTFT).
    pub(super) n: usize,
    pub(super) frames: usize,
}

impl Geometry {
    pub(super) fn bins(&self) -> usize {
        self.n_fft / 2 + 1
    }

    fn spec_len(&self) -> usize {
        self.bins() * self.frames * 2
    }

    /// Length of the overlap-add buffer of the iSTFT.
    fn ola_len(&self) -> usize {
        self.n_fft + self.hop * (self.frames - 1)
    }

    /// `1/Σ_t w²[m − t·hop]` on the part of the overlap-add buffer kept by the iSTFT
    /// (`n_fft/2 ≤ m < n_fft/2 + n`), zero elsewhere. Errors where the envelope vanishes.
    pub(super) fn inverse_envelope(&self) -> Result<Vec<f64>> {
        let ola = self.ola_len();
        let mut env = vec![0.0; ola];
        for t in 0..self.frames {
            for (e, w) in env[t * self.hop..].iter_mut().zip(self.window.iter()) {
                *e += w * w;
            }
        }
        let start = self.n_fft / 2;
        let end = (start + self.n).min(ola);
        let mut inv = vec![0.0; ola];
        for m in start..end {
            if env[m] < ENVELOPE_MIN {
                return Err(Error::Msg(format!(
                    "istft: window overlap-add vanishes at sample {} (hop {} too large for the \
                     window?)",
                    m - start,
                    self.hop
                )));
            }
            inv[m] = 1.0 / env[m];
        }
        Ok(inv)
    }
}

/// Which of the four linear maps a [`SpecOp`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `[..., n]` → `[..., F, T, 2]`.
    Stft,
    /// Adjoint of the STFT: `[..., F, T, 2]` → `[..., n]`.
    StftAdjoint,
    /// `[..., F, T, 2]` → `[..., n]`.
    Istft,
    /// Adjoint of the iSTFT: `[..., n]` → `[..., F, T, 2]`.
    IstftAdjoint,
}

impl Kind {
    pub(super) fn adjoint(self) -> Kind {
        match self {
            Kind::Stft => Kind::StftAdjoint,
            Kind::StftAdjoint => Kind::Stft,
            Kind::Istft => Kind::IstftAdjoint,
            Kind::IstftAdjoint => Kind::Istft,
        }
    }

    /// Whether the input is a signal `[..., n]` (else a spectrogram `[..., F, T, 2]`).
    pub(super) fn takes_signal(self) -> bool {
        matches!(self, Kind::Stft | Kind::IstftAdjoint)
    }
}

pub(super) struct SpecOp {
    pub(super) kind: Kind,
    pub(super) geom: Arc<Geometry>,
}

impl SpecOp {
    /// Leading (batch) dims of the input and the output shape, after checking the input shape.
    pub(super) fn shapes(&self, dims: &[usize]) -> Result<(usize, Shape)> {
        let g = &self.geom;
        let (lead, ok) = if self.kind.takes_signal() {
            let r = dims.len();
            (&dims[..r.saturating_sub(1)], r >= 1 && dims[r - 1] == g.n)
        } else {
            let r = dims.len();
            (
                &dims[..r.saturating_sub(3)],
                r >= 3 && dims[r - 3..] == [g.bins(), g.frames, 2],
            )
        };
        if !ok {
            return Err(Error::Msg(format!(
                "{}: unexpected input shape {dims:?}",
                self.name()
            )));
        }
        let mut out: Vec<usize> = lead.to_vec();
        if self.kind.takes_signal() {
            out.extend_from_slice(&[g.bins(), g.frames, 2]);
        } else {
            out.push(g.n);
        }
        Ok((lead.iter().product(), Shape::from(out)))
    }

    fn run<T: Real>(&self, x: &[T], batch: usize) -> Result<Vec<T>> {
        match self.kind {
            Kind::Stft => stft_cpu(&self.geom, x, batch),
            Kind::StftAdjoint => stft_adjoint_cpu(&self.geom, x, batch),
            Kind::Istft => istft_cpu(&self.geom, x, batch),
            Kind::IstftAdjoint => istft_adjoint_cpu(&self.geom, x, batch),
        }
    }
}

impl CustomOp1 for SpecOp {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Stft => "stft",
            Kind::StftAdjoint => "stft-adjoint",
            Kind::Istft => "istft",
            Kind::IstftAdjoint => "istft-adjoint",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, shape) = self.shapes(layout.dims())?;
        let out = match storage.dtype() {
            DType::F32 => {
                let x = contiguous_slice::<f32>(storage, layout, self.name())?;
                CpuStorage::F32(self.run(x, batch)?)
            }
            DType::F64 => {
                let x = contiguous_slice::<f64>(storage, layout, self.name())?;
                CpuStorage::F64(self.run(x, batch)?)
            }
            dt => return Err(unsupported_dtype(self.name(), dt)),
        };
        Ok((out, shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // Every map here is linear, so its vector-Jacobian product is its adjoint.
        let adjoint = SpecOp {
            kind: self.kind.adjoint(),
            geom: self.geom.clone(),
        };
        Ok(Some(grad_res.contiguous()?.apply_op1(adjoint)?))
    }
}

/// Index into the signal of sample `i` of the reflect-padded signal (`i` relative to the
/// signal start, may be negative or past the end). Requires `n > pad`.
pub(super) fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    let j = if i < 0 {
        -i
    } else if i >= n {
        2 * (n - 1) - i
    } else {
        i
    };
    j as usize
}

pub(super) fn window_as<T: Real>(g: &Geometry) -> Vec<T> {
    g.window.iter().map(|&w| cast(w)).collect()
}

pub(super) fn fft_error(op: &str, e: realfft::FftError) -> Error {
    Error::Msg(format!("{op}: FFT failed: {e}"))
}

/// Samples per work item of the parallel overlap-add.
const OLA_CHUNK: usize = 4096;

/// Overlap-adds `frames` consecutive `n_fft`-sample frames (`buf` is `[frames, n_fft]`) at
/// stride `hop` into a buffer of `len` samples, in parallel over output chunks (each chunk
/// sums the frames that overlap it, so no two workers write the same sample).
pub(super) fn overlap_add<T: Real>(buf: &[T], n_fft: usize, hop: usize, len: usize) -> Vec<T> {
    let frames = buf.len() / n_fft;
    let mut ola = vec![T::zero(); len];
    ola.par_chunks_mut(OLA_CHUNK)
        .enumerate()
        .for_each(|(c, dst)| {
            let c0 = c * OLA_CHUNK;
            let c1 = c0 + dst.len();
            // Frames t with t·hop + n_fft > c0 and t·hop < c1.
            let t_lo = (c0 + 1).saturating_sub(n_fft).div_ceil(hop);
            let t_hi = frames.min((c1 - 1) / hop + 1);
            for t in t_lo..t_hi {
                let start = t * hop;
                let (lo, hi) = (start.max(c0), (start + n_fft).min(c1));
                let frame = &buf[t * n_fft..(t + 1) * n_fft];
                for (d, v) in dst[lo - c0..hi - c0].iter_mut().zip(&frame[lo - start..]) {
                    *d += *v;
                }
            }
        });
    ola
}

/// Writes one signal's `[frames, bins]` complex values as `[bins, frames, 2]` into `out`.
fn frames_to_spec<T: Real>(tmp: &[Complex<T>], bins: usize, frames: usize, out: &mut [T]) {
    out.par_chunks_mut(frames * 2)
        .enumerate()
        .for_each(|(f, row)| {
            for (t, c) in row.chunks_mut(2).enumerate() {
                let z = tmp[t * bins + f];
                c[0] = z.re;
                c[1] = z.im;
            }
        });
}

// The kernels loop over the signals of the batch and parallelise within each signal (over
// frames, bins or output chunks): the per-signal temporaries then stay one signal's worth,
// which matters for the loss' hop-147 / n_fft-4096 spectrograms of long segments.

/// Forward STFT: `x` is `[batch, n]`, result `[batch, bins, frames, 2]`.
fn stft_cpu<T: Real>(g: &Geometry, x: &[T], batch: usize) -> Result<Vec<T>> {
    let (n, nfft, bins, frames, pad) = (g.n, g.n_fft, g.bins(), g.frames, g.n_fft / 2);
    let win = window_as::<T>(g);
    let fft = RealFftPlanner::<T>::new().plan_fft_forward(nfft);
    let mut out = vec![T::zero(); batch * g.spec_len()];
    let mut tmp = vec![Complex::new(T::zero(), T::zero()); frames * bins];
    for (sig, o) in x.chunks(n).zip(out.chunks_mut(g.spec_len())) {
        tmp.par_chunks_mut(bins)
            .enumerate()
            .try_for_each_init(
                || (fft.make_input_vec(), fft.make_scratch_vec()),
                |(buf, scratch), (t, dst)| {
                    let start = (t * g.hop) as isize - pad as isize;
                    for (i, (v, w)) in buf.iter_mut().zip(&win).enumerate() {
                        *v = sig[reflect(start + i as isize, n)] * *w;
                    }
                    fft.process_with_scratch(buf, dst, scratch)
                },
            )
            .map_err(|e| fft_error("stft", e))?;
        frames_to_spec(&tmp, bins, frames, o);
    }
    Ok(out)
}

/// Adjoint of the STFT: `gspec` is `[batch, bins, frames, 2]`, result `[batch, n]`.
///
/// Per frame the adjoint of `x ↦ rfft(w·x)` is `g ↦ w · Re(Σ_f g_f e^{+2πifn/N})`, which is an
/// unnormalised inverse real FFT of `g` with the interior bins halved (the C2R transform
/// counts each interior bin twice through Hermitian symmetry) and the imaginary parts of DC
/// and Nyquist dropped (those outputs are identically zero). Then frames are overlap-added
/// and the reflect padding is folded back onto the samples it copied.
fn stft_adjoint_cpu<T: Real>(g: &Geometry, gspec: &[T], batch: usize) -> Result<Vec<T>> {
    let (n, nfft, bins, frames, pad) = (g.n, g.n_fft, g.bins(), g.frames, g.n_fft / 2);
    let win = window_as::<T>(g);
    let ifft = RealFftPlanner::<T>::new().plan_fft_inverse(nfft);
    let half: T = cast(0.5);
    let mut out = vec![T::zero(); batch * n];
    let mut frame_buf = vec![T::zero(); frames * nfft];
    for (gs, dx) in gspec.chunks(g.spec_len()).zip(out.chunks_mut(n)) {
        frame_buf
            .par_chunks_mut(nfft)
            .enumerate()
            .try_for_each_init(
                || (ifft.make_input_vec(), ifft.make_scratch_vec()),
                |(spec, scratch), (t, dst)| {
                    for (f, z) in spec.iter_mut().enumerate() {
                        let re = gs[(f * frames + t) * 2];
                        let im = gs[(f * frames + t) * 2 + 1];
                        *z = if f == 0 || f == bins - 1 {
                            Complex::new(re, T::zero())
                        } else {
                            Complex::new(re * half, im * half)
                        };
                    }
                    ifft.process_with_scratch(spec, dst, scratch)?;
                    for (v, w) in dst.iter_mut().zip(&win) {
                        *v *= *w;
                    }
                    Ok(())
                },
            )
            .map_err(|e| fft_error("stft-adjoint", e))?;
        let padded = overlap_add(&frame_buf, nfft, g.hop, n + 2 * pad);
        for (m, v) in padded.iter().enumerate() {
            dx[reflect(m as isize - pad as isize, n)] += *v;
        }
    }
    Ok(out)
}

/// Inverse STFT: `spec` is `[batch, bins, frames, 2]`, result `[batch, n]`.
fn istft_cpu<T: Real>(g: &Geometry, spec: &[T], batch: usize) -> Result<Vec<T>> {
    let (n, nfft, bins, frames, pad) = (g.n, g.n_fft, g.bins(), g.frames, g.n_fft / 2);
    let inv_env: Vec<T> = g.inverse_envelope()?.into_iter().map(cast).collect();
    // realfft's inverse is unnormalised; 1/n_fft makes it the true inverse (irfft).
    let scale: T = cast(1.0 / nfft as f64);
    let win: Vec<T> = window_as::<T>(g).into_iter().map(|w| w * scale).collect();
    let ifft = RealFftPlanner::<T>::new().plan_fft_inverse(nfft);
    let ola_len = g.ola_len();
    let mut out = vec![T::zero(); batch * n];
    let mut frame_buf = vec![T::zero(); frames * nfft];
    for (s, y) in spec.chunks(g.spec_len()).zip(out.chunks_mut(n)) {
        frame_buf
            .par_chunks_mut(nfft)
            .enumerate()
            .try_for_each_init(
                || (ifft.make_input_vec(), ifft.make_scratch_vec()),
                |(buf, scratch), (t, dst)| {
                    for (f, z) in buf.iter_mut().enumerate() {
                        let re = s[(f * frames + t) * 2];
                        // Like torch's C2R irfft, the imaginary parts of DC and Nyquist are
                        // ignored.
                        let im = if f == 0 || f == bins - 1 {
                            T::zero()
                        } else {
                            s[(f * frames + t) * 2 + 1]
                        };
                        *z = Complex::new(re, im);
                    }
                    ifft.process_with_scratch(buf, dst, scratch)?;
                    for (v, w) in dst.iter_mut().zip(&win) {
                        *v *= *w;
                    }
                    Ok(())
                },
            )
            .map_err(|e| fft_error("istft", e))?;
        let ola = overlap_add(&frame_buf, nfft, g.hop, ola_len);
        // Samples past the overlap-add buffer stay zero (torch pads them with zeros too).
        for ((yj, o), e) in y.iter_mut().zip(&ola[pad..]).zip(&inv_env[pad..]) {
            *yj = *o * *e;
        }
    }
    Ok(out)
}

/// Adjoint of the iSTFT: `gsig` is `[batch, n]`, result `[batch, bins, frames, 2]`.
///
/// Per frame, `dy[k] = w[k] · g[t·hop + k − n_fft/2] / env[t·hop + k]`, then the adjoint of
/// `irfft` is `c_f/N · rfft(dy)` with `c_f = 1` for DC and Nyquist and 2 for interior bins
/// (they appear twice in the Hermitian extension); the imaginary parts of DC and Nyquist get
/// no gradient (irfft ignores them, and rfft of a real signal has them zero anyway).
fn istft_adjoint_cpu<T: Real>(g: &Geometry, gsig: &[T], batch: usize) -> Result<Vec<T>> {
    let (n, nfft, bins, frames, pad) = (g.n, g.n_fft, g.bins(), g.frames, g.n_fft / 2);
    let inv_env: Vec<T> = g.inverse_envelope()?.into_iter().map(cast).collect();
    let win = window_as::<T>(g);
    let fft = RealFftPlanner::<T>::new().plan_fft_forward(nfft);
    let edge: T = cast(1.0 / nfft as f64);
    let interior: T = cast(2.0 / nfft as f64);
    let mut out = vec![T::zero(); batch * g.spec_len()];
    let mut tmp = vec![Complex::new(T::zero(), T::zero()); frames * bins];
    for (gs, o) in gsig.chunks(n).zip(out.chunks_mut(g.spec_len())) {
        tmp.par_chunks_mut(bins)
            .enumerate()
            .try_for_each_init(
                || (fft.make_input_vec(), fft.make_scratch_vec()),
                |(buf, scratch), (t, dst)| {
                    for (k, v) in buf.iter_mut().enumerate() {
                        let m = t * g.hop + k;
                        // inv_env is zero outside the kept range, but the index into the
                        // gradient must be valid.
                        *v = if m >= pad && m - pad < n {
                            gs[m - pad] * inv_env[m] * win[k]
                        } else {
                            T::zero()
                        };
                    }
                    fft.process_with_scratch(buf, dst, scratch)?;
                    for (f, z) in dst.iter_mut().enumerate() {
                        *z = if f == 0 || f == bins - 1 {
                            Complex::new(z.re * edge, T::zero())
                        } else {
                            *z * interior
                        };
                    }
                    Ok(())
                },
            )
            .map_err(|e| fft_error("istft-adjoint", e))?;
        frames_to_spec(&tmp, bins, frames, o);
    }
    Ok(out)
}
