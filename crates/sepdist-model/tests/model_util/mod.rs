//! Seeded test data: candle's `Tensor::randn` draws from an unseeded generator, which would
//! make a test's inputs (and so its outcome near a kink of L1) change from run to run.

use candle_core::{Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Normal samples (Box–Muller) of `std` around 0, a pure function of `seed`, in f64.
pub fn normal(shape: &[usize], std: f64, seed: u64) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = rng.random();
            std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}
