//! flash_attention against the plain reference: outputs and gradients, f32 and f64.

mod ops_util;

use candle_core::{DType, Result, Tensor, Var};
use ops_util::{max_abs, max_abs_diff, uniform};
use sepdist_model::ops::{flash_attention, reference_attention};

type AttnFn = fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>;

/// Output and (dq, dk, dv) of `⟨r, attn(q, k, v)⟩` for a fixed random projection `r`.
fn run(f: AttnFn, q: &Tensor, k: &Tensor, v: &Tensor, r: &Tensor) -> Result<Vec<Tensor>> {
    let (q, k, v) = (
        Var::from_tensor(q)?,
        Var::from_tensor(k)?,
        Var::from_tensor(v)?,
    );
    let d = q.dim(3)?;
    let out = f(&q, &k, &v, (d as f64).powf(-0.5))?;
    let grads = (&out * r)?.sum_all()?.backward()?;
    let mut res = vec![out.detach()];
    for x in [&q, &k, &v] {
        let g = grads
            .get(x)
            .ok_or_else(|| candle_core::Error::Msg("missing gradient".into()))?;
        res.push(g.clone());
    }
    Ok(res)
}

#[test]
fn ops_attention_flash_matches_reference() -> Result<()> {
    // T = 1, T below / equal to / not a multiple of the block size (64); Dh 8..64.
    let shapes = [
        (1, 1, 1, 8),
        (2, 3, 70, 16),
        (1, 2, 129, 32),
        (1, 1, 64, 64),
        (2, 1, 200, 8),
        (1, 2, 5, 64),
    ];
    for (i, &(b, h, t, d)) in shapes.iter().enumerate() {
        for dtype in [DType::F32, DType::F64] {
            let seed = 100 * i as u64;
            // Scaled so that the softmax is far from uniform.
            let q = (uniform(&[b, h, t, d], seed, dtype)? * 3.0)?;
            let k = (uniform(&[b, h, t, d], seed + 1, dtype)? * 3.0)?;
            let v = uniform(&[b, h, t, d], seed + 2, dtype)?;
            let r = uniform(&[b, h, t, d], seed + 3, dtype)?;
            let flash = run(flash_attention, &q, &k, &v, &r)?;
            let reference = run(reference_attention, &q, &k, &v, &r)?;
            assert_eq!(flash[0].dims(), &[b, h, t, d]);
            for (what, (a, e)) in ["out", "dq", "dk", "dv"]
                .iter()
                .zip(flash.iter().zip(&reference))
            {
                let err = max_abs_diff(a, e)? / max_abs(e)?.max(1.0);
                assert!(
                    err < 1e-5,
                    "{what} {dtype:?} shape {:?}: error {err}",
                    (b, h, t, d)
                );
            }
        }
    }
    Ok(())
}

#[test]
fn ops_attention_non_contiguous_inputs() -> Result<()> {
    // Inputs produced by a transpose (as in the model) are accepted.
    let x = uniform(&[2, 33, 3, 16], 1, DType::F32)?;
    let q = x.transpose(1, 2)?;
    let k = (&q * 0.5)?;
    let v = q.sin()?;
    let a = flash_attention(&q, &k, &v, 0.25)?;
    let e = reference_attention(&q, &k, &v, 0.25)?;
    assert!(max_abs_diff(&a, &e)? < 1e-5);
    Ok(())
}

#[test]
fn ops_attention_rejects_bad_inputs() -> Result<()> {
    let q = uniform(&[1, 2, 8, 4], 1, DType::F32)?;
    let k = uniform(&[1, 2, 9, 4], 2, DType::F32)?;
    assert!(flash_attention(&q, &k, &k, 0.5).is_err());
    assert!(flash_attention(&q, &q, &q.to_dtype(DType::F64)?, 0.5).is_err());
    assert!(flash_attention(&q, &q, &q, f64::NAN).is_err());
    // 16-bit floats have no kernel: they are not refused but take the reference attention
    // (f32 scores and softmax), within f16's precision of the f32 result.
    let h = q.to_dtype(DType::F16)?;
    let out = flash_attention(&h, &h, &h, 0.5)?;
    assert_eq!(out.dtype(), DType::F16);
    assert!(max_abs_diff(&out, &flash_attention(&q, &q, &q, 0.5)?)? < 1e-2);
    Ok(())
}

#[test]
fn ops_attention_backward_split_over_key_blocks() -> Result<()> {
    // With fewer batch·head rows than threads the backward also splits key blocks over
    // workers; force that path with a 4-thread pool and one row.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    pool.install(|| -> Result<()> {
        for &(t, d) in &[(300, 16), (130, 8), (65, 32)] {
            let q = (uniform(&[1, 1, t, d], 1, DType::F64)? * 3.0)?;
            let k = (uniform(&[1, 1, t, d], 2, DType::F64)? * 3.0)?;
            let v = uniform(&[1, 1, t, d], 3, DType::F64)?;
            let r = uniform(&[1, 1, t, d], 4, DType::F64)?;
            let flash = run(flash_attention, &q, &k, &v, &r)?;
            let reference = run(reference_attention, &q, &k, &v, &r)?;
            for (a, e) in flash.iter().zip(&reference) {
                let err = max_abs_diff(a, e)?;
                assert!(err < 1e-10, "T {t} Dh {d}: error {err}");
            }
        }
        Ok(())
    })
}

/// The in-place backward (dq, dk, dv written over the packed q/k/v) equals the backward into a
/// new buffer, bitwise, for a few batch·head rows (key blocks split over workers) and many.
#[test]
fn ops_attention_backward_in_place_equals_out_of_place() -> Result<()> {
    use sepdist_model::ops::attention::{
        flash_attention_packed, flash_attention_packed_backward,
        flash_attention_packed_backward_in_place,
    };
    for (b, h, t, d) in [(1, 1, 300, 8), (2, 3, 37, 4), (4, 4, 70, 16)] {
        for dtype in [DType::F32, DType::F64] {
            let qkv = uniform(&[3, b, h, t, d], 21, dtype)?;
            let scale = (d as f64).powf(-0.5);
            let res = flash_attention_packed(&qkv, scale)?;
            let grad = uniform(res.dims(), 22, dtype)?;
            let out_of_place = flash_attention_packed_backward(&qkv, &res, &grad, scale)?;
            let in_place =
                flash_attention_packed_backward_in_place(qkv.copy()?, &res, &grad, scale)?;
            assert_eq!(in_place.dims(), out_of_place.dims());
            let a = out_of_place
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            let c = in_place
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            assert_eq!(a, c, "{b}×{h}×{t}×{d} {dtype:?}");
        }
    }
    // A view of the packed tensor (not contiguous) is refused, not overwritten.
    let qkv = uniform(&[3, 1, 2, 8, 4], 3, DType::F32)?;
    let res = flash_attention_packed(&qkv, 0.5)?;
    let strided = qkv.transpose(3, 4)?;
    assert!(flash_attention_packed_backward_in_place(strided, &res, &res, 0.5).is_err());
    Ok(())
}
