#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! A CUDA out-of-memory error of one rank's op, on CPUs: the trainer's fault hook makes an op of
//! a chosen step on one of two in-process ranks (the Threads backend) return the error candle
//! returns for `CUDA_ERROR_OUT_OF_MEMORY`. Both ranks stop at that step's boundary with the
//! diagnosis and [`TrainError::OutOfMemory`], the last checkpoint loads; with
//! `training.on_oom: refit` training goes on and ends where a run started with the fitted
//! setting ends. The failing rank must still take part in every collective the other rank is
//! in (buckets, ZeRO-2's reduce-scatter, ZeRO-3's gathers and reduces): the Threads backend
//! reports any collective issued out of order.

use sepdist_comm::Threads;
use sepdist_config::{Config, ConfigSource, load_str};
use sepdist_train::memory::NoHeapCounter;
use sepdist_train::trainer::{FaultHook, FaultPoint, FaultSite};
use sepdist_train::{Outcome, TestHooks, TrainError, TrainRequest, train};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const TINY: &str = "
dataset:
  format: wav
  sample_rate: 8000
  segment_length: 2048
  samples_per_epoch: 16
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
  batch_size: 2
  gradient_accumulation_steps: 1
  epochs: 1
  optimizer: {lr: 1.0e-3}
  lr_schedule: {warmup_steps: 2, decay: cosine}
  max_steps: 4
  checkpoint_every: 1
  keep_last: 10
  loss:
    multi_stft_resolutions_window_sizes: [256, 128]
    multi_stft_hop_size: 64
    multi_stft_min_n_fft: 128
distributed:
  bucket_size_mb: 0.02
";

/// The engine's blocks of TINY: band_split, layers.0.time, layers.0.band, head.
const TIME: usize = 1;

static HEAP: NoHeapCounter = NoHeapCounter;

fn data_root() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sepdist-cuda-oom-{}", std::process::id()));
        let sources: Vec<String> = ["drums", "bass", "other", "vocals"]
            .map(String::from)
            .to_vec();
        sepdist_data::generate(&dir, 4, 1.0, 5, 8000, &sources).unwrap();
        dir
    })
    .clone()
}

fn config(out: &Path, sets: &[&str]) -> Config {
    let mut all = vec![
        format!("dataset.root={}", data_root().display()),
        format!("training.output_dir={}", out.display()),
    ];
    all.extend(sets.iter().map(|s| s.to_string()));
    load_str(
        ConfigSource {
            name: Path::new("tiny"),
            text: TINY,
        },
        &all,
    )
    .unwrap()
}

/// cudarc's `DriverError` as it prints (its `Display` is its `Debug`); the type exists only in
/// CUDA builds.
#[derive(Debug)]
#[allow(dead_code, non_camel_case_types, clippy::upper_case_acronyms)] // read through `Debug`
enum Code {
    CUDA_ERROR_OUT_OF_MEMORY,
}

