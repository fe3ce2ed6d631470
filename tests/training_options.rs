#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! What MSST and demucs users configure, through the real binary on the tiny config: the EMA of
//! the weights, reduce-on-plateau, the loss choice, fine-tuning to another set of sources, and
//! `sepdist export`.

mod common;
use common::{ok, sepdist, text, weights};

use std::path::{Path, PathBuf};
use std::process::Output;

const TINY: &str = "tests/fixtures/tiny.yaml";

fn data_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| common::tiny_dataset("training-options-tests"))
        .clone()
}

/// `sepdist train` on the tiny config into `out`, with `--set` overrides and environment.
fn train(out: &Path, sets: &[&str], env: &[(&str, &str)]) -> Output {
    train_with(out, sets, &[], env)
}

/// [`train`] with more arguments (`--resume auto`, `--init-from DIR`).
fn train_with(out: &Path, sets: &[&str], args: &[&str], env: &[(&str, &str)]) -> Output {
    common::train_on(TINY, &data_root(), out, sets, args, env)
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The EMA of a single-rank checkpoint (its one optimizer shard), in flat (name) order.
fn ema(checkpoint: &Path) -> Vec<f32> {
    let bytes = std::fs::read(checkpoint.join("optimizer-00000.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    f32s(st.tensor("ema").unwrap().data())
}

fn ckpt(out: &Path, step: u64) -> PathBuf {
    out.join("checkpoints").join(format!("step_{step:08}"))
}

fn records(out: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == kind)
        .collect()
}

const EMA: &str = "training.ema={momentum: 0.9, every: 2}";
const SIX_STEPS: [&str; 2] = ["training.max_steps=6", "training.epochs=2"];

/// `ema_k = 0.9·ema_(k−1) + 0.1·w_k` after every second update, in f32 in that order, from
/// the weights of every step's checkpoint: bitwise. Resumed at step 3, the EMA at step 6 is
/// bitwise the uninterrupted one.
#[test]
fn ema_follows_the_hand_computed_average_and_survives_resume_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full");
    let sets = [EMA, SIX_STEPS[0], SIX_STEPS[1]];
    ok(&train(&full, &sets, &[]));
    let (m, rest) = (0.9f32, (1.0f64 - 0.9) as f32);
    let mut reference = ema(&ckpt(&full, 1));
    // Step 1 is not a multiple of `every`: the average is still the initial weights, which
    // differ from the weights after one update.
    assert_ne!(reference, weights(&ckpt(&full, 1)));
    for step in 2..=6 {
        if step % 2 == 0 {
            let w = weights(&ckpt(&full, step));
            for (e, w) in reference.iter_mut().zip(&w) {
                *e = m * *e + rest * *w;
            }
        }
        assert!(
            ema(&ckpt(&full, step)) == reference,
            "EMA differs at step {step}"
        );
    }

    let resumed = dir.path().join("resumed");
    let stopped = train(&resumed, &sets, &[("SEPDIST_TEST_STOP_AFTER_STEPS", "3")]);
    assert_eq!(
        stopped.status.code(),
        Some(143),
        "{}",
        text(&stopped.stderr)
    );
    ok(&train_with(&resumed, &sets, &["--resume", "auto"], &[]));
    assert!(
        ema(&ckpt(&resumed, 6)) == ema(&ckpt(&full, 6)),
        "resumed EMA differs"
    );
    assert!(
        weights(&ckpt(&resumed, 6)) == weights(&ckpt(&full, 6)),
        "resumed weights differ"
    );
}

/// Patience 1 and an unreachable threshold: the first validation sets the best, every later
/// one is bad, and every second bad one halves the rate (constant schedule, no warmup). The
/// state is restored on resume: the rates and weights of a run resumed at step 4 are those of
/// the uninterrupted run.
#[test]
fn plateau_halves_the_rate_after_patience_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let sets = [
        "training.lr_schedule={warmup_steps: 0, decay: constant, plateau: {patience: 1, factor: 0.5, threshold: 1000.0}}",
        "training.eval_every=1",
        "training.max_steps=8",
        "training.epochs=2",
    ];
    let full = dir.path().join("full");
    let out = train(&full, &sets, &[]);
    ok(&out);
    assert!(
        text(&out.stderr).contains("learning rate scaled to 0.5000"),
        "{}",
        text(&out.stderr)
    );
    let lrs: Vec<f64> = records(&full, "train")
        .iter()
        .map(|r| r["lr"].as_f64().unwrap())
        .collect();
    // Validations after steps 1..: best at 1; bad at 2, 3 → halved from step 4; bad at 4, 5
    // → quartered from step 6.
    let base = 1e-3;
    let expected = [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125].map(|s| s * base);
    assert_eq!(lrs.len(), 8);
    for (got, want) in lrs.iter().zip(expected) {
        assert!((got - want).abs() < 1e-15, "{lrs:?}");
    }

    let resumed = dir.path().join("resumed");
    let stopped = train(&resumed, &sets, &[("SEPDIST_TEST_STOP_AFTER_STEPS", "4")]);
    assert_eq!(
        stopped.status.code(),
        Some(143),
        "{}",
        text(&stopped.stderr)
    );
    ok(&train_with(&resumed, &sets, &["--resume", "auto"], &[]));
    assert!(
        weights(&ckpt(&resumed, 8)) == weights(&ckpt(&full, 8)),
        "resumed weights differ"
    );
}

