#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! Mixed precision in the engine (`training.precision: bf16`): one micro-batch's loss and flat
//! fp32 gradient in bf16 against fp32 on the same model and batch, the parameters' bf16 copy
//! of the fp32 master, and the equivalences of the bf16 path itself (checkpointed = kept,
//! parameters gathered per piece = held).

use candle_core::{DType, Device, Tensor};
use sepdist_config::ModelConfig;
use sepdist_model::loss::SeparationLoss;
use sepdist_model::{ModelError, Separator};
use sepdist_train::engine::{Engine, Piece, ShardedParams};

mod engine_util;
use engine_util::{SOURCES, grads, pseudo_audio, tiny_loss};

const N: usize = 640;

/// The engine tests' tiny model, twice as wide.
fn tiny_model() -> ModelConfig {
    ModelConfig {
        emb_dim: 16,
        ffn_hidden_dim: [32, 24],
        ..engine_util::tiny_model()
    }
}

fn engine(recompute: bool, dtype: DType) -> Engine {
    let sep = Separator::new(&tiny_model(), SOURCES).unwrap();
    let init = sep.init_params(7, &Device::Cpu, DType::F32).unwrap();
    let loss = SeparationLoss::new(&tiny_loss()).unwrap();
    let mut e = Engine::new(sep, loss, &init, recompute, Device::Cpu).unwrap();
    e.set_compute_dtype(dtype).unwrap();
    e
}

fn data(batch: usize, seed: u64) -> (Tensor, Tensor) {
    pseudo_audio(batch, seed, N)
}

/// `‖a − b‖ / ‖b‖`.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        d += (f64::from(*x) - f64::from(*y)).powi(2);
        n += f64::from(*y).powi(2);
    }
    (d / n.max(1e-300)).sqrt()
}

fn bf16_rounded(x: &[f32]) -> Vec<f32> {
    Tensor::from_slice(x, x.len(), &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::BF16))
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .unwrap()
}

/// The loss within 1e-2 relative and the flat gradient within 3e-2 relative L2 of fp32's.
/// bf16 rounds to 2⁻⁹ relative; the gradient of a weight passes through a few dozen
/// roundings (activations forward, their gradients backward, the parameters' copy) whose
/// errors add up mostly in quadrature, while its sums (matmuls, bias and norm-gain
/// reductions) accumulate in f32: a few 1e-3 per parameter is what remains, and 3e-2 leaves
/// room for the weakest of them without hiding a wrong path (a wrong dtype, a bf16-accumulated
/// sum or a missing cast is off by far more). Each parameter's gradient is checked within
/// 0.1 on its own.
#[test]
fn bf16_loss_and_gradient_match_fp32() {
    let (mix, target) = data(2, 1);
    let fp32 = engine(false, DType::F32);
    let bf16 = engine(false, DType::BF16);
    assert_eq!(bf16.compute_dtype(), DType::BF16);
    let (l32, g32) = grads(&fp32, &mix, &target);
    let (l16, g16) = grads(&bf16, &mix, &target);
    assert!(l16.is_finite() && g16.iter().all(|x| x.is_finite()));
    let loss_err = (l16 - l32).abs() / l32.abs();
    let grad_err = rel_l2(&g16, &g32);
    println!("loss {l16} (fp32 {l32}, relative {loss_err:e}), gradient relative L2 {grad_err:e}");
    assert!(loss_err <= 1e-2, "loss {l16} in bf16, {l32} in fp32");
    assert!(grad_err <= 3e-2, "gradient relative L2 {grad_err:e}");
    let layout = bf16.layout();
    let mut worst = (0f64, String::new());
    for (i, spec) in layout.specs.iter().enumerate() {
        let r = layout.range(i);
        let e = rel_l2(&g16[r.clone()], &g32[r]);
        if e > worst.0 {
            worst = (e, spec.name.clone());
        }
    }
    println!("worst parameter: {} at {:e}", worst.1, worst.0);
    assert!(worst.0 <= 0.1, "{}: relative L2 {:e}", worst.1, worst.0);
}

