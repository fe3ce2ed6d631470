//! Decoding WAV (generated here), FLAC, MP3 and M4A/AAC (tiny fixtures made once with ffmpeg,
//! see tests/fixtures/decode/README.md), resampling, mono duplication and bad files.

use sepdist_data::DataError;
use sepdist_data::decode::read_audio;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/decode")
        .join(name)
}

fn sine(freq: f64, rate: u32, frames: usize, amp: f64) -> Vec<f32> {
    (0..frames)
        .map(|i| {
            (amp * (2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(rate)).sin()) as f32
        })
        .collect()
}

fn write_wav(path: &Path, rate: u32, channels: &[Vec<f32>], float: bool) {
    let spec = hound::WavSpec {
        channels: channels.len() as u16,
        sample_rate: rate,
        bits_per_sample: if float { 32 } else { 16 },
        sample_format: if float {
            hound::SampleFormat::Float
        } else {
            hound::SampleFormat::Int
        },
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap_or_else(|e| panic!("{e}"));
    for i in 0..channels[0].len() {
        for c in channels {
            if float {
                w.write_sample(c[i]).unwrap_or_else(|e| panic!("{e}"));
            } else {
                w.write_sample((c[i] * 32767.0).round() as i16)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
    w.finalize().unwrap_or_else(|e| panic!("{e}"));
}

fn rms(x: &[f32]) -> f64 {
    (x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
}

/// Upward zero crossings per second: the frequency of a clean tone.
fn frequency(x: &[f32], rate: u32) -> f64 {
    let ups = x.windows(2).filter(|w| w[0] < 0.0 && w[1] >= 0.0).count();
    ups as f64 * f64::from(rate) / x.len() as f64
}

#[test]
fn wav_at_the_model_rate_is_read_unchanged() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("a.wav");
    let l = sine(440.0, 8000, 4000, 0.5);
    let r = sine(660.0, 8000, 4000, 0.25);
    write_wav(&path, 8000, &[l.clone(), r.clone()], false);
    let d = read_audio(&path, 8000).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (d.source_rate, d.source_channels, d.skipped_packets),
        (8000, 2, 0)
    );
    assert_eq!(d.audio.frames(), 4000);
    for (got, want) in d
        .audio
        .left
        .iter()
        .zip(&l)
        .chain(d.audio.right.iter().zip(&r))
    {
        assert!((got - want).abs() <= 1.0 / 32767.0, "{got} vs {want}");
    }
}

#[test]
fn mono_wav_is_duplicated_and_resampled_down_and_up() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("mono.wav");
    write_wav(&path, 16000, &[sine(440.0, 16000, 16000, 0.5)], true);
    let d = read_audio(&path, 8000).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((d.source_rate, d.source_channels), (16000, 1));
    assert_eq!(d.audio.frames(), 8000);
    assert_eq!(d.audio.left, d.audio.right);
    // Away from the edges the resampled tone is the ideal tone at the new rate, without gain
    // change and aligned to within two output samples (the resampler's own alignment).
    let (err, lag) = best_fit(&d.audio.left, 8000, 0.5, 500..7500);
    assert!(
        err < 1e-3 && lag.abs() <= 2.0,
        "downsampled: deviation {err} at lag {lag}"
    );
    let up = read_audio(&path, 44100).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(up.audio.frames(), 44100);
    let (err, lag) = best_fit(&up.audio.right, 44100, 0.5, 3000..41000);
    assert!(
        err < 1e-3 && lag.abs() <= 2.0,
        "upsampled: deviation {err} at lag {lag}"
    );
}

/// Largest deviation of `x[range]` from a 440 Hz tone of amplitude `amp` delayed by the best
/// lag in [-4, 4] samples (steps of 1/8), and that lag.
fn best_fit(x: &[f32], rate: u32, amp: f64, range: std::ops::Range<usize>) -> (f64, f64) {
    let mut best = (f64::INFINITY, 0.0);
    for k in -32..=32 {
        let lag = f64::from(k) / 8.0;
        let err = range
            .clone()
            .map(|i| {
                let t = (i as f64 - lag) / f64::from(rate);
                (f64::from(x[i]) - amp * (2.0 * std::f64::consts::PI * 440.0 * t).sin()).abs()
            })
            .fold(0.0, f64::max);
        if err < best.0 {
            best = (err, lag);
        }
    }
    best
}

/// The compressed fixtures: a 440 Hz tone of amplitude 1/8 lasting 0.5 s (ffmpeg's lavfi
/// `sine`). Lossy codecs and their encoder delay allow some slack in length and level.
fn check_tone(name: &str, source_rate: u32, source_channels: usize, target: u32) {
    let d = read_audio(&fixture(name), target).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        (d.source_rate, d.source_channels),
        (source_rate, source_channels),
        "{name}"
    );
    let n = d.audio.frames();
    let want = target as usize / 2;
    assert!(
        n.abs_diff(want) <= want / 10,
        "{name}: {n} frames, expected about {want}"
    );
    let mid = &d.audio.left[n / 5..4 * n / 5];
    let level = rms(mid);
    // lavfi's tone has amplitude 1/8; ffmpeg's mono-to-stereo upmix scales by 1/√2.
    let amplitude = if source_channels == 2 {
        0.125 / 2f64.sqrt()
    } else {
        0.125
    };
    let expected = amplitude / 2f64.sqrt();
    assert!(
        (level - expected).abs() < 0.1 * expected,
        "{name}: RMS {level}, expected {expected}"
    );
    let f = frequency(mid, target);
    assert!((f - 440.0).abs() < 15.0, "{name}: {f} Hz");
    let diff = d
        .audio
        .left
        .iter()
        .zip(&d.audio.right)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 0.01, "{name}: channels differ by {diff}");
}

#[test]
fn flac_is_decoded_and_upsampled() {
    check_tone("tone_22050_stereo.flac", 22050, 2, 44100);
}

#[test]
fn mp3_mono_is_decoded_duplicated_and_downsampled() {
    check_tone("tone_44100_mono.mp3", 44100, 1, 8000);
}

#[test]
fn m4a_aac_is_decoded() {
    check_tone("tone_44100_stereo.m4a", 44100, 2, 44100);
}

#[test]
fn bad_and_missing_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let garbage = dir.path().join("song.mp3");
    std::fs::write(&garbage, b"this is not an audio file at all, just text")
        .unwrap_or_else(|e| panic!("{e}"));
    let e = read_audio(&garbage, 44100)
        .err()
        .unwrap_or_else(|| panic!("garbage decoded"));
    assert!(e.to_string().contains("song.mp3"), "{e}");
    assert_eq!(e.path(), Some(garbage.as_path()));

    let missing = dir.path().join("missing.flac");
    let e = read_audio(&missing, 44100)
        .err()
        .unwrap_or_else(|| panic!("missing file decoded"));
    assert!(matches!(e, DataError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("missing.flac"), "{e}");

    // Three channels are refused (the model is stereo).
    let three = dir.path().join("three.wav");
    let x = sine(440.0, 8000, 100, 0.5);
    write_wav(&three, 8000, &[x.clone(), x.clone(), x], false);
    let e = read_audio(&three, 8000)
        .err()
        .unwrap_or_else(|| panic!("3 channels decoded"));
    assert!(
        matches!(e, DataError::Channels { channels: 3, .. }),
        "{e:?}"
    );
}
