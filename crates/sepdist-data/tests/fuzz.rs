#![allow(clippy::unwrap_used)]
//! Fuzz targets of the audio readers (proptest): mutated copies of valid WAVs (written by the
//! crate's writer and by hound in the other layouts), WAV headers built field by field, and
//! mutated `.stem.mp4`/`.m4a` fixtures with their box sizes, counts and timescales broken.
//!
//! Properties: no reader panics; every error is a `DataError` naming the file; a case never
//! allocates much more than its input (a corrupt length field must not reserve gigabytes:
//! the heap peak of each case is measured); `data check` reports every file that the
//! training reader cannot read. `SEPDIST_FUZZ_SECS=60` fuzzes each target for a minute (see
//! sepdist-config/tests/fuzzing/mod.rs).

#[path = "../../sepdist-config/tests/fuzzing/mod.rs"]
mod fuzzing;

use fuzzing::{Endian, apply, fuzz, mutations};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseResult;
use sepdist_data::wav::{self, SampleFormat, Stereo};
use sepdist_data::{DataError, check_dataset, decode, stem};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[global_allocator]
static HEAP: peak_alloc::PeakAlloc = peak_alloc::PeakAlloc;

/// The targets run one at a time: the heap peak is process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const RATE: u32 = 8_000;

/// Heap a case may take above what it started with: decoders' fixed buffers plus a multiple
/// of the input size (decoded audio is larger than the file: 8 bytes per frame).
fn heap_limit(input_len: usize) -> usize {
    (64 << 20) + 64 * input_len
}

/// Runs `f`, failing the case if its heap peak exceeds [`heap_limit`].
fn measured(input_len: usize, f: impl FnOnce() -> TestCaseResult) -> TestCaseResult {
    let before = HEAP.current_usage();
    HEAP.reset_peak_usage();
    let result = f();
    let used = HEAP.peak_usage().saturating_sub(before);
    prop_assert!(
        used <= heap_limit(input_len),
        "a case with a {input_len}-byte input allocated {used} bytes at its peak"
    );
    result
}

/// An error must have a message and name the file.
fn typed<T>(path: &Path, result: &Result<T, DataError>) -> TestCaseResult {
    if let Err(e) = result {
        prop_assert!(!e.to_string().trim().is_empty());
        prop_assert_eq!(
            e.path(),
            Some(path),
            "the error does not name the file: {}",
            e
        );
    }
    Ok(())
}

fn signal(frames: usize) -> Stereo {
    Stereo {
        left: (0..frames)
            .map(|i| (i as f32 * 0.031).sin() * 0.8)
            .collect(),
        right: (0..frames)
            .map(|i| (i as f32 * 0.017).cos() * 0.6 - 0.1)
            .collect(),
    }
}