/// The engine's copy is the fp32 master rounded to bf16: at construction and after every
/// `load_flat`; `flat_params` reads it back as f32.
#[test]
fn bf16_parameters_are_the_rounded_fp32_master() {
    let master = engine(false, DType::F32).flat_params().unwrap();
    let e = engine(false, DType::BF16);
    assert_eq!(e.flat_params().unwrap(), bf16_rounded(&master));
    let moved: Vec<f32> = master.iter().map(|x| x * 1.001 + 1e-4).collect();
    e.load_flat(&moved).unwrap();
    assert_eq!(e.flat_params().unwrap(), bf16_rounded(&moved));
    assert_ne!(
        bf16_rounded(&moved),
        moved,
        "the test needs values bf16 rounds"
    );
    // Only f32 and bf16 are compute dtypes.
    let mut e = e;
    assert!(e.set_compute_dtype(DType::F64).is_err());
}

/// Checkpointing recomputes the same bf16 forward: identical loss and gradient.
#[test]
fn bf16_checkpointing_gives_identical_gradients() {
    let (mix, target) = data(2, 2);
    let (l0, g0) = grads(&engine(false, DType::BF16), &mix, &target);
    let (l1, g1) = grads(&engine(true, DType::BF16), &mix, &target);
    assert_eq!(l0, l1);
    assert_eq!(g0, g1);
}

/// Parameters gathered per piece from an fp32 vector and gradients handed back per piece
/// (ZeRO-3's path).
struct Gathered {
    params: Vec<f32>,
    grads: Vec<f32>,
    ranges: Vec<(Piece, Vec<std::ops::Range<usize>>)>,
}

impl Gathered {
    fn of(&self, piece: Piece) -> &[std::ops::Range<usize>] {
        &self.ranges.iter().find(|(p, _)| *p == piece).unwrap().1
    }
}

impl ShardedParams<ModelError> for Gathered {
    fn gather(&mut self, piece: Piece) -> Result<Vec<f32>, ModelError> {
        Ok(self
            .of(piece)
            .iter()
            .flat_map(|r| self.params[r.clone()].iter().copied())
            .collect())
    }

    fn reduce(&mut self, piece: Piece, grads: Vec<f32>) -> Result<(), ModelError> {
        let ranges = self.of(piece).to_vec();
        let mut at = 0;
        for r in ranges {
            for (acc, g) in self.grads[r.clone()].iter_mut().zip(&grads[at..]) {
                *acc += g;
            }
            at += r.len();
        }
        Ok(())
    }
}

/// In bf16 the pieces gathered from the fp32 master give the held copy's gradient exactly,
/// with and without checkpointing.
#[test]
fn bf16_gathered_parameters_give_the_held_gradient() {
    let (mix, target) = data(2, 3);
    for recompute in [false, true] {
        let held = engine(recompute, DType::BF16);
        let master = engine(recompute, DType::F32).flat_params().unwrap();
        let (l0, g0) = grads(&held, &mix, &target);
        let mut sharded = engine(recompute, DType::BF16);
        let ranges = sharded
            .pieces()
            .into_iter()
            .map(|p| {
                let rs = sharded
                    .piece_params(p)
                    .iter()
                    .map(|&i| sharded.layout().range(i))
                    .collect();
                (p, rs)
            })
            .collect();
        sharded.release_params();
        let mut access = Gathered {
            params: master,
            grads: vec![0.0; g0.len()],
            ranges,
        };
        let l1 = sharded
            .forward_backward_sharded::<ModelError, _>(&mix, &target, &mut access)
            .unwrap();
        assert_eq!(l0, l1.total, "recompute {recompute}");
        assert_eq!(g0, access.grads, "recompute {recompute}");
    }
}
