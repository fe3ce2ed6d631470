#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! Data parallelism with in-process ranks (the Threads backend): N ranks equal one rank on
//! the same global batch for ZeRO 0, 1 and 2; one reduction per bucket per optimizer step;
//! checkpoints resume on another world size and stage. The same runs under `mpirun` with real
//! processes are in the root `tests/mpi.rs`.

use sepdist_comm::{CollectiveKind, Communicator, Local, Threads};
use sepdist_config::{Config, ConfigSource, load_str};
use sepdist_train::memory::NoHeapCounter;
use sepdist_train::{Outcome, TestHooks, TrainRequest, train};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

const TINY: &str = "
dataset:
  format: wav
  sample_rate: 8000
  segment_length: 2048
  samples_per_epoch: 64
  validation_tracks: [synth_000]
  num_workers: 1
  prefetch: 2
model:
  n_fft: 256
  hop_length: 64
  bands: [4, 4, 4, 4, 4, 4, 4, 4, 8, 8, 8, 8, 16, 16, 33]
  n_layers: 1
  emb_dim: 16
  n_heads: 2
  ffn_hidden_dim: [32, 32]
  mask_hidden_dim: 32
training:
  epochs: 1
  optimizer: {lr: 1.0e-3}
  lr_schedule: {warmup_steps: 2, decay: cosine}
  max_steps: 5
  checkpoint_every: 0
  loss:
    multi_stft_resolutions_window_sizes: [256, 128]
    multi_stft_hop_size: 64
    multi_stft_min_n_fft: 128
distributed:
  bucket_size_mb: 0.02
";

static HEAP: NoHeapCounter = NoHeapCounter;

fn data_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sepdist-dist-tests-{}", std::process::id()));
        let sources: Vec<String> = ["drums", "bass", "other", "vocals"]
            .map(String::from)
            .to_vec();
        sepdist_data::generate(&dir, 4, 1.0, 5, 8000, &sources).unwrap();
        dir
    })
    .clone()
}

fn config(out: &Path, sets: &[String]) -> Config {
    let mut all = vec![
        format!("dataset.root={}", data_root().display()),
        format!("training.output_dir={}", out.display()),
    ];
    all.extend(sets.iter().cloned());
    load_str(
        ConfigSource {
            name: Path::new("tiny"),
            text: TINY,
        },
        &all,
    )
    .unwrap()
}

fn request(cfg: Config, resume: Option<&str>) -> TrainRequest {
    TrainRequest {
        config: cfg,
        resume: resume.map(String::from),
        init_from: None,
        heap: &HEAP,
        stop: Arc::new(AtomicUsize::new(0)),
        terminal: false,
        hooks: TestHooks::default(),
        memory_report: false,
        force: false,
    }
}

/// Trains on `world` in-process ranks; returns rank 0's outcome and every rank's
/// collective counts.
fn run(world: usize, cfg: Config, resume: Option<&str>) -> (Outcome, Vec<sepdist_comm::CommStats>) {
    if world == 1 {
        let comm = Local::new(Duration::from_secs(60));
        let out = train(request(cfg, resume), &comm).unwrap();
        return (out, vec![comm.stats()]);
    }
    let comms = Threads::new(world, Duration::from_secs(60));
    let handles: Vec<_> = comms
        .into_iter()
        .map(|comm| {
            let cfg = cfg.clone();
            let resume = resume.map(String::from);
            std::thread::spawn(move || {
                let out = train(request(cfg, resume.as_deref()), &comm).unwrap();
                (out, comm.stats())
            })
        })
        .collect();
    let mut results: Vec<(Outcome, sepdist_comm::CommStats)> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    let stats = results.iter().map(|r| r.1).collect();
    (results.swap_remove(0).0, stats)
}

fn weights(dir: &Path) -> Vec<f32> {
    let loaded = sepdist_train::checkpoint::load(dir, None).unwrap();
    loaded
        .weights
        .into_iter()
        .flat_map(|(_, t)| t.data)
        .collect()
}

fn final_dir(outcome: &Outcome) -> PathBuf {
    match outcome {
        Outcome::Finished { checkpoint, .. } => checkpoint.clone(),
        other => panic!("unexpected {other:?}"),
    }
}

/// `‖a − b‖ / ‖a‖` (see tests/train.rs at the root for why not element-wise after AdamW).
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let norm: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
    (diff / norm).sqrt()
}

