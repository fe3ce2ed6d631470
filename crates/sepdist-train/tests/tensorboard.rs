#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! Reads event files back with a parser written here from the TFRecord and protobuf specs,
//! independent of the writer's code: its own bitwise CRC-32C, its own varint decoder, and
//! hound for the embedded WAV. (The check with TensorBoard's own reader is documented in
//! tests/fixtures/tensorboard/README.md.)

use sepdist_train::tensorboard::{SampleLayout, TbError, TbWriter};
use std::collections::BTreeMap;
use std::path::Path;

/// CRC-32C, bit by bit (reflected polynomial 0x82F63B78), as the spec defines it.
fn crc32c_bitwise(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn masked(data: &[u8]) -> u32 {
    let crc = crc32c_bitwise(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Splits a TFRecord file into payloads, checking both checksums of every record.
fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        assert!(at + 12 <= bytes.len(), "truncated header at {at}");
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert_eq!(
            len_crc,
            masked(len_bytes),
            "length CRC of the record at {at}"
        );
        let payload = &bytes[at + 12..at + 12 + len];
        let crc_at = at + 12 + len;
        let data_crc = u32::from_le_bytes(bytes[crc_at..crc_at + 4].try_into().unwrap());
        assert_eq!(
            data_crc,
            masked(payload),
            "payload CRC of the record at {at}"
        );
        out.push(payload.to_vec());
        at = crc_at + 4;
    }
    out
}

/// A decoded protobuf field: varint, 64-bit, length-delimited or 32-bit.
#[derive(Debug, Clone)]
enum Field {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(Vec<u8>),
    Fixed32([u8; 4]),
}

fn varint(buf: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let b = buf[*at];
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

/// Decodes one message into its fields by number (repeated fields keep every occurrence).
fn message(buf: &[u8]) -> BTreeMap<u64, Vec<Field>> {
    let mut fields: BTreeMap<u64, Vec<Field>> = BTreeMap::new();
    let mut at = 0;
    while at < buf.len() {
        let key = varint(buf, &mut at);
        let field = match key & 7 {
            0 => Field::Varint(varint(buf, &mut at)),
            1 => {
                at += 8;
                Field::Fixed64(buf[at - 8..at].try_into().unwrap())
            }
            2 => {
                let len = varint(buf, &mut at) as usize;
                at += len;
                Field::Bytes(buf[at - len..at].to_vec())
            }
            5 => {
                at += 4;
                Field::Fixed32(buf[at - 4..at].try_into().unwrap())
            }
            wire => panic!("unexpected wire type {wire}"),
        };
        fields.entry(key >> 3).or_default().push(field);
    }
    assert_eq!(at, buf.len(), "message overruns its bytes");
    fields
}

fn one(fields: &BTreeMap<u64, Vec<Field>>, number: u64) -> Field {
    let values = fields
        .get(&number)
        .unwrap_or_else(|| panic!("field {number} missing"));
    assert_eq!(values.len(), 1, "field {number} repeated");
    values[0].clone()
}

fn bytes(f: Field) -> Vec<u8> {
    match f {
        Field::Bytes(b) => b,
        other => panic!("expected bytes, got {other:?}"),
    }
}

fn uint(f: Field) -> u64 {
    match f {
        Field::Varint(v) => v,
        other => panic!("expected varint, got {other:?}"),
    }
}

fn float(f: Field) -> f32 {
    match f {
        Field::Fixed32(b) => f32::from_le_bytes(b),
        other => panic!("expected fixed32, got {other:?}"),
    }
}

fn double(f: Field) -> f64 {
    match f {
        Field::Fixed64(b) => f64::from_le_bytes(b),
        other => panic!("expected fixed64, got {other:?}"),
    }
}

/// The only event file in `dir`, with its name checked against TensorFlow's pattern.
fn event_file(dir: &Path) -> Vec<u8> {
    let entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let name = entries[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let parts: Vec<&str> = name.splitn(5, '.').collect();
    assert_eq!(&parts[..3], ["events", "out", "tfevents"], "{name}");
    assert!(parts[3].parse::<u64>().unwrap() > 1_600_000_000, "{name}");
    assert!(!parts[4].is_empty(), "{name}");
    std::fs::read(&entries[0]).unwrap()
}

/// (wall_time, step, the `Summary.Value` fields of the event's single value)
fn summary_value(event: &[u8]) -> (f64, u64, BTreeMap<u64, Vec<Field>>) {
    let e = message(event);
    let summary = message(&bytes(one(&e, 5)));
    let value = message(&bytes(one(&summary, 1)));
    (double(one(&e, 1)), uint(one(&e, 2)), value)
}

#[test]
fn scalars_and_audio_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tb");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let mut w = TbWriter::create(&dir).unwrap();
    w.scalar("train/loss", 7, 0.25).unwrap();
    w.scalar("validation/usdr_vocals", 300, -3.5).unwrap();
    // Planar stereo: left ramps up, right is the negated left; 0.5 and 2.0 (clipped).
    let left = [0.0f32, 0.5, 1.0, 2.0];
    let right: Vec<f32> = left.iter().map(|x| -x).collect();
    let planar: Vec<f32> = left.iter().chain(&right).copied().collect();
    w.audio("audio/vocals", 300, 8000, &planar, 2, SampleLayout::Planar)
        .unwrap();
    // The same excerpt interleaved must give the same WAV.
    let interleaved: Vec<f32> = left
        .iter()
        .zip(&right)
        .flat_map(|(l, r)| [*l, *r])
        .collect();
    w.audio(
        "audio/vocals_i",
        300,
        8000,
        &interleaved,
        2,
        SampleLayout::Interleaved,
    )
    .unwrap();
    w.session_start(250).unwrap();
    w.flush().unwrap();
    let path = w.path().to_path_buf();

    // Flushed: the file is complete while the writer is still open (a killed run).
    let bytes_on_disk = event_file(&dir);
    assert_eq!(std::fs::read(&path).unwrap(), bytes_on_disk);
    let events = records(&bytes_on_disk);
    assert_eq!(events.len(), 6);

    let first = message(&events[0]);
    assert_eq!(bytes(one(&first, 3)), b"brain.Event:2");
    assert!(double(one(&first, 1)) >= before.floor());

    let (wall, step, value) = summary_value(&events[1]);
    assert!(wall >= before.floor() && wall < before + 600.0, "{wall}");
    assert_eq!(step, 7);
    assert_eq!(bytes(one(&value, 1)), b"train/loss");
    assert_eq!(float(one(&value, 2)), 0.25);

    let (_, step, value) = summary_value(&events[2]);
    assert_eq!(step, 300);
    assert_eq!(bytes(one(&value, 1)), b"validation/usdr_vocals");
    assert_eq!(float(one(&value, 2)), -3.5);

    let mut wavs = Vec::new();
    for (event, tag) in events[3..5].iter().zip(["audio/vocals", "audio/vocals_i"]) {
        let (_, step, value) = summary_value(event);
        assert_eq!(step, 300);
        assert_eq!(bytes(one(&value, 1)), tag.as_bytes());
        assert!(
            !value.contains_key(&2),
            "audio must not carry a simple_value"
        );
        let audio = message(&bytes(one(&value, 6)));
        assert_eq!(float(one(&audio, 1)), 8000.0);
        assert_eq!(uint(one(&audio, 2)), 2);
        assert_eq!(uint(one(&audio, 3)), 4);
        assert_eq!(bytes(one(&audio, 5)), b"audio/wav");
        wavs.push(bytes(one(&audio, 4)));
    }
    assert_eq!(wavs[0], wavs[1]);
    let mut reader = hound::WavReader::new(std::io::Cursor::new(&wavs[0])).unwrap();
    let spec = reader.spec();
    assert_eq!(spec.channels, 2);
    assert_eq!(spec.sample_rate, 8000);
    assert_eq!(spec.bits_per_sample, 16);
    assert_eq!(spec.sample_format, hound::SampleFormat::Int);
    let pcm: Vec<i16> = reader.samples::<i16>().map(|s| s.unwrap()).collect();
    assert_eq!(pcm, [0, 0, 16384, -16384, 32767, -32767, 32767, -32767]);

    let restart = message(&events[5]);
    assert_eq!(uint(one(&restart, 2)), 250);
    let log = message(&bytes(one(&restart, 6)));
    assert_eq!(uint(one(&log, 1)), 1, "SessionLog START");
}

#[test]
fn second_writer_in_the_same_second_gets_its_own_file() {
    let tmp = tempfile::tempdir().unwrap();
    let a = TbWriter::create(tmp.path()).unwrap();
    let b = TbWriter::create(tmp.path()).unwrap();
    assert_ne!(a.path(), b.path());
    assert!(a.path().exists() && b.path().exists());
}

#[test]
fn invalid_audio_is_a_typed_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = TbWriter::create(tmp.path()).unwrap();
    let err = w
        .audio("audio/x", 1, 44100, &[0.0; 5], 2, SampleLayout::Interleaved)
        .unwrap_err();
    assert!(matches!(err, TbError::InvalidAudio { .. }), "{err}");
    assert!(err.to_string().contains("audio/x"), "{err}");
    let err = w
        .audio("audio/y", 1, 0, &[0.0; 4], 2, SampleLayout::Interleaved)
        .unwrap_err();
    assert!(err.to_string().contains("sample rate"), "{err}");
}

#[test]
fn unwritable_directory_names_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    // A file where the directory should be.
    let blocker = tmp.path().join("tb");
    std::fs::write(&blocker, b"x").unwrap();
    let err = TbWriter::create(&blocker).err().unwrap();
    assert!(matches!(err, TbError::Create { .. }));
    assert!(
        err.to_string().contains(&blocker.display().to_string()),
        "{err}"
    );
}
