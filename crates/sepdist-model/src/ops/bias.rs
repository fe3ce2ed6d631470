//! The bias add of the composed linear layers, with its gradient summed in f32 for bf16 on the
//! CPU.
//!
//! candle's backward of `y.broadcast_add(b)` sums the output's gradient over the rows in the
//! gradient's dtype: on the CPU a bf16 accumulator, which stops growing once the sum is 2⁹
//! times a term (a bias over 10⁵ rows would get a gradient of a few hundred rows). Its CUDA
//! kernels accumulate bf16 sums in f32, as PyTorch does. [`add_bias`] gives the CPU the same:
//! a custom op whose forward is candle's broadcast add and whose backward sums in f32.

use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::cpu::is_half;

/// `y + b`, `b` broadcast over `y`'s leading (and size-1) dims. Differentiable in both; for
/// every dtype but a 16-bit one on the CPU, exactly `y.broadcast_add(b)`.
pub(crate) fn add_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !(is_half(y.dtype()) && y.dtype() == b.dtype() && y.device().is_cpu()) {
        return y.broadcast_add(b);
    }
    y.apply_op2(b, BiasAdd)
}

struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = s1.binary_impl::<Add>(s2, l1, &l2.broadcast_as(l1.shape().clone())?)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = y.track_op().then(|| grad.clone());
        let db = if b.track_op() {
            // Sum over the dims `b` is broadcast along, in f32.
            let mut g = grad.to_dtype(DType::F32)?;
            for _ in b.rank()..g.rank() {
                g = g.sum(0)?;
            }
            for (i, &n) in b.dims().iter().enumerate() {
                if n == 1 && g.dim(i)? != 1 {
                    g = g.sum_keepdim(i)?;
                }
            }
            Some(g.to_dtype(b.dtype())?)
        } else {
            None
        };
        Ok((dy, db))
    }
}