fn sets(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn world_sizes_1_2_4_equal_on_the_same_global_batch_for_zero_0_1_2() {
    let dir = tempfile::tempdir().unwrap();
    let base = {
        let cfg = config(
            &dir.path().join("w1"),
            &sets(&[
                "training.batch_size=4",
                "training.gradient_accumulation_steps=1",
            ]),
        );
        weights(&final_dir(&run(1, cfg, None).0))
    };
    for zero in [0, 1, 2] {
        for (world, batch, accumulation) in [(2, 1, 2), (4, 1, 1), (2, 2, 1)] {
            let out = dir.path().join(format!("z{zero}w{world}b{batch}"));
            let cfg = config(
                &out,
                &sets(&[
                    &format!("training.batch_size={batch}"),
                    &format!("training.gradient_accumulation_steps={accumulation}"),
                    &format!("distributed.zero_stage={zero}"),
                ]),
            );
            let got = weights(&final_dir(&run(world, cfg, None).0));
            let d = rel_diff(&base, &got);
            assert!(
                d <= 1e-5,
                "ZeRO {zero}, {world} ranks × {batch} × {accumulation}: relative difference {d}"
            );
        }
    }
}

#[test]
fn one_reduction_per_bucket_per_step_and_none_inside_the_window() {
    let dir = tempfile::tempdir().unwrap();
    for accumulation in [1, 3] {
        let cfg = config(
            &dir.path().join(format!("a{accumulation}")),
            &sets(&[
                "training.batch_size=1",
                &format!("training.gradient_accumulation_steps={accumulation}"),
                "training.max_steps=3",
            ]),
        );
        // The bucket count of this model at distributed.bucket_size_mb.
        let engine_buckets = {
            let sep = sepdist_model::Separator::new(&cfg.model, 4).unwrap();
            let layout = sepdist_train::engine::FlatLayout::new(sep.param_specs());
            let blocks: Vec<Vec<usize>> = sep
                .blocks()
                .iter()
                .map(|b| {
                    b.param_specs()
                        .iter()
                        .map(|s| layout.specs.iter().position(|x| x.name == s.name).unwrap())
                        .collect()
                })
                .collect();
            sepdist_train::buckets::BucketPlan::new(&layout, &blocks, 20_000)
                .buckets
                .len() as u64
        };
        assert!(engine_buckets > 3, "the test needs several buckets");
        let (_, stats) = run(2, cfg, None);
        for s in stats {
            assert_eq!(
                s.get(CollectiveKind::AllReduceF32).calls,
                3 * engine_buckets,
                "accumulation {accumulation}: fp32 all-reduces"
            );
        }
    }
}

#[test]
fn checkpoints_reshard_across_world_sizes_and_zero_stages() {
    let dir = tempfile::tempdir().unwrap();
    // (first world, first stage, second world, second stage)
    for (w1, z1, w2, z2) in [(4, 1, 2, 1), (2, 2, 4, 2), (2, 2, 1, 0)] {
        let whole_out = dir.path().join(format!("whole{w1}{z1}{w2}{z2}"));
        let whole = {
            let cfg = config(
                &whole_out,
                &sets(&[
                    "training.batch_size=1",
                    &format!("training.gradient_accumulation_steps={}", 4 / w1),
                    &format!("distributed.zero_stage={z1}"),
                    "training.max_steps=6",
                ]),
            );
            weights(&final_dir(&run(w1, cfg, None).0))
        };
        let out = dir.path().join(format!("split{w1}{z1}{w2}{z2}"));
        let first = config(
            &out,
            &sets(&[
                "training.batch_size=1",
                &format!("training.gradient_accumulation_steps={}", 4 / w1),
                &format!("distributed.zero_stage={z1}"),
                "training.max_steps=6",
                "training.checkpoint_every=3",
            ]),
        );
        // Stop after step 3 as a signal would, on every rank.
        let req_hooks = TestHooks {
            stop_after_steps: Some(3),
            ..TestHooks::default()
        };
        let comms = Threads::new(w1, Duration::from_secs(60));
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let cfg = first.clone();
                let hooks = req_hooks.clone();
                std::thread::spawn(move || {
                    let mut req = request(cfg, None);
                    req.hooks = hooks;
                    train(req, &comm).unwrap()
                })
            })
            .collect();
        for h in handles {
            assert!(matches!(
                h.join().unwrap(),
                Outcome::Interrupted { step: 3, .. }
            ));
        }
        let second = config(
            &out,
            &sets(&[
                "training.batch_size=1",
                &format!("training.gradient_accumulation_steps={}", 4 / w2),
                &format!("distributed.zero_stage={z2}"),
                "training.max_steps=6",
            ]),
        );
        let resumed = weights(&final_dir(&run(w2, second, Some("auto")).0));
        let d = rel_diff(&whole, &resumed);
        assert!(
            d <= 1e-5,
            "{w1} ranks ZeRO {z1} → {w2} ranks ZeRO {z2}: relative difference {d}"
        );
    }
}

