#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! `sepdist separate` and `sepdist eval` through the real binary: a tiny model trained for a
//! few steps separates generated WAVs (stereo at the model rate, mono at another rate), is
//! scored on the synthetic test split, and existing estimates with known noise are scored.

mod common;
use common::{ok, sepdist, text};

use std::path::{Path, PathBuf};

const TINY: &str = "tests/fixtures/tiny.yaml";
const RATE: u32 = 8000;

/// The synthetic dataset and a run trained on it for 4 steps, shared by every test here.
struct Trained {
    data: PathBuf,
    run: PathBuf,
}

fn trained() -> &'static Trained {
    static T: std::sync::OnceLock<Trained> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("sepdist-eval-tests-{}", std::process::id()));
        let data = common::tiny_dataset("eval-tests");
        let run = base.join("run");
        let out = sepdist()
            .args(["train", "--config", TINY, "--set"])
            .arg(format!("training.output_dir={}", run.display()))
            .arg("--set")
            .arg(format!("dataset.root={}", data.display()))
            .output()
            .unwrap();
        ok(&out);
        Trained { data, run }
    })
}

/// A 32-bit float WAV (the root package has no WAV crate among its dev-dependencies).
fn write_wav(path: &Path, rate: u32, channels: &[Vec<f32>]) {
    let (c, n) = (channels.len() as u32, channels[0].len() as u32);
    let data = n * c * 4;
    let mut b = Vec::with_capacity(44 + data as usize);
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&3u16.to_le_bytes()); // IEEE float
    b.extend_from_slice(&(c as u16).to_le_bytes());
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&(rate * c * 4).to_le_bytes());
    b.extend_from_slice(&((c * 4) as u16).to_le_bytes());
    b.extend_from_slice(&32u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data.to_le_bytes());
    for i in 0..n as usize {
        for ch in channels {
            b.extend_from_slice(&ch[i].to_le_bytes());
        }
    }
    std::fs::write(path, b).unwrap();
}

/// What a WAV holds: rate, channels, bits per sample, frames, and the samples of a 32-bit
/// float file (interleaved).
struct Wav {
    rate: u32,
    channels: u16,
    bits: u16,
    frames: usize,
    float_samples: Vec<f32>,
}

fn read_wav(path: &Path) -> Wav {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..4], b"RIFF");
    let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let (mut pos, mut fmt, mut data) = (12, None, None);
    while pos + 8 <= b.len() {
        let size = u32_at(pos + 4) as usize;
        match &b[pos..pos + 4] {
            b"fmt " => fmt = Some(pos + 8),
            b"data" => data = Some((pos + 8, size)),
            _ => {}
        }
        pos += 8 + size + size % 2;
    }
    let f = fmt.unwrap_or_else(|| panic!("{}: no fmt chunk", path.display()));
    let (d, size) = data.unwrap_or_else(|| panic!("{}: no data chunk", path.display()));
    let (channels, rate, bits) = (u16_at(f + 2), u32_at(f + 4), u16_at(f + 14));
    let float_samples = if bits == 32 {
        b[d..d + size]
            .chunks_exact(4)
            .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]]))
            .collect()
    } else {
        Vec::new()
    };
    Wav {
        rate,
        channels,
        bits,
        frames: size / (channels as usize * bits as usize / 8),
        float_samples,
    }
}

/// (rate, channels, frames) of a WAV.
fn wav_shape(path: &Path) -> (u32, u16, usize) {
    let w = read_wav(path);
    (w.rate, w.channels, w.frames)
}

fn tone(freq: f32, rate: u32, frames: usize) -> Vec<f32> {
    (0..frames)
        .map(|i| 0.3 * (2.0 * std::f32::consts::PI * freq * i as f32 / rate as f32).sin())
        .collect()
}