fn hound_file<S: hound::Sample + Copy>(path: &Path, spec: hound::WavSpecEx, data: &[S]) {
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut w = hound::WavWriter::new_with_spec_ex(file, spec).unwrap();
    for &s in data {
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
}

fn spec(channels: u16, bits: u16, bytes: u16, float: bool) -> hound::WavSpecEx {
    hound::WavSpecEx {
        spec: hound::WavSpec {
            channels,
            sample_rate: RATE,
            bits_per_sample: bits,
            sample_format: if float {
                hound::SampleFormat::Float
            } else {
                hound::SampleFormat::Int
            },
        },
        bytes_per_sample: bytes,
    }
}

/// Valid WAVs of every layout the reader supports, as (name, bytes).
fn wav_bases() -> Vec<(String, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let audio = signal(300);
    let mut files = Vec::new();
    for (name, format) in [
        ("f32", SampleFormat::F32),
        ("i16", SampleFormat::I16),
        ("i24", SampleFormat::I24),
    ] {
        let p = dir.path().join(format!("{name}.wav"));
        wav::write(&p, &audio, RATE, format).unwrap();
        files.push((name.to_string(), p));
    }
    let ints: Vec<i32> = (0..600).map(|i| (i - 300) * 97).collect();
    let p = dir.path().join("mono_i16.wav");
    let data: Vec<i16> = ints.iter().map(|&v| v as i16).collect();
    hound_file(&p, spec(1, 16, 2, false), &data);
    files.push(("mono_i16".into(), p));
    let p = dir.path().join("mono_i8.wav");
    let data: Vec<i8> = ints.iter().map(|&v| (v / 256) as i8).collect();
    hound_file(&p, spec(1, 8, 1, false), &data);
    files.push(("mono_i8".into(), p));
    let p = dir.path().join("i32.wav");
    let data: Vec<i32> = ints.iter().map(|&v| v << 12).collect();
    hound_file(&p, spec(2, 32, 4, false), &data);
    files.push(("i32".into(), p));
    let p = dir.path().join("i24_in_4_bytes.wav");
    let data: Vec<i32> = ints.iter().map(|&v| v << 4).collect();
    hound_file(&p, spec(2, 24, 4, false), &data);
    files.push(("i24_in_4_bytes".into(), p));
    let p = dir.path().join("mono_f32.wav");
    let data: Vec<f32> = audio.left.clone();
    hound_file(&p, spec(1, 32, 4, true), &data);
    files.push(("mono_f32".into(), p));
    files
        .into_iter()
        .map(|(n, p)| (n, std::fs::read(p).unwrap()))
        .collect()
}

/// Offsets of the WAV integer fields worth breaking: the RIFF size, every chunk size, and the
/// `fmt ` fields (format tag, channels, rate, byte rate, block align, bits, extension).
fn wav_fields(b: &[u8]) -> Vec<usize> {
    let mut out = vec![4];
    let mut pos = 12usize;
    while pos + 8 <= b.len() && out.len() < 64 {
        out.push(pos + 4);
        let len = u32::from_le_bytes([b[pos + 4], b[pos + 5], b[pos + 6], b[pos + 7]]) as usize;
        if &b[pos..pos + 4] == b"fmt " {
            out.extend([0, 2, 4, 8, 12, 14, 16, 18, 20, 24].map(|o| pos + 8 + o));
        }
        pos = pos
            .saturating_add(8)
            .saturating_add(len)
            .saturating_add(len % 2);
    }
    out.retain(|&o| o < b.len());
    out
}

/// A dataset root with one track whose mixture is the input, and a valid `drums.wav`.
struct WavCase {
    _dir: tempfile::TempDir,
    root: PathBuf,
    mixture: PathBuf,
}

impl WavCase {
    fn new(valid: &[u8]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        let track = root.join("train/track");
        std::fs::create_dir_all(&track).unwrap();
        std::fs::write(track.join("drums.wav"), valid).unwrap();
        WavCase {
            mixture: track.join("mixture.wav"),
            root,
            _dir: dir,
        }
    }

    /// Every reader on `bytes`.
    fn run(&self, bytes: &[u8], start: usize, len: usize, resample: bool) -> TestCaseResult {
        let path = &self.mixture;
        std::fs::write(path, bytes).unwrap();
        measured(bytes.len(), || {
            let info = wav::info(path);
            typed(path, &info)?;
            let full = wav::read(path, None);
            typed(path, &full)?;
            if let (Ok(info), Ok(audio)) = (&info, &full) {
                prop_assert_eq!(audio.frames(), info.frames);
                prop_assert_eq!(audio.left.len(), audio.right.len());
            }
            let segment = wav::read_segment(path, start, len, Some(RATE));
            typed(path, &segment)?;
            if let Ok(s) = &segment {
                prop_assert_eq!(s.frames(), len);
            }
            // symphonia's reader of the same file (`sepdist separate`).
            let decoded = decode::read_audio(path, if resample { 11_025 } else { RATE });
            typed(path, &decoded)?;
            // `data check` flags whatever training could not read.
            let problems = check_dataset(&self.root, &["drums".to_string()], RATE);
            let flagged = problems.iter().any(|p| p.path == *path);
            let trainable = full.is_ok() && info.as_ref().is_ok_and(|i| i.sample_rate == RATE);
            prop_assert!(
                trainable || flagged,
                "data check misses an unreadable mixture: {:?}",
                problems
            );
            Ok(())
        })
    }
}

fn offset() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 0usize..400,
        1 => any::<u32>().prop_map(|v| v as usize),
    ]
}

#[test]
fn fuzz_wav_mutations() {
    let _serial = serial();
    let bases = wav_bases();
    let case = WavCase::new(&bases[0].1);
    fuzz(
        "data/wav_mutations",
        300,
        (
            any::<Index>(),
            mutations(6),
            offset(),
            0usize..600,
            prop::bool::weighted(0.1),
        ),
        |(base, muts, start, len, resample)| {
            let (_, bytes) = &bases[base.index(bases.len())];
            let bytes = apply(bytes, &muts, Endian::Little, wav_fields);
            case.run(&bytes, start, len, resample)
        },
    );
}

