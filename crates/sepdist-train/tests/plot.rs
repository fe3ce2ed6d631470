#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! `sepdist_train::plot` on small synthetic metrics files: every figure is written as a PNG of
//! the right size with the series' colours in it and as an SVG with its axis labels; missing
//! data skips a figure; a garbled line is an error naming it.

use sepdist_train::plot::{PlotError, plot_run, read_metrics};
use std::path::Path;

/// Twenty train steps and validations at 0, 10 and 20, with per-source uSDR.
fn synthetic_metrics(with_sdr: bool, with_memory: bool) -> String {
    let mut lines = Vec::new();
    for step in (0..=20).step_by(10) {
        let mut v = serde_json::json!({
            "kind": "validation", "step": step, "chunks": 4,
            "loss": 0.5 - step as f64 * 0.01,
            "loss_waveform": 0.1, "loss_multi_stft": 0.4 - step as f64 * 0.01,
        });
        if with_sdr {
            v["usdr_vocals"] = serde_json::json!(1.0 + step as f64 * 0.2);
            v["usdr_drums"] = serde_json::json!(2.0 + step as f64 * 0.1);
            v["usdr_mean"] = serde_json::json!(1.5 + step as f64 * 0.15);
        }
        lines.push(v.to_string());
        if step == 20 {
            break;
        }
        for s in step + 1..=step + 10 {
            let mut t = serde_json::json!({
                "kind": "train", "step": s, "epoch": 1 + s / 10,
                "loss": 0.6 / (1.0 + s as f64 * 0.1), "loss_waveform": 0.1,
                "loss_multi_stft": 0.5 / (1.0 + s as f64 * 0.1),
                "lr": 1e-3 * s as f64 / 20.0, "grad_norm": 0.1, "skipped": false,
                "skipped_steps": 0, "samples_per_s": 2.0,
            });
            if with_memory {
                t["mem_allocated"] = serde_json::json!(100_000_000 + s * 1000);
                t["mem_peak_allocated"] = serde_json::json!(1_800_000_000u64);
                t["mem_reserved"] = serde_json::json!(1_400_000_000u64 + s * 10_000_000);
                t["mem_peak_reserved"] = serde_json::json!(1_900_000_000u64);
            }
            lines.push(t.to_string());
        }
    }
    // A skipped step's NaN loss is written as null; an unknown kind is ignored.
    lines.push(r#"{"kind":"train","step":21,"loss":null,"lr":0.001}"#.to_string());
    lines.push(r#"{"kind":"event","message":"resumed"}"#.to_string());
    lines.join("\n") + "\n"
}

/// Width, height and RGBA pixels of a PNG.
fn decode_png(path: &Path) -> (u32, u32, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "plotters writes RGB");
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// The text contents of an SVG's `<text>` elements, trimmed.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = &t[t.find('>')? + 1..];
            Some(body[..body.find("</text>")?].trim().to_string())
        })
        .collect()
}

fn count_color(pixels: &[u8], rgb: [u8; 3]) -> usize {
    pixels.chunks_exact(3).filter(|p| *p == rgb).count()
}

#[test]
fn writes_every_figure_as_png_and_svg() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("metrics.jsonl"),
        synthetic_metrics(true, true),
    )
    .unwrap();
    let out = tmp.path().join("plots");
    let report = plot_run(tmp.path(), &out).unwrap();
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_eq!(report.written.len(), 8);

    let expectations = [
        ("loss", "loss"),
        ("lr", "learning rate"),
        ("memory", "memory (GiB)"),
        ("sdr", "uSDR (dB)"),
    ];
    for (name, y_label) in expectations {
        let png = out.join(format!("{name}.png"));
        let (w, h, pixels) = decode_png(&png);
        assert_eq!((w, h), (1200, 700), "{name}");
        // Every figure's first series (train, or the first source) is drawn in the palette's
        // blue; a figure without it would have drawn no data.
        assert!(
            count_color(&pixels, [0, 114, 178]) > 200,
            "{name}: no series pixels"
        );
        // Text was rendered: dark anti-aliased pixels beyond the series and axes.
        let dark = pixels
            .chunks_exact(3)
            .filter(|p| p.iter().all(|&c| c < 100))
            .count();
        assert!(dark > 2000, "{name}: {dark} dark pixels (no text?)");

        let svg = std::fs::read_to_string(out.join(format!("{name}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg"),
            "{name}: {}",
            &svg[..40.min(svg.len())]
        );
        let texts = svg_texts(&svg);
        assert!(texts.iter().any(|t| t == "step"), "{name}: no x axis label");
        assert!(
            texts.iter().any(|t| t == y_label),
            "{name}: no y axis label in {texts:?}"
        );
        assert!(svg.contains("<polyline"), "{name}: no series");
    }
    let sdr = svg_texts(&std::fs::read_to_string(out.join("sdr.svg")).unwrap());
    for legend in ["vocals", "drums", "mean"] {
        assert!(sdr.iter().any(|t| t == legend), "sdr legend lacks {legend}");
    }
    let loss = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    let texts = svg_texts(&loss);
    for legend in ["train", "validation", "train multi-STFT"] {
        assert!(
            texts.iter().any(|t| t == legend),
            "loss legend lacks {legend}"
        );
    }
    // The validation losses of the loss figure carry markers.
    assert!(loss.contains("<circle"), "no validation markers");
}

#[test]
fn figures_without_data_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("metrics.jsonl"),
        synthetic_metrics(false, false),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let report = plot_run(tmp.path(), &out).unwrap();
    let skipped: Vec<&str> = report.skipped.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(skipped, ["memory", "sdr"]);
    assert!(report.skipped[1].1.contains("usdr"), "{:?}", report.skipped);
    assert!(out.join("loss.png").exists() && out.join("lr.svg").exists());
    assert!(!out.join("memory.png").exists() && !out.join("sdr.svg").exists());
}

#[test]
fn garbled_line_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("metrics.jsonl");
    let good = r#"{"kind":"train","step":1,"loss":0.5,"lr":0.001}"#;
    std::fs::write(
        &path,
        format!("{good}\n\n{{\"kind\":\"train\",\"step\":2,\"lo\n"),
    )
    .unwrap();
    let err = read_metrics(&path).unwrap_err();
    assert!(matches!(err, PlotError::Parse { line: 3, .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("{}:3:", path.display())), "{text}");

    std::fs::write(
        &path,
        format!("{good}\n{{\"kind\":\"train\",\"loss\":0.5}}\n"),
    )
    .unwrap();
    let err = read_metrics(&path).unwrap_err();
    assert!(
        err.to_string().contains(":2:") && err.to_string().contains("step"),
        "{err}"
    );

    std::fs::write(&path, "[1, 2]\n").unwrap();
    let err = read_metrics(&path).unwrap_err();
    assert!(err.to_string().contains(":1: not a JSON object"), "{err}");
}

#[test]
fn missing_or_empty_metrics_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let err = plot_run(tmp.path(), &tmp.path().join("out")).unwrap_err();
    assert!(matches!(err, PlotError::Read { .. }));
    assert!(err.to_string().contains("metrics.jsonl"), "{err}");

    std::fs::write(tmp.path().join("metrics.jsonl"), "\n").unwrap();
    let err = plot_run(tmp.path(), &tmp.path().join("out")).unwrap_err();
    assert!(matches!(err, PlotError::Empty { .. }), "{err}");
}
