//! WAV reading and writing: formats, mono, seeking, zero padding, errors that name the file.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use sepdist_data::DataError;
use sepdist_data::wav::{self, SampleFormat, Stereo};
use std::path::Path;

fn write_raw<S: hound::Sample + Copy>(
    path: &Path,
    channels: u16,
    rate: u32,
    bits: u16,
    float: bool,
    data: &[S],
) {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: bits,
        sample_format: if float {
            hound::SampleFormat::Float
        } else {
            hound::SampleFormat::Int
        },
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for &s in data {
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
}

/// A stereo test signal with distinct channels, within (-1, 1).
fn signal(frames: usize) -> Stereo {
    Stereo {
        left: (0..frames)
            .map(|i| ((i as f32) * 0.031).sin() * 0.8)
            .collect(),
        right: (0..frames)
            .map(|i| ((i as f32) * 0.017).cos() * 0.6 - 0.1)
            .collect(),
    }
}

#[test]
fn int16_values_are_exact_and_round_trip_within_quantisation() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw16.wav");
    let ints: Vec<i16> = vec![0, 0, 16384, -16384, i16::MAX, i16::MIN, 1, -1];
    write_raw(&raw, 2, 44_100, 16, false, &ints);
    let s = wav::read(&raw, Some(44_100)).unwrap();
    assert_eq!(s.left, vec![0.0, 0.5, 32767.0 / 32768.0, 1.0 / 32768.0]);
    assert_eq!(s.right, vec![0.0, -0.5, -1.0, -1.0 / 32768.0]);

    let p = dir.path().join("w16.wav");
    let x = signal(1000);
    wav::write(&p, &x, 44_100, SampleFormat::I16).unwrap();
    let info = wav::info(&p).unwrap();
    assert_eq!(
        (info.bits_per_sample, info.float, info.frames, info.channels),
        (16, false, 1000, 2)
    );
    let y = wav::read(&p, Some(44_100)).unwrap();
    for (a, b) in x
        .left
        .iter()
        .chain(&x.right)
        .zip(y.left.iter().chain(&y.right))
    {
        assert!((a - b).abs() <= 0.5 / 32768.0 + 1e-7, "{a} vs {b}");
    }
}

#[test]
fn int24_values_are_exact_and_round_trip_within_quantisation() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw24.wav");
    let ints: Vec<i32> = vec![4_194_304, -8_388_608, 8_388_607, 1];
    write_raw(&raw, 2, 48_000, 24, false, &ints);
    let s = wav::read(&raw, Some(48_000)).unwrap();
    assert_eq!(s.left, vec![0.5, 8_388_607.0 / 8_388_608.0]);
    assert_eq!(s.right, vec![-1.0, 1.0 / 8_388_608.0]);

    let p = dir.path().join("w24.wav");
    let x = signal(1000);
    wav::write(&p, &x, 48_000, SampleFormat::I24).unwrap();
    assert_eq!(wav::info(&p).unwrap().bits_per_sample, 24);
    let y = wav::read(&p, None).unwrap();
    for (a, b) in x
        .left
        .iter()
        .chain(&x.right)
        .zip(y.left.iter().chain(&y.right))
    {
        assert!((a - b).abs() <= 0.5 / 8_388_608.0 + 1e-7, "{a} vs {b}");
    }
}

#[test]
fn float32_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f32.wav");
    let x = signal(777);
    wav::write(&p, &x, 44_100, SampleFormat::F32).unwrap();
    let info = wav::info(&p).unwrap();
    assert!(info.float);
    assert_eq!(info.bits_per_sample, 32);
    assert_eq!(wav::read(&p, Some(44_100)).unwrap(), x);
}

#[test]
fn mono_is_duplicated_to_both_channels() {
    let dir = tempfile::tempdir().unwrap();
    let p16 = dir.path().join("mono16.wav");
    write_raw(&p16, 1, 44_100, 16, false, &[8192i16, -8192, 0]);
    let s = wav::read(&p16, None).unwrap();
    assert_eq!(s.left, vec![0.25, -0.25, 0.0]);
    assert_eq!(s.right, s.left);

    let pf = dir.path().join("monof.wav");
    let data: Vec<f32> = (0..500).map(|i| (i as f32 * 0.1).sin()).collect();
    write_raw(&pf, 1, 44_100, 32, true, &data);
    // Seeking in a mono file moves by frames too.
    let seg = wav::read_segment(&pf, 100, 50, None).unwrap();
    assert_eq!(seg.left, data[100..150].to_vec());
    assert_eq!(seg.right, data[100..150].to_vec());
}

