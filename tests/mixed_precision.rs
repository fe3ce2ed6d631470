#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! `training.precision: bf16` through the real binary on the tiny config: it trains (every
//! validation loss finite and lower than the last, within 1e-2 of the fp32 run's), says so on
//! the start line and in the metrics, writes fp32 checkpoints (the master weights) that an fp32
//! run resumes from and `separate` uses, and a resumed bf16 run ends bitwise where the
//! uninterrupted one does.

mod common;
use common::{ok, sepdist, text, weights};

use std::path::{Path, PathBuf};
use std::process::Output;

const TINY: &str = "tests/fixtures/tiny.yaml";
const BF16: &str = "training.precision=bf16";
const EIGHT_STEPS: [&str; 2] = ["training.max_steps=8", "training.epochs=2"];

fn data_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| common::tiny_dataset("mixed-precision-tests"))
        .clone()
}

/// `sepdist train` on the tiny config into `out`, with `--set` overrides, more arguments and
/// environment.
fn train(out: &Path, sets: &[&str], args: &[&str], env: &[(&str, &str)]) -> Output {
    common::train_on(TINY, &data_root(), out, sets, args, env)
}

fn records(out: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == kind)
        .collect()
}

fn validation_losses(out: &Path) -> Vec<f64> {
    records(out, "validation")
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect()
}

fn ckpt(out: &Path, step: u64) -> PathBuf {
    out.join("checkpoints").join(format!("step_{step:08}"))
}

/// Every tensor of a checkpoint's `model.safetensors` is F32.
fn all_f32(checkpoint: &Path) -> bool {
    let bytes = std::fs::read(checkpoint.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .iter()
        .all(|(_, t)| t.dtype() == safetensors::Dtype::F32)
}

#[test]
fn bf16_trains_writes_fp32_checkpoints_and_resumes_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("bf16");
    let sets = [BF16, EIGHT_STEPS[0], EIGHT_STEPS[1]];
    let run = train(&full, &sets, &[], &[]);
    ok(&run);
    let stderr = text(&run.stderr);
    assert!(
        stderr.contains("from step 0, precision bf16-mixed (fp32 master weights)"),
        "{stderr}"
    );

    // Validation (the same chunks every time) at steps 0, 4 and 8: finite and improving.
    let losses = validation_losses(&full);
    assert_eq!(losses.len(), 3, "{losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(
        losses.windows(2).all(|w| w[1] < w[0]),
        "validation losses do not decrease: {losses:?}"
    );
    let steps = records(&full, "train");
    assert_eq!(steps.len(), 8);
    for r in &steps {
        assert_eq!(r["precision"], "bf16", "{r}");
        assert!(r["loss"].as_f64().unwrap().is_finite(), "{r}");
    }

    // The same run in fp32 learns the same: every validation loss within 1e-2.
    let fp32 = dir.path().join("fp32");
    ok(&train(&fp32, &EIGHT_STEPS, &[], &[]));
    assert_eq!(records(&fp32, "train")[0]["precision"], "fp32");
    for (b, f) in losses.iter().zip(validation_losses(&fp32)) {
        assert!((b - f).abs() <= 1e-2 * f, "bf16 {losses:?}, fp32 {f}");
    }

    // Checkpoints hold the fp32 master, not its bf16 copy: F32 tensors, values bf16 cannot
    // represent.
    let last = ckpt(&full, 8);
    assert!(all_f32(&last));
    let w = weights(&last);
    assert!(w.iter().any(|x| x.to_bits() & 0xffff != 0));

    // Interrupted after step 3, resumed: the same weights at step 8, bitwise.
    let resumed = dir.path().join("resumed");
    let stopped = train(
        &resumed,
        &sets,
        &[],
        &[("SEPDIST_TEST_STOP_AFTER_STEPS", "3")],
    );
    assert_eq!(
        stopped.status.code(),
        Some(143),
        "{}",
        text(&stopped.stderr)
    );
    ok(&train(&resumed, &sets, &["--resume", "auto"], &[]));
    assert!(
        weights(&ckpt(&resumed, 8)) == w,
        "resumed bf16 weights differ"
    );

    // An fp32 run resumes from a bf16 checkpoint (the master weights and AdamW state).
    let switched = dir.path().join("switched");
    let from = ckpt(&full, 4);
    let out = train(
        &switched,
        &EIGHT_STEPS,
        &["--resume", from.to_str().unwrap()],
        &[],
    );
    ok(&out);
    assert!(
        text(&out.stderr).contains("resumed from"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(records(&switched, "train").len(), 4);
    assert!(all_f32(&ckpt(&switched, 8)));

    // `separate` runs the bf16-trained checkpoint (in fp32).
    let track = std::fs::read_dir(data_root().join("test"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let song = track.path().join("mixture.wav");
    let out_dir = dir.path().join("separated");
    let out = sepdist()
        .args(["separate", "--checkpoint"])
        .arg(&last)
        .arg(&song)
        .arg("-o")
        .arg(&out_dir)
        .output()
        .unwrap();
    ok(&out);
    for source in ["drums", "bass", "other", "vocals"] {
        assert!(
            out_dir
                .join("mixture")
                .join(format!("{source}.wav"))
                .is_file()
        );
    }
}

/// `sepdist bench` honours the precision.
#[test]
fn bench_runs_in_bf16() {
    let out = sepdist()
        .args(["bench", "--config", TINY, "--steps", "2", "--warmup", "1"])
        .args(["--set", BF16])
        .arg("--set")
        .arg(format!("dataset.root={}", data_root().display()))
        .output()
        .unwrap();
    ok(&out);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("on cpu in bf16,"), "{stdout}");
}