/// ZeRO-3: parameters live as shards, gathered per block (per source for the head) and the
/// gradients reduce-scattered per micro-batch. After 5 steps it equals stage 0 on one rank,
/// with and without activation checkpointing, with accumulation, on 1, 2 and 4 ranks.
#[test]
fn zero_3_on_1_2_4_ranks_equals_stage_0() {
    let dir = tempfile::tempdir().unwrap();
    for ckpt in [false, true] {
        let base = {
            let cfg = config(
                &dir.path().join(format!("base{ckpt}")),
                &sets(&[
                    "training.batch_size=4",
                    "training.gradient_accumulation_steps=1",
                    &format!("training.gradient_checkpointing={ckpt}"),
                ]),
            );
            weights(&final_dir(&run(1, cfg, None).0))
        };
        for (world, batch, accumulation) in [(1, 2, 2), (2, 1, 2), (4, 1, 1)] {
            let out = dir.path().join(format!("z3w{world}c{ckpt}"));
            let cfg = config(
                &out,
                &sets(&[
                    &format!("training.batch_size={batch}"),
                    &format!("training.gradient_accumulation_steps={accumulation}"),
                    &format!("training.gradient_checkpointing={ckpt}"),
                    "distributed.zero_stage=3",
                ]),
            );
            let pieces = {
                let sep = sepdist_model::Separator::new(&cfg.model, 4).unwrap();
                (sep.blocks().len() - 1 + 4) as u64
            };
            let (outcome, stats) = run(world, cfg, None);
            let got = weights(&final_dir(&outcome));
            let d = rel_diff(&base, &got);
            assert!(
                d <= 1e-5,
                "ZeRO 3, {world} ranks × {batch} × {accumulation}, checkpointing {ckpt}: relative difference {d}"
            );
            if world > 1 {
                // Per micro-batch: one reduce-scatter per piece, at least one gather per piece
                // (two for recomputed blocks); no whole-gradient all-reduce.
                let micro_batches = 5 * accumulation as u64;
                for s in stats {
                    assert_eq!(
                        s.get(CollectiveKind::ReduceScatter).calls,
                        pieces * micro_batches
                    );
                    assert!(s.get(CollectiveKind::AllGather).calls >= pieces * micro_batches);
                    assert_eq!(s.get(CollectiveKind::AllReduceF32).calls, 0);
                }
            }
        }
    }
}

/// A ZeRO-3 checkpoint resumes at stage 0 and on another world size at stage 3, and a
/// stage-2 one at stage 3: the shards are the same split of the same flat vector.
#[test]
fn zero_3_checkpoints_reshard_to_other_stages_and_world_sizes() {
    let dir = tempfile::tempdir().unwrap();
    for (w1, z1, w2, z2) in [(2, 3, 1, 0), (4, 3, 2, 3), (2, 2, 4, 3)] {
        let common = |w: usize, z: usize| {
            vec![
                "training.batch_size=1".to_string(),
                format!("training.gradient_accumulation_steps={}", 4 / w),
                format!("distributed.zero_stage={z}"),
                "training.max_steps=6".to_string(),
                "training.ema={momentum: 0.9}".to_string(),
            ]
        };
        let whole_out = dir.path().join(format!("whole{w1}{z1}{w2}{z2}"));
        let whole = weights(&final_dir(
            &run(w1, config(&whole_out, &common(w1, z1)), None).0,
        ));
        let out = dir.path().join(format!("split{w1}{z1}{w2}{z2}"));
        let mut first = common(w1, z1);
        first.push("training.checkpoint_every=3".into());
        let hooks = TestHooks {
            stop_after_steps: Some(3),
            ..TestHooks::default()
        };
        let comms = Threads::new(w1, Duration::from_secs(60));
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let cfg = config(&out, &first);
                let hooks = hooks.clone();
                std::thread::spawn(move || {
                    let mut req = request(cfg, None);
                    req.hooks = hooks;
                    train(req, &comm).unwrap()
                })
            })
            .collect();
        for h in handles {
            assert!(matches!(
                h.join().unwrap(),
                Outcome::Interrupted { step: 3, .. }
            ));
        }
        let resumed = weights(&final_dir(
            &run(w2, config(&out, &common(w2, z2)), Some("auto")).0,
        ));
        let d = rel_diff(&whole, &resumed);
        assert!(
            d <= 1e-5,
            "{w1} ranks ZeRO {z1} → {w2} ranks ZeRO {z2}: relative difference {d}"
        );
    }
}
