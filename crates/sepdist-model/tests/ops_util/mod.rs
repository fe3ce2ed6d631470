//! Helpers shared by the `ops_*` integration tests: seeded random tensors, finite differences.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sepdist_model::ops::SeqLayout;

/// Uniform in [-1, 1), seeded, of the given shape and dtype.
pub fn uniform(shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
    Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// Max |a − b| over all elements, as f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()
}

/// Max |a| over all elements, as f64.
pub fn max_abs(a: &Tensor) -> Result<f64> {
    a.to_dtype(DType::F64)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()
}

/// Checks the gradient of `L(x) = ⟨r, f(x)⟩` (random projection `r`) against central finite
/// differences, coordinate by coordinate, in f64. Returns the max abs error.
pub fn fd_check<F>(f: F, x: &Tensor, seed: u64) -> Result<f64>
where
    F: Fn(&Tensor) -> Result<Tensor>,
{
    let x = x.to_dtype(DType::F64)?;
    let var = Var::from_tensor(&x)?;
    let y = f(var.as_tensor())?;
    let r = uniform(y.dims(), seed, DType::F64)?;
    let loss = |t: &Tensor| -> Result<f64> { (f(t)? * &r)?.sum_all()?.to_scalar::<f64>() };
    let grads = (y * &r)?.sum_all()?.backward()?;
    let g = grads
        .get(var.as_tensor())
        .ok_or_else(|| candle_core::Error::Msg("no gradient for x".into()))?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let base = x.flatten_all()?.to_vec1::<f64>()?;
    let h = 1e-6;
    let mut worst: f64 = 0.0;
    for i in 0..base.len() {
        let mut plus = base.clone();
        plus[i] += h;
        let mut minus = base.clone();
        minus[i] -= h;
        let lp = loss(&Tensor::from_vec(plus, x.dims(), &Device::Cpu)?)?;
        let lm = loss(&Tensor::from_vec(minus, x.dims(), &Device::Cpu)?)?;
        let fd = (lp - lm) / (2.0 * h);
        worst = worst.max((fd - g[i]).abs() / (1.0 + fd.abs()));
    }
    Ok(worst)
}

/// Time-like (several sequences interleaved in the rows), band-like and one-row layouts of
/// the fused projections' rows.
pub fn layouts() -> [SeqLayout; 3] {
    [
        SeqLayout {
            outer: 2,
            len: 5,
            inner: 3,
        },
        SeqLayout {
            outer: 4,
            len: 6,
            inner: 1,
        },
        SeqLayout {
            outer: 1,
            len: 1,
            inner: 2,
        },
    ]
}