/// MSE alone (weights 0 for L1 and the spectral loss) trains and is logged as its own part,
/// and the total equals it; per-source weights are accepted for known sources only.
#[test]
fn mse_loss_and_source_weights_train_and_log_their_parts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mse");
    ok(&train(
        &out,
        &[
            "training.loss.l1_weight=0",
            "training.loss.mse_weight=1",
            "training.loss.multi_stft_resolution_loss_weight=0",
            "training.loss.source_weights={vocals: 2.0, drums: 0.5}",
            "training.max_steps=2",
        ],
        &[],
    ));
    for r in records(&out, "train") {
        let (total, mse) = (r["loss"].as_f64().unwrap(), r["loss_mse"].as_f64().unwrap());
        assert!(mse > 0.0 && (total - mse).abs() <= 1e-12 * mse, "{r}");
        assert_eq!(r["loss_multi_stft"].as_f64(), Some(0.0), "{r}");
        assert!(r["loss_waveform"].as_f64().unwrap() > 0.0, "{r}");
    }
    let bad = train(
        &dir.path().join("bad"),
        &["training.loss.source_weights={piano: 1.0}"],
        &[],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("training.loss.source_weights"),
        "{}",
        text(&bad.stderr)
    );
}

/// A model trained on drums and bass, fine-tuned on bass and vocals: the trunk and the bass
/// head load, the vocals head is named as new.
#[test]
fn init_from_another_source_set_loads_the_trunk_and_names_the_new_heads() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    ok(&train(
        &first,
        &["dataset.sources=[drums, bass]", "training.max_steps=2"],
        &[],
    ));
    let second = dir.path().join("second");
    let from = ckpt(&first, 2);
    let out = train_with(
        &second,
        &["dataset.sources=[bass, vocals]", "training.max_steps=1"],
        &["--init-from", from.to_str().unwrap()],
        &[],
    );
    ok(&out);
    let err = text(&out.stderr);
    assert!(
        err.contains("new mask estimators (initialised fresh): vocals"),
        "{err}"
    );
    assert!(
        err.contains("mask_estimators.vocals.groups.0.layers.0.weight: absent from the checkpoint"),
        "{err}"
    );
    assert!(
        !err.contains("mask_estimators.bass.groups.0.layers.0.weight: absent"),
        "{err}"
    );
    // Everything but the vocals head came from the checkpoint: count what loaded.
    let line = err
        .lines()
        .find(|l| l.starts_with("initialised "))
        .unwrap_or_else(|| panic!("{err}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let (loaded, total): (usize, usize) = (words[1].parse().unwrap(), words[3].parse().unwrap());
    let vocals_head = err.matches("mask_estimators.vocals.").count();
    assert_eq!(loaded + vocals_head, total, "{line}");
}

/// `export` writes one file that `separate` accepts without the run: the same WAVs as the
/// checkpoint it came from, bitwise. `--ema` exports the average, and is refused for a run
/// without one.
#[test]
fn exported_weights_separate_exactly_like_their_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    ok(&train(&run, &[EMA, "training.max_steps=2"], &[]));
    let checkpoint = ckpt(&run, 2);
    let exported = dir.path().join("model.safetensors");
    let out = sepdist()
        .args(["export", "--checkpoint"])
        .arg(&checkpoint)
        .arg("-o")
        .arg(&exported)
        .output()
        .unwrap();
    ok(&out);
    assert!(
        text(&out.stdout).contains("step 2"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        weights_of_file(&exported) == weights(&checkpoint),
        "exported weights differ"
    );
    let exported_ema = dir.path().join("ema.safetensors");
    let out = sepdist()
        .args(["export", "--ema", "--checkpoint"])
        .arg(&checkpoint)
        .arg("-o")
        .arg(&exported_ema)
        .output()
        .unwrap();
    ok(&out);
    assert!(
        weights_of_file(&exported_ema) == ema(&checkpoint),
        "exported EMA differs"
    );

    // A song: the first validation track's mixture.
    let song = data_root().join("train/synth_000/mixture.wav");
    let separate = |model: &Path, out: &Path| {
        let o = sepdist()
            .args(["separate", "--checkpoint"])
            .arg(model)
            .arg(&song)
            .arg("-o")
            .arg(out)
            .output()
            .unwrap();
        ok(&o);
    };
    let (from_ckpt, from_file) = (dir.path().join("a"), dir.path().join("b"));
    separate(&checkpoint, &from_ckpt);
    separate(&exported, &from_file);
    for source in ["drums", "bass", "other", "vocals"] {
        let file = format!("mixture/{source}.wav");
        assert_eq!(
            std::fs::read(from_ckpt.join(&file)).unwrap(),
            std::fs::read(from_file.join(&file)).unwrap(),
            "{source}"
        );
    }

    // No EMA in the run: --ema is an error naming the checkpoint; a foreign file is refused.
    let plain = dir.path().join("plain");
    ok(&train(&plain, &["training.max_steps=1"], &[]));
    let out = sepdist()
        .args(["export", "--ema", "--checkpoint"])
        .arg(ckpt(&plain, 1))
        .arg("-o")
        .arg(dir.path().join("x.safetensors"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("has no EMA"),
        "{}",
        text(&out.stderr)
    );
    let out = sepdist()
        .args(["separate", "--checkpoint"])
        .arg(ckpt(&plain, 1).join("model.safetensors"))
        .arg(&song)
        .arg("-o")
        .arg(dir.path().join("c"))
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("not a sepdist export"),
        "{}",
        text(&out.stderr)
    );
}

/// The tensors of a safetensors file, name-sorted and concatenated.
fn weights_of_file(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    names
        .iter()
        .flat_map(|n| f32s(st.tensor(n).unwrap().data()))
        .collect()
}
