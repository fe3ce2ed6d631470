//! Parameter descriptions and their deterministic initialisation.
//!
//! No `VarMap`: its `HashMap` iterates in a per-process order. Parameters are described by
//! [`ParamSpec`]s named by module path and are created from a seed with one ChaCha20 stream per
//! parameter (stream id = FNV-1a hash of the name), so every value depends only on
//! `(seed, name)`, never on thread count, process, or the order parameters are created in.

use crate::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::collections::BTreeMap;

/// How a parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// PyTorch's default for `nn.Linear` weight and bias: `U(-1/√fan_in, 1/√fan_in)`
    /// (kaiming_uniform with a = √5 gives exactly this bound for the weight).
    LinearUniform {
        fan_in: usize,
    },
    /// RMSNorm gain.
    Ones,
    Zeros,
}

/// A trainable tensor: name (module path), shape and initialiser.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamSpec {
    pub fn new(name: impl Into<String>, shape: &[usize], init: Init) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            init,
        }
    }

    /// Number of scalars.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Creates the tensor for `seed`: a pure function of `(seed, name, shape, init)`.
    pub fn init_tensor(&self, seed: u64, device: &Device, dtype: DType) -> Result<Tensor> {
        let t = match self.init {
            Init::Ones => Tensor::ones(self.shape.as_slice(), dtype, device)?,
            Init::Zeros => Tensor::zeros(self.shape.as_slice(), dtype, device)?,
            Init::LinearUniform { fan_in } => {
                if fan_in == 0 {
                    return Err(ModelError::Config(format!("{}: fan_in is 0", self.name)));
                }
                let bound = 1.0 / (fan_in as f64).sqrt();
                let mut rng = ChaCha20Rng::seed_from_u64(seed);
                rng.set_stream(fnv1a64(&self.name));
                // Drawn in f64 and cast, so f32 and f64 models start from the same values.
                let v: Vec<f64> = (0..self.numel())
                    .map(|_| bound * (2.0 * rng.random::<f64>() - 1.0))
                    .collect();
                Tensor::from_vec(v, self.shape.as_slice(), &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(device)?
            }
        };
        Ok(t)
    }
}

/// 64-bit FNV-1a: a stable (cross-platform, cross-version) hash of a parameter name.
fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Creates every parameter of `specs`; the map iterates in name order.
pub fn init_params(
    specs: &[ParamSpec],
    seed: u64,
    device: &Device,
    dtype: DType,
) -> Result<BTreeMap<String, Tensor>> {
    specs
        .iter()
        .map(|s| Ok((s.name.clone(), s.init_tensor(seed, device, dtype)?)))
        .collect()
}

/// Total scalars of `specs` (shapes only, nothing allocated).
pub fn count_scalars(specs: &[ParamSpec]) -> u64 {
    specs.iter().map(|s| s.numel() as u64).sum()
}

/// Picks the tensors of `specs` out of `params`, in `specs` order, checking shapes.
pub fn select_params(
    specs: &[ParamSpec],
    params: &BTreeMap<String, Tensor>,
) -> Result<Vec<Tensor>> {
    specs
        .iter()
        .map(|s| {
            let t = params
                .get(&s.name)
                .ok_or_else(|| ModelError::Input(format!("missing parameter {}", s.name)))?;
            if t.dims() != s.shape.as_slice() {
                return Err(ModelError::Input(format!(
                    "parameter {} has shape {:?}, expected {:?}",
                    s.name,
                    t.dims(),
                    s.shape
                )));
            }
            Ok(t.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_init_is_deterministic_and_bounded() -> Result<()> {
        let s = ParamSpec::new("a.weight", &[8, 16], Init::LinearUniform { fan_in: 16 });
        let a = s
            .init_tensor(7, &Device::Cpu, DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let b = s
            .init_tensor(7, &Device::Cpu, DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let c = s
            .init_tensor(8, &Device::Cpu, DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|v| v.abs() <= 0.25));
        let other = ParamSpec {
            name: "b.weight".into(),
            ..s.clone()
        };
        let d = other
            .init_tensor(7, &Device::Cpu, DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        assert_ne!(a, d);
        Ok(())
    }
}
