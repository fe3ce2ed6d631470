//! `sepdist plot` through the real binary: figures of a small metrics file, the default output
//! folder, and a garbled metrics line reported with its file and line number.

mod common;
use common::run as sepdist;

use std::path::Path;

fn write_metrics(dir: &Path) {
    let mut lines = vec![
        r#"{"kind":"validation","step":0,"loss":0.5,"loss_waveform":0.1,"loss_multi_stft":0.4,"chunks":2,"usdr_vocals":1.0,"usdr_bass":0.5,"usdr_mean":0.75}"#.to_string(),
    ];
    for step in 1..=8u64 {
        lines.push(format!(
            r#"{{"kind":"train","step":{step},"epoch":1,"loss":{},"loss_waveform":0.1,"loss_multi_stft":{},"lr":{},"grad_norm":0.1,"skipped":false,"skipped_steps":0,"samples_per_s":2.0,"mem_allocated":{},"mem_peak_allocated":2000000000,"mem_reserved":1500000000,"mem_peak_reserved":2100000000}}"#,
            0.5 / step as f64 + 0.1,
            0.5 / step as f64,
            1e-4 * step as f64,
            100_000_000 * step,
        ));
    }
    lines.push(r#"{"kind":"validation","step":8,"loss":0.3,"loss_waveform":0.08,"loss_multi_stft":0.22,"chunks":2,"usdr_vocals":3.0,"usdr_bass":2.0,"usdr_mean":2.5}"#.to_string());
    std::fs::write(dir.join("metrics.jsonl"), lines.join("\n") + "\n").expect("write metrics");
}

#[test]
fn plot_writes_png_and_svg_figures() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_metrics(tmp.path());
    let out = tmp.path().join("figures");
    let run = tmp.path().to_str().expect("utf-8 path");
    let output = sepdist(&["plot", run, "-o", out.to_str().expect("utf-8 path")]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for name in ["loss", "lr", "memory", "sdr"] {
        let png = std::fs::read(out.join(format!("{name}.png"))).expect("png written");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{name}.png");
        // IHDR: width and height, big-endian, right after the chunk header.
        let width = u32::from_be_bytes(png[16..20].try_into().expect("4 bytes"));
        let height = u32::from_be_bytes(png[20..24].try_into().expect("4 bytes"));
        assert_eq!((width, height), (1200, 700), "{name}.png");
        let svg = std::fs::read_to_string(out.join(format!("{name}.svg"))).expect("svg written");
        assert!(
            svg.contains("step") && svg.contains("<polyline"),
            "{name}.svg"
        );
        assert!(stdout.contains(&format!("{name}.png")), "{stdout}");
    }
}

#[test]
fn plot_defaults_to_run_dir_plots_and_reports_skipped_figures() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Train records without memory figures, no validation uSDR.
    std::fs::write(
        tmp.path().join("metrics.jsonl"),
        "{\"kind\":\"train\",\"step\":1,\"loss\":0.5,\"lr\":0.001}\n\
         {\"kind\":\"train\",\"step\":2,\"loss\":0.4,\"lr\":0.001}\n",
    )
    .expect("write metrics");
    let output = sepdist(&["plot", tmp.path().to_str().expect("utf-8 path")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("skipped memory") && stderr.contains("skipped sdr"),
        "{stderr}"
    );
    assert!(tmp.path().join("plots/loss.svg").exists());
    assert!(tmp.path().join("plots/lr.png").exists());
    assert!(!tmp.path().join("plots/memory.png").exists());
}

#[test]
fn plot_names_the_garbled_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tmp.path().join("metrics.jsonl"),
        "{\"kind\":\"train\",\"step\":1,\"loss\":0.5}\nnot json\n",
    )
    .expect("write metrics");
    let output = sepdist(&["plot", tmp.path().to_str().expect("utf-8 path")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("metrics.jsonl:2:"), "{stderr}");

    let empty = tempfile::tempdir().expect("tempdir");
    let output = sepdist(&["plot", empty.path().to_str().expect("utf-8 path")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("metrics.jsonl"), "{stderr}");
}
