//! The loss' multi-resolution STFT L1 term as one op: `Σ_r mean |STFT_r(x)|`, the mean over
//! the real and imaginary parts of every bin and frame of every signal (see `crate::loss`).
//!
//! Composed from candle ops ([`multi_stft_l1_composed`]) every resolution keeps its complex
//! spectrogram and its absolute value for the backward, and the backward allocates several
//! more of them (the sign, the scaled gradient, the adjoint's input). Fused, the op keeps only
//! `x`, a waveform, and never holds a whole spectrogram: the forward sums `|re| + |im|` frame
//! by frame, and the backward recomputes each frame's transform to get
//! `dx = Σ_r γ / count_r · STFT_rᵀ(sign STFT_r(x))` (`γ` the upstream gradient).
//!
//! On a GPU the same sum and gradient come from DFT matmuls over chunks of frames
//! ([`super::stft_dft`]): the op then keeps `x` and the gradient, a waveform each.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Error, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;
use realfft::RealFftPlanner;
use realfft::num_complex::Complex;

use super::cpu::{
    Real, cast, contiguous_slice, fused_kernels_on, in_f32, is_half, map_tensor, stft_kernel_takes,
    unsupported_dtype,
};
use super::stft::{Geometry, Stft, fft_error, overlap_add, reflect, window_as};

/// `Σ_r mean |STFT_r(x)|` of `x` `[..., N]` over the resolutions `stfts`: a scalar,
/// differentiable in `x`; zero without resolutions. Each resolution needs `N > n_fft/2`
/// (reflect padding). One op on the CPU (f32, f64); on a GPU, and on the CPU under
/// [`super::with_composed_ops`], DFT matmuls in chunks of frames
/// ([`super::stft_dft`]); a 16-bit `x` is scored in f32 (the loss' sums), the result cast
/// back.
pub fn multi_stft_l1(x: &Tensor, stfts: &[Stft]) -> Result<Tensor> {
    let n = check(x, stfts)?;
    if stfts.is_empty() {
        return Tensor::zeros((), x.dtype(), x.device());
    }
    if is_half(x.dtype()) {
        return in_f32(x, |x| multi_stft_l1(x, stfts));
    }
    if !stft_kernel_takes(&[x]) {
        return multi_stft_l1_composed(x, stfts);
    }
    if !x.device().is_cpu() || !fused_kernels_on() {
        return super::stft_dft::multi_stft_l1_dft(x, stfts);
    }
    let geoms = stfts
        .iter()
        .map(|s| s.geometry(n, s.n_frames(n)))
        .collect::<Result<Vec<_>>>()?;
    x.contiguous()?.apply_op1(MultiStftL1 { geoms })
}

/// [`multi_stft_l1`] composed from candle ops (as the loss wrote it): per resolution the
/// spectrogram, its absolute value and their mean.
pub fn multi_stft_l1_composed(x: &Tensor, stfts: &[Stft]) -> Result<Tensor> {
    check(x, stfts)?;
    if is_half(x.dtype()) {
        return in_f32(x, |x| multi_stft_l1_composed(x, stfts));
    }
    let mut total = Tensor::zeros((), x.dtype(), x.device())?;
    for stft in stfts {
        total = (total + stft.forward(x)?.abs()?.mean_all()?)?;
    }
    Ok(total)
}

/// The signal length of `x`, after checking it against every resolution.
fn check(x: &Tensor, stfts: &[Stft]) -> Result<usize> {
    let n = *x
        .dims()
        .last()
        .ok_or_else(|| Error::Msg("multi-stft-l1: input must have at least one dim".into()))?;
    if let Some(s) = stfts.iter().find(|s| n <= s.n_fft() / 2) {
        return Err(Error::Msg(format!(
            "multi-stft-l1: signal length {n} must exceed n_fft/2 = {} for reflect padding",
            s.n_fft() / 2
        )));
    }
    Ok(n)
}

/// `x` → `Σ_r Σ|STFT_r(x)| / count_r` with `count_r` = signals × bins × frames × 2.
struct MultiStftL1 {
    /// One per resolution, all for the same signal length.
    geoms: Vec<Arc<Geometry>>,
}

/// Elements (real and imaginary parts) of the spectrograms of `signals` signals.
fn count(g: &Geometry, signals: usize) -> f64 {
    (signals * g.bins() * g.frames * 2) as f64
}

/// Frame `t` of the reflect-padded signal `sig`, windowed, into `buf` (`n_fft` samples).
fn load_frame<T: Real>(g: &Geometry, win: &[T], sig: &[T], t: usize, buf: &mut [T]) {
    let start = (t * g.hop) as isize - (g.n_fft / 2) as isize;
    for (i, (v, w)) in buf.iter_mut().zip(win).enumerate() {
        *v = sig[reflect(start + i as isize, g.n)] * *w;
    }
}

impl MultiStftL1 {
    const NAME: &'static str = "multi-stft-l1";