#[test]
fn separate_writes_one_wav_per_source_at_the_model_rate() {
    let t = trained();
    let dir = tempfile::tempdir().unwrap();
    // 2.3 s stereo at the model rate: several chunks of 2048 frames with overlap.
    let stereo = dir.path().join("song.wav");
    write_wav(
        &stereo,
        RATE,
        &[tone(220.0, RATE, 18400), tone(330.0, RATE, 18400)],
    );
    // 1 s mono at 22.05 kHz: resampled to 8 kHz, duplicated to stereo.
    let mono = dir.path().join("mono song.wav");
    write_wav(&mono, 22050, &[tone(440.0, 22050, 22050)]);
    let out_dir = dir.path().join("out");
    let out = sepdist()
        .args(["separate", "--checkpoint"])
        .arg(&t.run)
        .arg(&stereo)
        .arg(&mono)
        .arg("-o")
        .arg(&out_dir)
        .args(["--overlap", "0.5", "--batch", "3"])
        .output()
        .unwrap();
    ok(&out);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("[1/2]") && stderr.contains("[2/2]"),
        "{stderr}"
    );
    for source in ["drums", "bass", "other", "vocals"] {
        assert_eq!(
            wav_shape(&out_dir.join("song").join(format!("{source}.wav"))),
            (RATE, 2, 18400)
        );
        assert_eq!(
            wav_shape(&out_dir.join("mono song").join(format!("{source}.wav"))),
            (RATE, 2, 8000)
        );
    }
    // The four estimates of a trained mask model are not silent and finite.
    let samples = read_wav(&out_dir.join("song/vocals.wav")).float_samples;
    assert_eq!(samples.len(), 2 * 18400);
    assert!(samples.iter().all(|x| x.is_finite()));
    assert!(samples.iter().any(|x| x.abs() > 1e-6));

    // 16-bit output, a chunk given in seconds, and one bad input among good ones: the good one
    // is written, the bad one named, exit code 1.
    let bad = dir.path().join("broken.mp3");
    std::fs::write(&bad, b"not audio").unwrap();
    let out_dir = dir.path().join("out16");
    let out = sepdist()
        .args([
            "separate",
            "--pcm16",
            "--chunk-seconds",
            "0.5",
            "--checkpoint",
        ])
        .arg(t.run.join("checkpoints/best_model"))
        .arg(&bad)
        .arg(&stereo)
        .arg("-o")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("broken.mp3"),
        "{}",
        text(&out.stderr)
    );
    let w = read_wav(&out_dir.join("song/bass.wav"));
    assert_eq!((w.bits, w.frames), (16, 18400));

    // A chunk too short for the model is a usage error.
    let out = sepdist()
        .args(["separate", "--chunk-seconds", "0.001", "--checkpoint"])
        .arg(&t.run)
        .arg(&stereo)
        .arg("-o")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

fn read_json(path: &Path) -> serde_json::Value {
    let s = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&s).unwrap()
}

#[test]
fn eval_checkpoint_scores_the_test_split() {
    let t = trained();
    let out_dir = tempfile::tempdir().unwrap();
    let out = sepdist()
        .args(["eval", "--checkpoint"])
        .arg(&t.run)
        .arg("--root")
        .arg(&t.data)
        .arg("--out")
        .arg(out_dir.path())
        .output()
        .unwrap();
    ok(&out);
    let json = read_json(&out_dir.path().join("results.json"));
    let tracks = json["tracks"].as_array().unwrap();
    assert!(!tracks.is_empty());
    for track in tracks {
        for source in ["drums", "bass", "other", "vocals"] {
            let s = &track["sources"][source];
            for key in ["usdr", "csdr", "usdr_mixture"] {
                assert!(
                    s[key].as_f64().is_some_and(f64::is_finite),
                    "{track}: {source}.{key}"
                );
            }
        }
    }
    for source in ["drums", "bass", "other", "vocals"] {
        assert!(
            json["median"][source]["usdr"]
                .as_f64()
                .is_some_and(f64::is_finite)
        );
        assert!(
            json["median"][source]["csdr"]
                .as_f64()
                .is_some_and(f64::is_finite)
        );
    }
    let csv = std::fs::read_to_string(out_dir.path().join("results.csv")).unwrap();
    assert!(csv.starts_with("track,source,usdr,csdr,usdr_mixture,csdr_mixture\n"));
    assert_eq!(csv.lines().count(), 1 + 4 * tracks.len() + 4, "{csv}");
    assert!(text(&out.stdout).contains("vocals"));
}

