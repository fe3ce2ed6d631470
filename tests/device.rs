#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! `training.device` / `--device auto|cpu|cuda` through the real binary.
//!
//! Everywhere: `cuda` where no GPU opens (a CPU build, or a CUDA build on a machine without a
//! GPU, e.g. `launch/build-cuda.sh --stub-runtime test --release --features cuda --test
//! device`) is a usage error that says why, for train, bench, separate and eval; `auto` trains on
//! the CPU then, and says so. Where a GPU opens (a CUDA build on a GPU machine), the GPU tests
//! run: three optimizer steps on `cuda` give the CPU run's weights to 1e-4 relative, the metrics
//! carry the pool's figures, and bench and separate run there; elsewhere they print
//! "skipped: no CUDA device opens here".

mod common;
use common::{ok, rel_diff, sepdist, text, weights};

use std::path::{Path, PathBuf};
use std::process::Output;

const TINY: &str = "tests/fixtures/tiny.yaml";

/// What the binary says when `cuda` is asked for and no GPU opens.
const NO_GPU: &str = if cfg!(feature = "cuda") {
    "training.device: cuda, but no CUDA device opens"
} else {
    "training.device: cuda, but this build has no CUDA; build with launch/build-cuda.sh --release --features cuda"
};

fn data_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| common::tiny_dataset("device-tests"))
        .clone()
}

/// Whether GPU 0 opens in this build (never in a build without CUDA).
fn gpu_opens() -> bool {
    candle_core::Device::new_cuda(0).is_ok()
}

fn train(out: &Path, args: &[&str]) -> Output {
    sepdist()
        .args(["train", "--config", TINY])
        .arg("--set")
        .arg(format!("training.output_dir={}", out.display()))
        .arg("--set")
        .arg(format!("dataset.root={}", data_root().display()))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

/// Exit 2 with one `error:` line containing `fragment`, no panic, no backtrace.
fn usage_error(out: &Output, fragment: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("error: {fragment}")), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("stack backtrace"),
        "{err}"
    );
}

/// The `train` records of a run's metrics.
fn train_records(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "train")
        .collect()
}