#[derive(Debug)]
#[allow(dead_code)] // read through `Debug`
struct DriverError(Code, &'static str);

impl std::fmt::Display for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::error::Error for DriverError {}

/// What a candle op returns when the device has no memory left (`.w()` on cudarc's error).
fn cuda_out_of_memory() -> candle_core::Error {
    candle_core::Error::Cuda(Box::new(DriverError(
        Code::CUDA_ERROR_OUT_OF_MEMORY,
        "out of memory",
    )))
    .bt()
}

/// A hook that fails the op at `at` once.
fn fail_once(at: FaultPoint) -> FaultHook {
    let fired = AtomicBool::new(false);
    FaultHook(Arc::new(move |p: &FaultPoint| {
        if *p == at && !fired.swap(true, Ordering::SeqCst) {
            return Err(cuda_out_of_memory());
        }
        Ok(())
    }))
}

/// Both ranks' results, rank 0 first.
fn run2(
    cfg: &Config,
    resume: Option<&str>,
    fault: Option<FaultHook>,
) -> Vec<Result<Outcome, TrainError>> {
    let handles: Vec<_> = Threads::new(2, Duration::from_secs(60))
        .into_iter()
        .map(|comm| {
            let (cfg, fault) = (cfg.clone(), fault.clone());
            let resume = resume.map(String::from);
            std::thread::spawn(move || {
                let req = TrainRequest {
                    config: cfg,
                    resume,
                    init_from: None,
                    heap: &HEAP,
                    stop: Arc::new(AtomicUsize::new(0)),
                    terminal: false,
                    hooks: TestHooks {
                        fault,
                        ..TestHooks::default()
                    },
                    memory_report: false,
                    force: false,
                };
                train(req, &comm)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The message of the [`TrainError::OutOfMemory`] every rank returned.
fn stopped(results: Vec<Result<Outcome, TrainError>>) -> String {
    let messages: Vec<String> = results
        .into_iter()
        .map(|r| match r {
            Err(TrainError::OutOfMemory(m)) => m,
            other => panic!("expected an out-of-memory stop, got {other:?}"),
        })
        .collect();
    assert_eq!(messages[0], messages[1], "the ranks decided differently");
    messages[0].clone()
}

fn finished(results: Vec<Result<Outcome, TrainError>>) -> PathBuf {
    let mut dirs = results.into_iter().map(|r| match r {
        Ok(Outcome::Finished {
            steps: 4,
            checkpoint,
        }) => checkpoint,
        other => panic!("expected 4 steps finished, got {other:?}"),
    });
    let dir = dirs.next().unwrap();
    assert!(dirs.all(|d| d == dir));
    dir
}

fn records(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `kind: out_of_memory` record (rank 0 writes the metrics).
fn failure(out: &Path) -> serde_json::Value {
    let all = records(out);
    let found: Vec<&serde_json::Value> = all
        .iter()
        .filter(|r| r["kind"] == "out_of_memory")
        .collect();
    assert_eq!(found.len(), 1, "{all:?}");
    found[0].clone()
}

fn weights(dir: &Path) -> Vec<f32> {
    sepdist_train::checkpoint::load(dir, None)
        .unwrap()
        .weights
        .into_iter()
        .flat_map(|(_, t)| t.data)
        .collect()
}

/// `‖a − b‖ / ‖a‖`.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let norm: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
    (diff / norm).sqrt()
}

/// The `--set` overrides of the diagnosis's fitted setting (the line after "fitted setting").
fn fitted_overrides(diagnosis: &str) -> Vec<String> {
    let mut lines = diagnosis
        .lines()
        .skip_while(|l| !l.starts_with("fitted setting"));
    assert!(lines.next().is_some(), "no fitted setting in:\n{diagnosis}");
    let line = lines.next().unwrap().trim();
    assert!(line.starts_with("--set "), "{line}");
    line.split("--set ")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Final weights of two ranks started with `overrides`, once per set of overrides.
fn fitted_reference(overrides: &[String]) -> Vec<f32> {
    type Runs = Mutex<Vec<(Vec<String>, Vec<f32>)>>;
    static RUNS: OnceLock<Runs> = OnceLock::new();
    let mut runs = RUNS.get_or_init(Default::default).lock().unwrap();
    if let Some((_, w)) = runs.iter().find(|(o, _)| o == overrides) {
        return w.clone();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut sets = vec!["training.checkpoint_every=0"];
    sets.extend(overrides.iter().map(String::as_str));
    let w = weights(&finished(run2(&config(dir.path(), &sets), None, None)));
    runs.push((overrides.to_vec(), w.clone()));
    w
}

fn at(step: u64, rank: usize, site: FaultSite) -> FaultPoint {
    FaultPoint { step, rank, site }
}

#[test]
fn an_out_of_memory_on_one_rank_stops_both_at_the_step_boundary_and_the_last_checkpoint_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cfg = config(&out, &[]);
    let fault = fail_once(at(
        2,
        1,
        FaultSite::Backward {
            micro: 0,
            block: TIME,
        },
    ));
    let message = stopped(run2(&cfg, None, Some(fault)));
    for part in [
        "out of memory: optimizer step 3 ran out of CUDA memory on rank(s) 1",
        "(rank 1: backward of layers.0.time (micro-batch 1 of 1): ",
        r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#,
        "stopped without a checkpoint of the failed step",
    ] {
        assert!(message.contains(part), "`{part}` missing in: {message}");
    }
    // candle's backtrace is not part of it.
    assert!(!message.contains("stack backtrace") && message.lines().count() == 1);

    let record = failure(&out);
    assert_eq!(record["step"], 3);
    assert_eq!(record["ranks"], serde_json::json!([1]));
    assert_eq!(record["cuda_ranks"], serde_json::json!([1]));
    assert!(record["refit"].is_null());
    let diagnosis = record["diagnosis"].as_str().unwrap();
    for part in [
        "rank 1: optimizer step 3 ran out of CUDA memory in the backward of layers.0.time (micro-batch 1 of 1): DriverError(CUDA_ERROR_OUT_OF_MEMORY",
        "  at the failure: allocated ",
        "  the rank could use ",
        "  phase peaks so far: ",
        "  optimizer step 3 measured (",
        "activations kept",
        "predicted peak in the",
        "the step is discarded on every rank: weights and optimizer state are those after step 2; the last checkpoint is ",
        "fitted setting for ",
        "with the same effective batch 4, the plan scaled by ",
        "× (more than ",
        "stopping (training.on_oom: stop)",
    ] {
        assert!(
            diagnosis.contains(part),
            "`{part}` missing in:\n{diagnosis}"
        );
    }
    // Rank 0 did not fail: only rank 1's part.
    assert!(!diagnosis.contains("rank 0: "), "{diagnosis}");
    // The stop suggests any setting (the ZeRO stage too); a refit keeps the stage.
    assert!(!fitted_overrides(diagnosis).is_empty());

    // Nothing of step 3 was written; the last checkpoint is step 2's and it loads.
    let ckpts = out.join("checkpoints");
    assert!(!ckpts.join("step_00000003").exists());
    assert_eq!(
        std::fs::read_to_string(ckpts.join("latest"))
            .unwrap()
            .trim(),
        "step_00000002"
    );
    let loaded = sepdist_train::checkpoint::load(&ckpts.join("step_00000002"), None).unwrap();
    assert_eq!(loaded.meta.step, 2);
    let trained: Vec<u64> = records(&out)
        .iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(trained, [1, 2]);
    // The run resumes from it and finishes.
    finished(run2(&cfg, Some("auto"), None));
}

/// The other collectives the failing rank must still take part in: ZeRO-2's reduce-scatter
/// after a failure before the backward; ZeRO-3's exchanges after a failure in the middle of
/// the backward of the first of two micro-batches (the rest of that one, all of the second);
/// the buckets of the last micro-batch after a failure in the first, on rank 0.
#[test]
fn the_failing_rank_takes_part_in_the_rest_of_the_step_s_collectives() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], FaultPoint, &str); 4] = [
        (
            &["distributed.zero_stage=2"],
            at(1, 1, FaultSite::Batch { micro: 0 }),
            "rank 1: data phase",
        ),
        (
            &[
                "distributed.zero_stage=3",
                "training.batch_size=1",
                "training.gradient_accumulation_steps=2",
            ],
            at(
                1,
                1,
                FaultSite::Backward {
                    micro: 0,
                    block: TIME,
                },
            ),
            "rank 1: backward of layers.0.time (micro-batch 1 of 2)",
        ),
        (
            &[
                "distributed.zero_stage=3",
                "training.gradient_checkpointing=true",
            ],
            at(0, 0, FaultSite::Backward { micro: 0, block: 2 }),
            "rank 0: backward of layers.0.band (micro-batch 1 of 1)",
        ),
        (
            &[
                "training.batch_size=1",
                "training.gradient_accumulation_steps=2",
            ],
            at(0, 0, FaultSite::Backward { micro: 0, block: 0 }),
            "rank 0: backward of band_split (micro-batch 1 of 2)",
        ),
    ];
    for (i, (sets, point, expected)) in cases.into_iter().enumerate() {
        let out = dir.path().join(i.to_string());
        let message = stopped(run2(&config(&out, sets), None, Some(fail_once(point))));
        assert!(
            message.contains(&format!(
                "optimizer step {} ran out of CUDA memory on rank(s) {} ({expected}",
                point.step + 1,
                point.rank
            )),
            "{sets:?}: {message}"
        );
        assert_eq!(failure(&out)["step"], point.step + 1);
    }
}

/// A failure after the step's decision, in the refresh of the engine's parameters from the
/// update: the update is applied on every rank (the checkpoint written after it is that of a
/// run without the failure), the next step is discarded.
#[test]
fn a_failure_refreshing_the_parameters_applies_the_update_and_discards_the_next_step() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean");
    finished(run2(&config(&clean, &[]), None, None));
    let out = dir.path().join("out");
    let fault = fail_once(at(1, 1, FaultSite::Optimizer));
    let message = stopped(run2(&config(&out, &[]), None, Some(fault)));
    assert!(
        message.contains(
            "optimizer step 3 ran out of CUDA memory on rank(s) 1 (rank 1: optimizer phase: "
        ),
        "{message}"
    );
    let diagnosis = failure(&out)["diagnosis"].as_str().unwrap().to_string();
    assert!(
        diagnosis.contains(
            "rank 1: ran out of CUDA memory refreshing the device's parameters after the update of optimizer step 2 (applied on every rank; the host's weights are whole), in the optimizer phase: "
        ),
        "{diagnosis}"
    );
    assert!(diagnosis.contains("weights and optimizer state are those after step 2"));
    let name = "checkpoints/step_00000002";
    assert_eq!(weights(&out.join(name)), weights(&clean.join(name)));
    assert!(!out.join("checkpoints/step_00000003").exists());
}

/// `training.on_oom: refit` after a failure in the backward of step 2, and after one in the
/// refresh after step 1's update (step 2 discarded; rank 1's engine reloads its parameters when
/// step 2 is redone): both go on with the fitted setting from step 2 and end where a run started
/// with that setting ends (steps 2 to 4 with the same examples).
#[test]
fn with_refit_training_continues_like_a_run_started_with_the_fitted_setting() {
    let dir = tempfile::tempdir().unwrap();
    for (name, point) in [
        (
            "backward",
            at(
                1,
                1,
                FaultSite::Backward {
                    micro: 0,
                    block: TIME,
                },
            ),
        ),
        ("refresh", at(0, 1, FaultSite::Optimizer)),
    ] {
        let out = dir.path().join(name);
        let cfg = config(
            &out,
            &["training.on_oom=refit", "training.checkpoint_every=0"],
        );
        let last = finished(run2(&cfg, None, Some(fail_once(point))));
        let record = failure(&out);
        assert_eq!(record["step"], 2, "{name}");
        let diagnosis = record["diagnosis"].as_str().unwrap();
        assert!(
            diagnosis.contains("training.on_oom: refit: redoing step 2 with "),
            "{name}: {diagnosis}"
        );
        let fitted: Vec<String> = record["refit"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(fitted, fitted_overrides(diagnosis), "{name}");
        let trained: Vec<u64> = records(&out)
            .iter()
            .filter(|r| r["kind"] == "train")
            .map(|r| r["step"].as_u64().unwrap())
            .collect();
        assert_eq!(trained, [1, 2, 3, 4], "{name}");
        let d = rel_diff(&fitted_reference(&fitted), &weights(&last));
        eprintln!("{name}: refit vs started with {fitted:?}: relative difference {d:.2e}");
        assert!(d <= 1e-5, "{name}: refit vs started with {fitted:?}: {d}");
    }
}
