//! Peak heap memory of flash_attention vs the reference, forward + backward, T = 2048.
//!
//! A dedicated test binary because it installs a counting global allocator (`peak_alloc`) and
//! measures process-wide peaks, so nothing else may run concurrently in it: one test only.

use candle_core::{DType, Device, Result, Tensor, Var};
use peak_alloc::PeakAlloc;
use sepdist_model::ops::{flash_attention, reference_attention};

#[global_allocator]
static PEAK: PeakAlloc = PeakAlloc;

type AttnFn = fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>;

/// Peak bytes above the live inputs while running forward + backward of `f`, keeping the
/// gradients alive to the end (they are part of what a training step holds).
fn peak_extra(f: AttnFn, q: &Var, k: &Var, v: &Var, r: &Tensor) -> Result<usize> {
    let base = PEAK.current_usage();
    PEAK.reset_peak_usage();
    {
        let out = f(q, k, v, 32f64.powf(-0.5))?;
        let grads = (out * r)?.sum_all()?.backward()?;
        assert!(grads.get(q).is_some() && grads.get(k).is_some() && grads.get(v).is_some());
    }
    Ok(PEAK.peak_usage().saturating_sub(base))
}

#[test]
fn ops_attention_memory_flash_below_ten_percent_of_reference() -> Result<()> {
    let dev = Device::Cpu;
    let (b, h, t, d) = (1, 4, 2048, 32);
    let q = Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, t, d), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, t, d), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, t, d), &dev)?)?;
    let r = Tensor::randn(0f32, 1., (b, h, t, d), &dev)?;
    assert_eq!(r.dtype(), DType::F32);

    // Warm up thread pools and lazily allocated globals so they are not counted.
    {
        let small = |x: &Var| x.narrow(2, 0, 16);
        let (qs, ks, vs) = (small(&q)?, small(&k)?, small(&v)?);
        let _ = flash_attention(&qs, &ks, &vs, 0.1)?.sum_all()?.backward()?;
        let _ = reference_attention(&qs, &ks, &vs, 0.1)?
            .sum_all()?
            .backward()?;
    }

    let flash = peak_extra(flash_attention, &q, &k, &v, &r)?;
    let reference = peak_extra(reference_attention, &q, &k, &v, &r)?;
    let ratio = flash as f64 / reference as f64;
    eprintln!(
        "peak extra heap, fwd+bwd, B·H=4 T=2048 Dh=32: flash {:.1} MiB, reference {:.1} MiB, \
         ratio {:.4}",
        flash as f64 / (1 << 20) as f64,
        reference as f64 / (1 << 20) as f64,
        ratio
    );
    // The reference materialises several 4×2048×2048 f32 score tensors (64 MiB each).
    assert!(
        reference > (4 * 64) << 20,
        "reference peak {reference} suspiciously low"
    );
    assert!(ratio < 0.10, "flash/reference peak ratio {ratio}");
    Ok(())
}