/// `--root` holding MUSDB18 `.stem.mp4` files (the data crate's fixtures: 1-s tones at
/// 44.1 kHz, decoded and resampled to the model's 8 kHz) is scored like the HQ layout.
#[test]
fn eval_checkpoint_reads_a_stem_mp4_root() {
    let t = trained();
    let fixtures =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/sepdist-data/tests/fixtures/stem_mp4");
    let out_dir = tempfile::tempdir().unwrap();
    let out = sepdist()
        .args(["eval", "--checkpoint"])
        .arg(&t.run)
        .arg("--root")
        .arg(&fixtures)
        .arg("--out")
        .arg(out_dir.path())
        .args(["--window", "hann"])
        .output()
        .unwrap();
    ok(&out);
    let json = read_json(&out_dir.path().join("results.json"));
    let tracks = json["tracks"].as_array().unwrap();
    assert_eq!(tracks.len(), 1, "{json}");
    assert_eq!(tracks[0]["name"], "Gamma - Three");
    // One second at 8 kHz, give or take the AAC edit-list precision (1 ms).
    let frames = tracks[0]["frames"].as_u64().unwrap();
    assert!((7990..=8010).contains(&frames), "{frames}");
    for source in ["drums", "bass", "other", "vocals"] {
        let s = &tracks[0]["sources"][source];
        for key in ["usdr", "usdr_mixture"] {
            assert!(
                s[key].as_f64().is_some_and(f64::is_finite),
                "{source}.{key}: {s}"
            );
        }
    }
    assert!(!fixtures.join(".sepdist-wav-cache").exists());

    // An unknown window is a usage error.
    let out = sepdist()
        .args(["eval", "--window", "triangle", "--checkpoint"])
        .arg(&t.run)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

/// Estimates = references + white noise at a chosen SNR per source: uSDR is that SNR.
#[test]
fn eval_estimates_against_references_gives_the_known_snr() {
    let dir = tempfile::tempdir().unwrap();
    let (refs, ests) = (dir.path().join("refs"), dir.path().join("ests"));
    let snrs = [("bass", 3.0f64), ("vocals", 12.0)];
    let mut state = 12345u64;
    let mut noise = || {
        // xorshift64*: deterministic white noise in [-1, 1).
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        ((state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    for track in ["a", "b"] {
        std::fs::create_dir_all(refs.join(track)).unwrap();
        std::fs::create_dir_all(ests.join(track)).unwrap();
        for (k, (source, snr)) in snrs.iter().enumerate() {
            let n = 3 * RATE as usize;
            let r = [tone(200.0 + 50.0 * k as f32, RATE, n), tone(310.0, RATE, n)];
            let u: Vec<Vec<f64>> = (0..2).map(|_| (0..n).map(|_| noise()).collect()).collect();
            let es: f64 = r.iter().flatten().map(|&x| f64::from(x).powi(2)).sum();
            let en: f64 = u.iter().flatten().map(|x| x * x).sum();
            let g = (es / en / 10f64.powf(snr / 10.0)).sqrt();
            let e: Vec<Vec<f32>> = (0..2)
                .map(|c| {
                    r[c].iter()
                        .zip(&u[c])
                        .map(|(&x, v)| (f64::from(x) + g * v) as f32)
                        .collect()
                })
                .collect();
            write_wav(&refs.join(track).join(format!("{source}.wav")), RATE, &r);
            write_wav(&ests.join(track).join(format!("{source}.wav")), RATE, &e);
        }
    }
    let out = sepdist()
        .args(["eval", "--estimates"])
        .arg(&ests)
        .arg("--references")
        .arg(&refs)
        .output()
        .unwrap();
    ok(&out);
    let json = read_json(&ests.join("results.json"));
    for (source, snr) in snrs {
        for track in json["tracks"].as_array().unwrap() {
            let u = track["sources"][source]["usdr"].as_f64().unwrap();
            assert!((u - snr).abs() < 0.1, "{source}: uSDR {u}, SNR {snr}");
            // White noise is stationary: every 1-s window, hence the median, is near the SNR.
            let c = track["sources"][source]["csdr"].as_f64().unwrap();
            assert!((c - snr).abs() < 0.5, "{source}: cSDR {c}, SNR {snr}");
        }
        let m = json["median"][source]["usdr"].as_f64().unwrap();
        assert!((m - snr).abs() < 0.1);
    }
    assert!(ests.join("results.csv").is_file());

    // Neither mode given: usage error.
    let out = sepdist().args(["eval"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}