/// A WAV header written field by field, consistent or not.
#[derive(Debug, Clone)]
struct Header {
    riff_len: Option<u32>,
    fmt_len: u32,
    tag: u16,
    channels: u16,
    rate: u32,
    byte_rate: Option<u32>,
    block_align: Option<u16>,
    bits: u16,
    cb_size: u16,
    valid_bits: u16,
    subformat: u16,
    /// A chunk before `data` (e.g. `LIST`), with its declared length.
    extra: Option<([u8; 4], u32, Vec<u8>)>,
    data_len: Option<u32>,
    data: Vec<u8>,
}

impl Header {
    fn bytes(&self) -> Vec<u8> {
        let block = self
            .block_align
            .unwrap_or(self.channels.wrapping_mul(self.bits.div_ceil(8)));
        let byte_rate = self
            .byte_rate
            .unwrap_or(u32::from(block).wrapping_mul(self.rate));
        let mut fmt = Vec::new();
        fmt.extend(self.tag.to_le_bytes());
        fmt.extend(self.channels.to_le_bytes());
        fmt.extend(self.rate.to_le_bytes());
        fmt.extend(byte_rate.to_le_bytes());
        fmt.extend(block.to_le_bytes());
        fmt.extend(self.bits.to_le_bytes());
        fmt.extend(self.cb_size.to_le_bytes());
        fmt.extend(self.valid_bits.to_le_bytes());
        fmt.extend(3u32.to_le_bytes());
        fmt.extend(self.subformat.to_le_bytes());
        fmt.extend(*b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71");
        fmt.resize(fmt.len().min(self.fmt_len as usize), 0);
        let mut body = b"WAVE".to_vec();
        body.extend(*b"fmt ");
        body.extend(self.fmt_len.to_le_bytes());
        body.extend(&fmt);
        if let Some((kind, len, bytes)) = &self.extra {
            body.extend(kind);
            body.extend(len.to_le_bytes());
            body.extend(bytes);
        }
        body.extend(*b"data");
        body.extend(
            self.data_len
                .unwrap_or(self.data.len() as u32)
                .to_le_bytes(),
        );
        body.extend(&self.data);
        let mut out = b"RIFF".to_vec();
        out.extend(self.riff_len.unwrap_or(body.len() as u32).to_le_bytes());
        out.extend(body);
        out
    }
}

fn header() -> impl Strategy<Value = Header> {
    let u32s = || {
        prop_oneof![
            Just(0u32),
            Just(1),
            Just(8_000),
            Just(44_100),
            Just(0x7FFF_FFFF),
            Just(u32::MAX),
            any::<u32>()
        ]
    };
    let len = || prop::option::weighted(0.6, u32s());
    (
        (
            len(),
            prop::sample::select(vec![0u32, 14, 16, 18, 20, 39, 40, 41, 1000, u32::MAX]),
            prop::sample::select(vec![1u16, 3, 0xFFFE, 2, 0, 0x55, 0xFFFF]),
            prop_oneof![
                Just(1u16),
                Just(2),
                Just(0),
                Just(3),
                Just(u16::MAX),
                any::<u16>()
            ],
            u32s(),
            prop::option::weighted(0.2, u32s()),
        ),
        (
            prop::option::weighted(0.2, any::<u16>()),
            prop_oneof![
                prop::sample::select(vec![8u16, 16, 24, 32, 0, 1, 4, 12, 20, 33, 64, u16::MAX]),
                any::<u16>()
            ],
            prop::sample::select(vec![0u16, 22, 2, u16::MAX]),
            prop::sample::select(vec![0u16, 8, 16, 20, 24, 32, 40, u16::MAX]),
            prop::sample::select(vec![1u16, 3, 0, 2, 0xFFFE]),
            prop::option::weighted(
                0.3,
                (
                    prop::sample::select(vec![
                        *b"LIST",
                        *b"fact",
                        *b"fmt ",
                        *b"data",
                        *b"\0\0\0\0",
                    ]),
                    u32s(),
                    prop::collection::vec(any::<u8>(), 0..32),
                ),
            ),
            len(),
            prop::collection::vec(any::<u8>(), 0..2_000),
        ),
    )
        .prop_map(
            |(
                (riff_len, fmt_len, tag, channels, rate, byte_rate),
                (block_align, bits, cb_size, valid_bits, subformat, extra, data_len, data),
            )| Header {
                riff_len,
                fmt_len,
                tag,
                channels,
                rate,
                byte_rate,
                block_align,
                bits,
                cb_size,
                valid_bits,
                subformat,
                extra,
                data_len,
                data,
            },
        )
}

#[test]
fn fuzz_wav_headers() {
    let _serial = serial();
    let bases = wav_bases();
    let case = WavCase::new(&bases[0].1);
    fuzz(
        "data/wav_headers",
        300,
        (header(), offset(), 0usize..600),
        |(header, start, len)| case.run(&header.bytes(), start, len, false),
    );
}

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(path),
    )
    .unwrap()
}