#[test]
fn seek_read_equals_slice_of_full_read_for_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let x = signal(5000);
    for (name, fmt) in [
        ("a.wav", SampleFormat::I16),
        ("b.wav", SampleFormat::I24),
        ("c.wav", SampleFormat::F32),
    ] {
        let p = dir.path().join(name);
        wav::write(&p, &x, 44_100, fmt).unwrap();
        let full = wav::read(&p, None).unwrap();
        assert_eq!(full.frames(), 5000);
        for (start, len) in [(0, 10), (1234, 500), (4999, 1), (2500, 2500)] {
            let seg = wav::read_segment(&p, start, len, Some(44_100)).unwrap();
            assert_eq!(
                seg.left,
                full.left[start..start + len].to_vec(),
                "{name} {start}"
            );
            assert_eq!(
                seg.right,
                full.right[start..start + len].to_vec(),
                "{name} {start}"
            );
        }
        // Past the end: zero-padded to the requested length.
        let tail = wav::read_segment(&p, 4990, 30, None).unwrap();
        assert_eq!(tail.frames(), 30);
        assert_eq!(tail.left[..10], full.left[4990..]);
        assert!(
            tail.left[10..]
                .iter()
                .chain(&tail.right[10..])
                .all(|&v| v == 0.0)
        );
        let beyond = wav::read_segment(&p, 9000, 8, None).unwrap();
        assert_eq!(beyond, Stereo::zeros(8));
    }
}

#[test]
fn sample_rate_mismatch_names_file_and_both_rates() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rate.wav");
    wav::write(&p, &signal(10), 48_000, SampleFormat::F32).unwrap();
    let err = wav::read_segment(&p, 0, 5, Some(44_100)).unwrap_err();
    assert!(matches!(
        err,
        DataError::SampleRate {
            found: 48_000,
            expected: 44_100,
            ..
        }
    ));
    let msg = err.to_string();
    assert!(msg.contains(&p.display().to_string()), "{msg}");
    assert!(msg.contains("48000") && msg.contains("44100"), "{msg}");
    assert_eq!(err.path(), Some(p.as_path()));
}

#[test]
fn more_than_two_channels_and_missing_or_garbage_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("three.wav");
    write_raw(&p, 3, 44_100, 16, false, &[0i16; 30]);
    let err = wav::read(&p, None).unwrap_err();
    assert!(matches!(err, DataError::Channels { channels: 3, .. }));
    assert!(err.to_string().contains(&p.display().to_string()));

    let missing = dir.path().join("nope.wav");
    let err = wav::info(&missing).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }));
    assert!(err.to_string().contains(&missing.display().to_string()));

    let garbage = dir.path().join("garbage.wav");
    std::fs::write(&garbage, b"this is not a RIFF file at all, not even close").unwrap();
    let err = wav::read(&garbage, None).unwrap_err();
    assert!(
        err.to_string().contains(&garbage.display().to_string()),
        "{err}"
    );
}

#[test]
fn seek_is_correct_for_24_bit_samples_in_4_byte_containers() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("24in32.wav");
    let spec = hound::WavSpec {
        channels: 2,
        sample_rate: 44_100,
        bits_per_sample: 24,
        sample_format: hound::SampleFormat::Int,
    };
    let file = std::io::BufWriter::new(std::fs::File::create(&p).unwrap());
    let ex = hound::WavSpecEx {
        spec,
        bytes_per_sample: 4,
    };
    let mut w = hound::WavWriter::new_with_spec_ex(file, ex).unwrap();
    let ints: Vec<i32> = (0..400).map(|i| (i - 200) * 20_000).collect();
    for &s in &ints {
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
    let full = wav::read(&p, None).unwrap();
    assert_eq!(full.frames(), 200);
    assert_eq!(full.left[1], -198.0 * 20_000.0 / 8_388_608.0);
    let seg = wav::read_segment(&p, 37, 50, None).unwrap();
    assert_eq!(seg.left, full.left[37..87].to_vec());
    assert_eq!(seg.right, full.right[37..87].to_vec());
}
