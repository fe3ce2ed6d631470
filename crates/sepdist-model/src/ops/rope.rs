//! Rotary position embedding, interleaved-pairs convention.
//!
//! Matches lucidrains' `rotary_embedding_torch` as used by the PyTorch BS-RoFormer: the pairs
//! `(x[2i], x[2i+1])` of each head vector at position `t` are rotated by the angle
//! `t · base^(−2i/Dh)`.

use candle_core::{D, DType, Device, Error, Result, Tensor};

/// Precomputed cos/sin tables for positions `0..max_len`.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `[max_len, head_dim]`, each pair's cosine repeated twice (interleaved layout).
    cos: Tensor,
    /// `[max_len, head_dim]`, each pair's sine repeated twice.
    sin: Tensor,
    max_len: usize,
    head_dim: usize,
}

impl Rope {
    /// Builds the tables. `head_dim` must be even and positive, `base` finite and > 0.
    pub fn new(
        max_len: usize,
        head_dim: usize,
        base: f64,
        device: &Device,
        dtype: DType,
    ) -> Result<Rope> {
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::Msg(format!(
                "rope: head_dim must be even and > 0, got {head_dim}"
            )));
        }
        if max_len == 0 {
            return Err(Error::Msg("rope: max_len must be > 0".into()));
        }
        if !(base.is_finite() && base > 0.0) {
            return Err(Error::Msg(format!(
                "rope: base must be finite and > 0, got {base}"
            )));
        }
        // Angles are computed in f64 and rounded once, so long tables stay accurate in f32.
        let mut cos = Vec::with_capacity(max_len * head_dim);
        let mut sin = Vec::with_capacity(max_len * head_dim);
        for t in 0..max_len {
            for i in 0..head_dim / 2 {
                let inv_freq = base.powf(-((2 * i) as f64) / head_dim as f64);
                let angle = t as f64 * inv_freq;
                let (s, c) = angle.sin_cos();
                cos.extend_from_slice(&[c, c]);
                sin.extend_from_slice(&[s, s]);
            }
        }
        let cos = Tensor::from_vec(cos, (max_len, head_dim), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_len, head_dim), device)?.to_dtype(dtype)?;
        Ok(Rope {
            cos,
            sin,
            max_len,
            head_dim,
        })
    }

    /// The largest sequence length the tables cover.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The head dimension the tables were built for.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The cos and sin tables, `[max_len, head_dim]` each, every pair's value twice.
    pub(crate) fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Rotates `x` of shape `[B, H, T, Dh]` (`T ≤ max_len`, `Dh = head_dim`); position of
    /// row `t` is `t`. Differentiable. An `x` of another dtype than the tables (bf16 with f32
    /// tables) is rotated in the tables' dtype and cast back, as PyTorch's rotary embedding
    /// does under autocast.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.rotate(x, false)
    }

    /// The transpose of [`Rope::apply`] (its inverse: a rotation), for gradients: `g·cos −
    /// rotate_half(g)·sin`. Not differentiable itself (a hand-written backward's step).
    pub fn apply_transposed(&self, g: &Tensor) -> Result<Tensor> {
        self.rotate(&g.detach(), true)
    }

    /// `x·cos ± rotate_half(x)·sin`: the rotation, or its transpose.
    fn rotate(&self, x: &Tensor, transposed: bool) -> Result<Tensor> {
        if x.dtype() != self.cos.dtype() {
            return self
                .rotate(&x.to_dtype(self.cos.dtype())?, transposed)?
                .to_dtype(x.dtype());
        }
        let (b, h, t, d) = x.dims4()?;
        if d != self.head_dim {
            return Err(Error::Msg(format!(
                "rope: last dim {d} differs from head_dim {}",
                self.head_dim
            )));
        }
        if t > self.max_len {
            return Err(Error::Msg(format!(
                "rope: sequence length {t} exceeds max_len {}",
                self.max_len
            )));
        }
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        // rotate_half for interleaved pairs: (x0, x1) -> (-x1, x0).
        let pairs = x.reshape((b, h, t, d / 2, 2))?;
        let x0 = pairs.narrow(D::Minus1, 0, 1)?;
        let x1 = pairs.narrow(D::Minus1, 1, 1)?;
        let rotated = Tensor::cat(&[&x1.neg()?, &x0], D::Minus1)?.reshape((b, h, t, d))?;
        let (straight, turned) = (x.broadcast_mul(&cos)?, rotated.broadcast_mul(&sin)?);
        if transposed {
            straight - turned
        } else {
            straight + turned
        }
    }
}