/// Offsets of the MP4 integer fields worth breaking: every box size (and 64-bit size), and
/// the first words of every box body (version/flags, counts, timescales, durations, edit
/// list entries), recursing into containers, `stsd` and the `mp4a` sample entry.
fn mp4_fields(b: &[u8]) -> Vec<usize> {
    fn walk(b: &[u8], start: usize, end: usize, depth: usize, out: &mut Vec<usize>) {
        let mut pos = start;
        while pos + 8 <= end && out.len() < 1_024 && depth < 8 {
            out.push(pos);
            let size = u32::from_be_bytes(b[pos..pos + 4].try_into().unwrap()) as usize;
            let kind: [u8; 4] = b[pos + 4..pos + 8].try_into().unwrap();
            let (header, size) = match size {
                0 => (8, end - pos),
                1 if pos + 16 <= end => {
                    out.push(pos + 8);
                    let large = u64::from_be_bytes(b[pos + 8..pos + 16].try_into().unwrap());
                    (16, usize::try_from(large).unwrap_or(usize::MAX))
                }
                n => (8, n),
            };
            if size < header || size > end - pos {
                return;
            }
            let (body, body_end) = (pos + header, pos + size);
            out.extend(
                (0..32)
                    .step_by(4)
                    .map(|o| body + o)
                    .filter(|&o| o + 4 <= body_end),
            );
            match &kind {
                b"moov" | b"trak" | b"mdia" | b"minf" | b"stbl" | b"edts" | b"dinf" | b"udta"
                | b"mvex" | b"moof" | b"traf" => walk(b, body, body_end, depth + 1, out),
                b"stsd" => walk(b, body + 8, body_end, depth + 1, out),
                b"mp4a" => walk(b, body + 28, body_end, depth + 1, out),
                _ => {}
            }
            pos = body_end;
        }
    }
    let mut out = Vec::new();
    walk(b, 0, b.len(), 0, &mut out);
    out
}

#[test]
fn fuzz_stem_mp4_mutations() {
    let _serial = serial();
    let bases = [
        fixture("stem_mp4/train/Alpha - One.stem.mp4"),
        fixture("stem_mp4/train/Beta - Two.stem.mp4"),
        fixture("decode/tone_44100_stereo.m4a"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("musdb18");
    std::fs::create_dir_all(root.join("train")).unwrap();
    let path = root.join("train/Fuzz - Track.stem.mp4");
    fuzz(
        "data/stem_mp4_mutations",
        150,
        (
            any::<Index>(),
            mutations(6),
            prop::sample::select(stem::STREAMS.to_vec()),
            prop::bool::weighted(0.2),
        ),
        |(base, muts, stream, all)| {
            let bytes = apply(
                &bases[base.index(bases.len())],
                &muts,
                Endian::Big,
                mp4_fields,
            );
            std::fs::write(&path, &bytes).unwrap();
            measured(bytes.len(), || {
                let mixture = stem::read_stream(&path, "mixture", 44_100);
                typed(&path, &mixture)?;
                if stream != "mixture" {
                    typed(&path, &stem::read_stream(&path, stream, 44_100))?;
                }
                if all {
                    typed(&path, &stem::read_stems(&path, 44_100))?;
                }
                typed(&path, &decode::read_audio(&path, 44_100))?;
                let source = if stream == "mixture" { "drums" } else { stream };
                let problems = check_dataset(&root, &[source.to_string()], 44_100);
                prop_assert!(
                    mixture.is_ok() || problems.iter().any(|p| p.path == path),
                    "data check misses an unreadable stem file: {:?}",
                    problems
                );
                Ok(())
            })
        },
    );
}
