//! TensorBoard event files, written without TensorFlow: TFRecord framing around hand-encoded
//! protobuf `Event` messages. Only the handful of fields TensorBoard needs for scalars, audio
//! and restarts are encoded, which is simpler and lighter than a protobuf code generator.
//!
//! A file is `events.out.tfevents.<unix seconds>.<hostname>` in the log directory; its first
//! record is `file_version: "brain.Event:2"`. Every record is framed as
//! `u64 length (LE) | masked CRC-32C(length) | payload | masked CRC-32C(payload)`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Errors of the event writer; each names the file or directory involved.
#[derive(Debug, thiserror::Error)]
pub enum TbError {
    #[error("{}: cannot create the TensorBoard log: {source}", path.display())]
    Create { path: PathBuf, source: io::Error },
    #[error("{}: cannot write TensorBoard events: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("TensorBoard audio '{tag}': {message}")]
    InvalidAudio { tag: String, message: String },
}

/// How the samples of a multi-channel excerpt are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleLayout {
    /// `[l0, r0, l1, r1, ...]`
    Interleaved,
    /// `[l0, l1, ..., r0, r1, ...]` (one channel after the other, as the model's tensors are)
    Planar,
}

/// Appends TensorBoard events to one file of a log directory.
#[derive(Debug)]
pub struct TbWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl TbWriter {
    /// Creates `dir` if needed and a new event file in it, and writes the version record.
    /// A resumed run gets a new file beside the old ones; TensorBoard reads them all.
    pub fn create(dir: impl AsRef<Path>) -> Result<TbWriter, TbError> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|source| TbError::Create {
            path: dir.to_path_buf(),
            source,
        })?;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let base = format!("events.out.tfevents.{secs}.{}", hostname());
        // Two writers created in the same second (a quick restart) must not truncate each
        // other's file, so the name gets a counter instead.
        let mut attempt = 0u32;
        let (path, file) = loop {
            let name = if attempt == 0 {
                base.clone()
            } else {
                format!("{base}.{attempt}")
            };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 1000 => {
                    attempt += 1;
                }
                Err(source) => return Err(TbError::Create { path, source }),
            }
        };
        let mut writer = TbWriter {
            path,
            out: BufWriter::new(file),
        };
        let mut event = event_header(wall_time(), 0);
        put_bytes(&mut event, 3, b"brain.Event:2");
        writer.record(&event)?;
        writer.flush()?;
        Ok(writer)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs one scalar (`summary.value { tag, simple_value }`).
    pub fn scalar(&mut self, tag: &str, step: u64, value: f32) -> Result<(), TbError> {
        let mut value_msg = Vec::new();
        put_bytes(&mut value_msg, 1, tag.as_bytes());
        put_key(&mut value_msg, 2, WIRE_FIXED32);
        value_msg.extend_from_slice(&value.to_le_bytes());
        self.summary_event(step, &value_msg)
    }

    /// Logs an audio excerpt as a 16-bit PCM WAV (`summary.value.audio`). Samples are clipped
    /// to [-1, 1]; non-finite samples become silence so one bad value cannot hide the rest.
    pub fn audio(
        &mut self,
        tag: &str,
        step: u64,
        sample_rate: u32,
        samples: &[f32],
        channels: usize,
        layout: SampleLayout,
    ) -> Result<(), TbError> {
        let invalid = |message: String| TbError::InvalidAudio {
            tag: tag.to_string(),
            message,
        };
        if channels == 0 || channels > u16::MAX as usize {
            return Err(invalid(format!("unsupported channel count {channels}")));
        }
        if sample_rate == 0 {
            return Err(invalid("sample rate 0".to_string()));
        }
        let frames = samples.len() / channels;
        if frames * channels != samples.len() {
            return Err(invalid(format!(
                "{} samples do not divide into {channels} channels",
                samples.len()
            )));
        }
        let wav = wav_pcm16(samples, channels, frames, sample_rate, layout)
            .ok_or_else(|| invalid(format!("{frames} frames exceed the 4 GiB WAV limit")))?;

        let mut audio_msg = Vec::new();
        put_key(&mut audio_msg, 1, WIRE_FIXED32);
        audio_msg.extend_from_slice(&(sample_rate as f32).to_le_bytes());
        put_key(&mut audio_msg, 2, WIRE_VARINT);
        put_varint(&mut audio_msg, channels as u64);
        put_key(&mut audio_msg, 3, WIRE_VARINT);
        put_varint(&mut audio_msg, frames as u64);
        put_bytes(&mut audio_msg, 4, &wav);
        put_bytes(&mut audio_msg, 5, b"audio/wav");

        let mut value_msg = Vec::new();
        put_bytes(&mut value_msg, 1, tag.as_bytes());
        put_bytes(&mut value_msg, 6, &audio_msg);
        self.summary_event(step, &value_msg)
    }

    /// Marks a (re)start at `step` (`session_log { status: START }`): TensorBoard then drops
    /// the events of an earlier run past that step, which a resume from a checkpoint replays.
    pub fn session_start(&mut self, step: u64) -> Result<(), TbError> {
        let mut log = Vec::new();
        put_key(&mut log, 1, WIRE_VARINT);
        put_varint(&mut log, 1); // SessionLog.SessionStatus.START
        let mut event = event_header(wall_time(), step);
        put_bytes(&mut event, 6, &log);
        self.record(&event)
    }

    /// Hands the buffered events to the OS, so that a run killed later keeps them.
    pub fn flush(&mut self) -> Result<(), TbError> {
        self.out.flush().map_err(|source| TbError::Write {
            path: self.path.clone(),
            source,
        })
    }

    fn summary_event(&mut self, step: u64, value_msg: &[u8]) -> Result<(), TbError> {
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, value_msg);
        let mut event = event_header(wall_time(), step);
        put_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    fn record(&mut self, payload: &[u8]) -> Result<(), TbError> {
        let len = (payload.len() as u64).to_le_bytes();
        let mut frame = Vec::with_capacity(payload.len() + 16);
        frame.extend_from_slice(&len);
        frame.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        frame.extend_from_slice(payload);
        frame.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
        self.out.write_all(&frame).map_err(|source| TbError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// TFRecord's checksum: CRC-32C rotated and offset, because a CRC over data that embeds
/// CRCs is weak.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(buf, (u64::from(field) << 3) | u64::from(wire));
}

fn put_bytes(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, WIRE_LEN);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// `wall_time` (field 1, double) and `step` (field 2, int64) of an `Event`.
fn event_header(wall_time: f64, step: u64) -> Vec<u8> {
    let mut event = Vec::new();
    put_key(&mut event, 1, WIRE_FIXED64);
    event.extend_from_slice(&wall_time.to_le_bytes());
    put_key(&mut event, 2, WIRE_VARINT);
    put_varint(&mut event, step);
    event
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The host name for the file name (TensorFlow's convention), restricted to characters that
/// are safe in a file name.
fn hostname() -> String {
    let raw = fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "localhost".to_string()
    } else {
        clean
    }
}

/// A RIFF/WAVE file of 16-bit PCM, interleaved as WAV requires. `None` if it would exceed
/// the format's 32-bit sizes.
fn wav_pcm16(
    samples: &[f32],
    channels: usize,
    frames: usize,
    sample_rate: u32,
    layout: SampleLayout,
) -> Option<Vec<u8>> {
    let data_len = u32::try_from(samples.len().checked_mul(2)?).ok()?;
    let riff_len = data_len.checked_add(36)?;
    let block_align = (channels * 2) as u16;
    let byte_rate = sample_rate.checked_mul(u32::from(block_align))?;
    let mut wav = Vec::with_capacity(44 + data_len as usize);
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&riff_len.to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
    wav.extend_from_slice(&(channels as u16).to_le_bytes());
    wav.extend_from_slice(&sample_rate.to_le_bytes());
    wav.extend_from_slice(&byte_rate.to_le_bytes());
    wav.extend_from_slice(&block_align.to_le_bytes());
    wav.extend_from_slice(&16u16.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&data_len.to_le_bytes());
    for frame in 0..frames {
        for ch in 0..channels {
            let x = match layout {
                SampleLayout::Interleaved => samples[frame * channels + ch],
                SampleLayout::Planar => samples[ch * frames + frame],
            };
            let x = if x.is_finite() {
                x.clamp(-1.0, 1.0)
            } else {
                0.0
            };
            wav.extend_from_slice(&((x * 32767.0).round() as i16).to_le_bytes());
        }
    }
    Some(wav)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_matches_protobuf_examples() {
        // 1 and 300 are the examples of the protobuf encoding guide.
        let mut buf = Vec::new();
        put_varint(&mut buf, 1);
        put_varint(&mut buf, 300);
        assert_eq!(buf, [0x01, 0xac, 0x02]);
    }

    #[test]
    fn masked_crc_of_known_input() {
        // CRC-32C("123456789") = 0xE3069283, the standard check value; masked by hand.
        let crc: u32 = 0xE306_9283;
        let masked = crc.rotate_right(15).wrapping_add(0xa282_ead8);
        assert_eq!(masked_crc32c(b"123456789"), masked);
    }

    #[test]
    fn hostname_is_file_name_safe() {
        let h = hostname();
        assert!(!h.is_empty());
        assert!(!h.contains('/') && !h.contains(' '), "{h}");
    }
}