    /// The loss value. Per signal the frames are summed in parallel into one f64 per frame,
    /// then in order: the result does not depend on the thread count.
    fn forward<T: Real>(&self, x: &[T]) -> Result<f64> {
        let mut total = 0.0;
        for g in &self.geoms {
            let win = window_as::<T>(g);
            let fft = RealFftPlanner::<T>::new().plan_fft_forward(g.n_fft);
            let mut sum = 0.0;
            for sig in x.chunks(g.n) {
                let per_frame = (0..g.frames)
                    .into_par_iter()
                    .map_init(
                        || {
                            (
                                fft.make_input_vec(),
                                fft.make_output_vec(),
                                fft.make_scratch_vec(),
                            )
                        },
                        |(buf, spec, scratch), t| {
                            load_frame(g, &win, sig, t, buf);
                            fft.process_with_scratch(buf, spec, scratch)
                                .map_err(|e| fft_error(Self::NAME, e))?;
                            Ok(spec
                                .iter()
                                .map(|z| {
                                    <T as WithDType>::to_f64(z.re.abs())
                                        + <T as WithDType>::to_f64(z.im.abs())
                                })
                                .sum::<f64>())
                        },
                    )
                    .collect::<Result<Vec<f64>>>()?;
                sum += per_frame.iter().sum::<f64>();
            }
            total += sum / count(g, x.len() / g.n);
        }
        Ok(total)
    }

    /// `dx` for the upstream gradient `gamma`. Per resolution and signal, each frame's
    /// spectrum is recomputed, replaced by its scaled sign (`+1` at zero, as candle's `abs`
    /// backward has it) and sent through the STFT's adjoint (see `stft_adjoint_cpu`: interior
    /// bins halved, the imaginary parts of DC and Nyquist dropped, inverse real FFT, window),
    /// then the frames are overlap-added and the reflect padding folded back.
    fn backward<T: Real>(&self, x: &[T], gamma: f64) -> Result<Vec<T>> {
        let mut dx = vec![T::zero(); x.len()];
        for g in &self.geoms {
            let (n, nfft, bins, pad) = (g.n, g.n_fft, g.bins(), g.n_fft / 2);
            let c: T = cast(gamma / count(g, x.len() / n));
            let half_c = c * cast(0.5);
            let win = window_as::<T>(g);
            let mut planner = RealFftPlanner::<T>::new();
            let fft = planner.plan_fft_forward(nfft);
            let ifft = planner.plan_fft_inverse(nfft);
            let mut frame_buf = vec![T::zero(); g.frames * nfft];
            for (sig, d) in x.chunks(n).zip(dx.chunks_mut(n)) {
                frame_buf
                    .par_chunks_mut(nfft)
                    .enumerate()
                    .try_for_each_init(
                        || {
                            (
                                fft.make_input_vec(),
                                fft.make_output_vec(),
                                fft.make_scratch_vec(),
                                ifft.make_scratch_vec(),
                            )
                        },
                        |(buf, spec, fwd_scratch, inv_scratch), (t, dst)| {
                            load_frame(g, &win, sig, t, buf);
                            fft.process_with_scratch(buf, spec, fwd_scratch)?;
                            let sign = |v: T, s: T| if v >= T::zero() { s } else { -s };
                            for (f, z) in spec.iter_mut().enumerate() {
                                *z = if f == 0 || f == bins - 1 {
                                    Complex::new(sign(z.re, c), T::zero())
                                } else {
                                    Complex::new(sign(z.re, half_c), sign(z.im, half_c))
                                };
                            }
                            ifft.process_with_scratch(spec, dst, inv_scratch)?;
                            for (v, w) in dst.iter_mut().zip(&win) {
                                *v *= *w;
                            }
                            Ok(())
                        },
                    )
                    .map_err(|e| fft_error(Self::NAME, e))?;
                let padded = overlap_add(&frame_buf, nfft, g.hop, n + 2 * pad);
                for (m, v) in padded.iter().enumerate() {
                    d[reflect(m as isize - pad as isize, n)] += *v;
                }
            }
        }
        Ok(dx)
    }
}

impl CustomOp1 for MultiStftL1 {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = match s.dtype() {
            DType::F32 => {
                let v = self.forward(contiguous_slice::<f32>(s, l, name)?)?;
                CpuStorage::F32(vec![v as f32])
            }
            DType::F64 => {
                CpuStorage::F64(vec![self.forward(contiguous_slice::<f64>(s, l, name)?)?])
            }
            dt => return Err(unsupported_dtype(name, dt)),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let name = "multi-stft-l1-bwd";
        let gamma = grad.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let [gamma] = gamma[..] else {
            return Err(Error::Msg(format!(
                "{name}: expected a scalar gradient, got {:?}",
                grad.dims()
            )));
        };
        let xd = x.detach();
        let dx = map_tensor(
            &xd,
            x.shape(),
            name,
            |v| self.backward(v, gamma),
            |v| self.backward(v, gamma),
        )?;
        Ok(Some(dx))
    }
}