#[test]
fn cuda_where_no_gpu_opens_is_a_usage_error_that_says_why() {
    if gpu_opens() {
        println!("skipped: a CUDA device opens here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // The option and the config key alike; nothing is written.
    usage_error(&train(&out, &["--device", "cuda"]), NO_GPU);
    usage_error(&train(&out, &["--set", "training.device=cuda"]), NO_GPU);
    assert!(!out.join("metrics.jsonl").exists());
    // The option wins over the config key (it is the last override).
    usage_error(
        &train(&out, &["--set", "training.device=cpu", "--device", "cuda"]),
        NO_GPU,
    );
    let bench = sepdist()
        .args([
            "bench", "--config", TINY, "--steps", "1", "--device", "cuda",
        ])
        .arg("--set")
        .arg(format!("dataset.root={}", data_root().display()))
        .output()
        .unwrap();
    usage_error(&bench, NO_GPU);
    // separate and eval choose the device before reading the checkpoint.
    let missing = dir.path().join("no-checkpoint");
    let separate = sepdist()
        .args(["separate", "--device", "cuda", "--checkpoint"])
        .arg(&missing)
        .arg(dir.path().join("song.wav"))
        .arg("-o")
        .arg(dir.path().join("sep"))
        .output()
        .unwrap();
    usage_error(&separate, NO_GPU);
    let eval = sepdist()
        .args(["eval", "--device", "cuda", "--checkpoint"])
        .arg(&missing)
        .output()
        .unwrap();
    usage_error(&eval, NO_GPU);
    if cfg!(feature = "cuda") {
        // The driver's reason follows, and CUDA_VISIBLE_DEVICES when it is set.
        let masked = sepdist()
            .args(["eval", "--device", "cuda", "--checkpoint"])
            .arg(&missing)
            .env("CUDA_VISIBLE_DEVICES", "")
            .output()
            .unwrap();
        usage_error(&masked, NO_GPU);
        assert!(
            text(&masked.stderr).contains("CUDA_VISIBLE_DEVICES=\"\""),
            "{}",
            text(&masked.stderr)
        );
    }
}

#[test]
fn bad_device_values_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = train(&out, &["--set", "training.device=gpu"]);
    let err = text(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(err.contains("--set training.device=gpu"), "{err}");
    assert!(
        err.contains("unknown variant `gpu`, expected one of `auto`, `cpu`, `cuda`"),
        "{err}"
    );
    let run = train(&out, &["--device", "gpu"]);
    let err = text(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(err.contains("invalid value 'gpu' for '--device"), "{err}");
    let run = train(
        &out,
        &["--set", "training.cuda_pool_release_threshold=lots"],
    );
    let err = text(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(
        err.contains("training.cuda_pool_release_threshold") && err.contains("or `max`"),
        "{err}"
    );
    // NCCL runs on GPUs: a CPU device with it is refused before anything starts.
    let run = train(
        &out,
        &["--set", "distributed.backend=nccl", "--device", "cpu"],
    );
    let err = text(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(
        err.contains("training.device: cpu, but distributed.backend: nccl runs on GPUs"),
        "{err}"
    );
}

#[test]
fn auto_trains_on_the_gpu_that_opens_else_on_the_cpu_and_says_which() {
    let gpu = gpu_opens();
    let dir = tempfile::tempdir().unwrap();
    let auto = dir.path().join("auto");
    let run = train(
        &auto,
        &["--device", "auto", "--set", "training.max_steps=2"],
    );
    ok(&run);
    let err = text(&run.stderr);
    let label = if gpu { "cuda:0" } else { "cpu" };
    assert!(
        err.contains(&format!("parameters on {label} for 2 optimizer steps")),
        "{err}"
    );
    // A CUDA build without a GPU says why it fell back.
    assert_eq!(
        err.contains("training.device: auto: no CUDA device opens"),
        cfg!(feature = "cuda") && !gpu,
        "{err}"
    );
    let records = train_records(&auto);
    assert_eq!(records.len(), 2);
    for r in &records {
        assert_eq!(r["device"], label, "{r}");
        assert!(r["mem_allocated"].as_u64().unwrap() > 0, "{r}");
    }
    if !gpu {
        // Where no GPU opens, auto is the CPU: the same weights bit for bit.
        let cpu = dir.path().join("cpu");
        ok(&train(
            &cpu,
            &["--device", "cpu", "--set", "training.max_steps=2"],
        ));
        let ckpt = |d: &Path| d.join("checkpoints/step_00000002");
        assert_eq!(weights(&ckpt(&auto)), weights(&ckpt(&cpu)));
    }
}

/// Float samples of a 32-bit float WAV (the `data` chunk).
fn wav_floats(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let at = bytes.windows(4).position(|w| w == b"data").unwrap();
    let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
    bytes[at + 8..at + 8 + len]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn cuda_training_equals_cpu_training() {
    if let Err(e) = candle_core::Device::new_cuda(0) {
        println!("skipped: no CUDA device opens here ({e})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let steps = ["--set", "training.max_steps=3"];
    let cpu = dir.path().join("cpu");
    let gpu = dir.path().join("gpu");
    ok(&train(&cpu, &[&steps[..], &["--device", "cpu"]].concat()));
    let run = train(&gpu, &[&steps[..], &["--device", "cuda"]].concat());
    ok(&run);
    assert!(
        text(&run.stderr).contains("parameters on cuda:0 for 3 optimizer steps"),
        "{}",
        text(&run.stderr)
    );
    let ckpt = |d: &Path| d.join("checkpoints/step_00000003");
    let (a, b) = (weights(&ckpt(&cpu)), weights(&ckpt(&gpu)));
    let diff = rel_diff(&a, &b);
    assert!(
        diff < 1e-4,
        "CUDA weights differ from the CPU's by {diff:e}"
    );
    // The progress figures and metrics are the GPU pool's: the model's tensors live there.
    for r in train_records(&gpu) {
        assert_eq!(r["device"], "cuda:0", "{r}");
        let used = r["mem_allocated"].as_u64().unwrap();
        let peak = r["mem_peak_allocated"].as_u64().unwrap();
        let reserved = r["mem_reserved"].as_u64().unwrap();
        let params = 4 * a.len() as u64;
        assert!(used >= params, "{r}");
        assert!(peak >= used && reserved >= used, "{r}");
    }

    // bench reports the pool's peaks.
    let bench = sepdist()
        .args(["bench", "--config", TINY, "--steps", "1", "--warmup", "0"])
        .args(["--device", "cuda", "--set"])
        .arg(format!("dataset.root={}", data_root().display()))
        .output()
        .unwrap();
    ok(&bench);
    let stdout = text(&bench.stdout);
    assert!(
        stdout.contains("on cuda:0") && stdout.contains("peak cuda:0"),
        "{stdout}"
    );

    // separate on the GPU writes what the CPU writes.
    let song = data_root().join("train/synth_000/mixture.wav");
    let mut outputs = Vec::new();
    for device in ["cpu", "cuda"] {
        let out = dir.path().join(format!("sep-{device}"));
        let run = sepdist()
            .args(["separate", "--device", device, "--checkpoint"])
            .arg(ckpt(&cpu))
            .arg(&song)
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        ok(&run);
        outputs.push(wav_floats(&out.join("mixture/vocals.wav")));
    }
    let diff = rel_diff(&outputs[0], &outputs[1]);
    assert!(
        diff < 1e-4,
        "separate on CUDA differs from the CPU by {diff:e}"
    );
}
