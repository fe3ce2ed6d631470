#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! `sepdist bench --composed-ops`: the path a GPU runs today (the fused ops as their composed
//! twins, the blocks' composed hand-written backwards, the attention's kernel, the STFT family's
//! CPU kernels) measured on the
//! CPU. Its peak heap stays near the fused kernels' (1.02× kept, 1.18× checkpointed on this
//! 4-layer config when written): a regression to candle's graph through the composed ops, which
//! a CUDA run took before the blocks' backwards ran on every device, needed 3.68×.

mod common;
use common::{ok, sepdist, text};

const TINY: &str = "tests/fixtures/tiny.yaml";
/// The plan test's 4-layer config (`tests/plan.rs`).
const FOUR_LAYERS: [&str; 7] = [
    "model.n_layers=4",
    "model.emb_dim=64",
    "model.n_heads=4",
    "model.ffn_hidden_dim=[64,64]",
    "model.mask_hidden_dim=16",
    "dataset.sources=[vocals]",
    "dataset.segment_length=6000",
];

/// `sepdist bench`'s peak heap (bytes) and its output.
fn bench(checkpointing: bool, composed: bool) -> (f64, String) {
    let mut cmd = sepdist();
    cmd.args(["bench", "--config", TINY, "--steps", "1", "--warmup", "1"])
        .env("RAYON_NUM_THREADS", "1");
    for s in FOUR_LAYERS {
        cmd.args(["--set", s]);
    }
    cmd.arg("--set")
        .arg(format!("training.gradient_checkpointing={checkpointing}"));
    if composed {
        cmd.arg("--composed-ops");
    }
    let out = cmd.output().unwrap();
    ok(&out);
    let stdout = text(&out.stdout);
    let gib: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("peak heap"))
        .and_then(|rest| rest.trim().strip_suffix("GiB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak heap in:\n{stdout}"));
    (gib * f64::from(1u32 << 30), stdout)
}

#[test]
fn the_gpus_path_on_the_cpu_stays_near_the_fused_kernels_memory() {
    for checkpointing in [false, true] {
        let (fused, _) = bench(checkpointing, false);
        let (composed, stdout) = bench(checkpointing, true);
        assert!(
            stdout.contains("ops                composed (as on a GPU: --composed-ops)"),
            "{stdout}"
        );
        let ratio = composed / fused;
        println!(
            "checkpointing {checkpointing}: peak heap {:.1} MB fused, {:.1} MB composed ({ratio:.2}×)",
            fused / 1e6,
            composed / 1e6
        );
        assert!(
            ratio <= 1.3,
            "checkpointing {checkpointing}: the composed path's peak heap is {ratio:.2}× the fused one's"
        );
    }
}
