//! WAV reading and writing (hound). Reads 8/16/24/32-bit integer and 32-bit float PCM, mono or
//! stereo; mono is duplicated to both channels. Segments are read by seeking, never by loading
//! a whole file (MUSDB18-HQ is 30 GB). **Frames past the end of a file read as zeros**: a segment
//! that starts near the end is zero-padded to its requested length, so callers always get the
//! length they asked for.

use crate::error::{DataError, Result};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

/// Planar stereo audio: one `Vec` per channel, equal lengths.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stereo {
    pub left: Vec<f32>,
    pub right: Vec<f32>,
}

impl Stereo {
    pub fn zeros(frames: usize) -> Self {
        Stereo {
            left: vec![0.0; frames],
            right: vec![0.0; frames],
        }
    }

    pub fn frames(&self) -> usize {
        self.left.len()
    }

    /// Flat `[2, N]` row-major buffer (left channel, then right channel).
    pub fn to_planar(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(2 * self.frames());
        out.extend_from_slice(&self.left);
        out.extend_from_slice(&self.right);
        out
    }

    /// Inverse of [`Stereo::to_planar`]; `None` when the length is odd.
    pub fn from_planar(flat: &[f32]) -> Option<Self> {
        if flat.len() % 2 != 0 {
            return None;
        }
        let (l, r) = flat.split_at(flat.len() / 2);
        Some(Stereo {
            left: l.to_vec(),
            right: r.to_vec(),
        })
    }
}

/// What a WAV header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WavInfo {
    pub sample_rate: u32,
    pub channels: u16,
    /// Frames (samples per channel) according to the data chunk size.
    pub frames: usize,
    pub bits_per_sample: u16,
    pub float: bool,
}

/// Sample encodings the writer supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleFormat {
    F32,
    I16,
    I24,
}

type Reader = hound::WavReader<BufReader<File>>;

fn open(path: &Path, expected_rate: Option<u32>) -> Result<(Reader, WavInfo)> {
    let reader = hound::WavReader::open(path).map_err(|e| DataError::wav(path, e))?;
    let spec = reader.spec();
    let info = WavInfo {
        sample_rate: spec.sample_rate,
        channels: spec.channels,
        frames: reader.duration() as usize,
        bits_per_sample: spec.bits_per_sample,
        float: spec.sample_format == hound::SampleFormat::Float,
    };
    if !(1..=2).contains(&info.channels) {
        return Err(DataError::Channels {
            path: path.to_path_buf(),
            channels: info.channels,
        });
    }
    let supported = if info.float {
        info.bits_per_sample == 32
    } else {
        (1..=32).contains(&info.bits_per_sample)
    };
    if !supported {
        return Err(DataError::Invalid {
            path: path.to_path_buf(),
            what: format!(
                "unsupported sample format: {}-bit {}",
                info.bits_per_sample,
                if info.float { "float" } else { "integer" }
            ),
        });
    }
    if let Some(expected) = expected_rate
        && expected != info.sample_rate
    {
        return Err(DataError::SampleRate {
            path: path.to_path_buf(),
            found: info.sample_rate,
            expected,
        });
    }
    Ok((reader, info))
}

/// Header of a WAV file (channels and sample format validated, nothing decoded).
pub fn info(path: &Path) -> Result<WavInfo> {
    open(path, None).map(|(_, info)| info)
}

/// Reads frames `[start, start + len)` of `path` as stereo; frames past the end are zeros.
/// `expected_rate`: a different header rate is an error naming the file and both rates.
pub fn read_segment(
    path: &Path,
    start: usize,
    len: usize,
    expected_rate: Option<u32>,
) -> Result<Stereo> {
    let mut out = Stereo::zeros(len);
    read_segment_into(path, start, &mut out.left, &mut out.right, expected_rate)?;
    Ok(out)
}

/// [`read_segment`] into caller buffers (`left.len()` frames; both slices equally long). Frames
/// past the end of the file are set to zero.
pub fn read_segment_into(
    path: &Path,
    start: usize,
    left: &mut [f32],
    right: &mut [f32],
    expected_rate: Option<u32>,
) -> Result<()> {
    if left.len() != right.len() {
        return Err(DataError::Argument(format!(
            "channel buffers differ in length ({} vs {})",
            left.len(),
            right.len()
        )));
    }
    let (mut reader, info) = open(path, expected_rate)?;
    let available = info.frames.saturating_sub(start).min(left.len());
    left[available..].fill(0.0);
    right[available..].fill(0.0);
    if available == 0 {
        return Ok(());
    }
    seek(path, &mut reader, &info, start).map_err(|e| DataError::wav(path, e))?;
    decode(
        &mut reader,
        &info,
        &mut left[..available],
        &mut right[..available],
    )
    .map_err(|(_, e)| DataError::wav(path, e))
}

/// Reads a whole file (for evaluation and tests; training reads segments). A header that
/// promises more frames than the file can hold is refused before anything is allocated (a
/// corrupt data chunk size could otherwise reserve gigabytes).
pub fn read(path: &Path, expected_rate: Option<u32>) -> Result<Stereo> {
    let (_, info) = open(path, expected_rate)?;
    let most = frames_in_file(path, &info)?;
    if info.frames > most {
        return Err(DataError::Invalid {
            path: path.to_path_buf(),
            what: format!(
                "truncated or corrupt WAV: the header promises {} frames, the file holds at most {most}",
                info.frames
            ),
        });
    }
    read_segment(path, 0, info.frames, expected_rate)
}

/// An upper bound on the frames the file can hold: its size over the smallest frame size.
fn frames_in_file(path: &Path, info: &WavInfo) -> Result<usize> {
    let bytes = std::fs::metadata(path)
        .map_err(|e| DataError::io(path, e))?
        .len();
    let frame = u64::from(info.channels) * u64::from(info.bits_per_sample.div_ceil(8));
    Ok(usize::try_from(bytes / frame.max(1)).unwrap_or(usize::MAX))
}

fn seek(path: &Path, reader: &mut Reader, info: &WavInfo, start: usize) -> hound::Result<()> {
    if start == 0 {
        return Ok(());
    }
    // hound's seek assumes samples stored in exactly `bits / 8` bytes; a 24-bit sample in a
    // 4-byte container (WAVE_FORMAT_EXTENSIBLE) would land in the wrong place.
    let whole_bytes = info.bits_per_sample % 8 == 0
        && (matches!(info.bits_per_sample, 8 | 16 | 32)
            || container_bytes(path) == Some(info.bits_per_sample / 8));
    if whole_bytes {
        let time = u32::try_from(start).map_err(|_| hound::Error::Unsupported)?;
        reader.seek(time)?;
    } else {
        let skip = start * info.channels as usize;
        for s in reader.samples::<i32>().take(skip) {
            s?;
        }
    }
    Ok(())
}

/// Bytes per stored sample (`block_align / channels` of the `fmt ` chunk), from the header.
fn container_bytes(path: &Path) -> Option<u16> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = BufReader::new(File::open(path).ok()?);
    let mut riff = [0u8; 12];
    f.read_exact(&mut riff).ok()?;
    if &riff[..4] != b"RIFF" || &riff[8..] != b"WAVE" {
        return None;
    }
    loop {
        let mut head = [0u8; 8];
        f.read_exact(&mut head).ok()?;
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if &head[..4] == b"fmt " {
            let mut fmt = [0u8; 14];
            f.read_exact(&mut fmt).ok()?;
            let channels = u16::from_le_bytes([fmt[2], fmt[3]]);
            let block_align = u16::from_le_bytes([fmt[12], fmt[13]]);
            return block_align.checked_div(channels);
        }
        // Chunks are padded to even sizes.
        f.seek(SeekFrom::Current(i64::from(len) + i64::from(len % 2)))
            .ok()?;
    }
}

/// Decodes `left.len()` frames; on error, also says how many frames were decoded before it.
fn decode(
    reader: &mut Reader,
    info: &WavInfo,
    left: &mut [f32],
    right: &mut [f32],
) -> std::result::Result<(), (usize, hound::Error)> {
    if info.float {
        decode_with(reader.samples::<f32>(), info.channels, left, right, |s| s)
    } else {
        let scale = 1.0 / (1u64 << (info.bits_per_sample - 1)) as f32;
        decode_with(reader.samples::<i32>(), info.channels, left, right, |s| {
            s as f32 * scale
        })
    }
}

fn decode_with<S>(
    mut samples: impl Iterator<Item = hound::Result<S>>,
    channels: u16,
    left: &mut [f32],
    right: &mut [f32],
    convert: impl Fn(S) -> f32,
) -> std::result::Result<(), (usize, hound::Error)> {
    let mut next = || -> hound::Result<f32> {
        match samples.next() {
            Some(s) => s.map(&convert),
            None => Err(hound::Error::IoError(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "data chunk ends early",
            ))),
        }
    };
    for (i, (l, r)) in left.iter_mut().zip(right.iter_mut()).enumerate() {
        *l = next().map_err(|e| (i, e))?;
        *r = if channels == 2 {
            next().map_err(|e| (i, e))?
        } else {
            *l
        };
    }
    Ok(())
}

/// Outcome of [`scan`]: frames decoded, or how many decoded before the error.
pub(crate) type Scan = std::result::Result<usize, (usize, DataError)>;

/// Streams every sample of a file, calling `visit(left, right)` per frame.
/// Returns the frame count the header promises and the number decoded; a decoding error reports
/// how far it got. Used by the checker to find truncated files.
pub(crate) fn scan(path: &Path, mut visit: impl FnMut(f32, f32)) -> Result<(WavInfo, Scan)> {
    let (mut reader, info) = open(path, None)?;
    const BLOCK: usize = 16_384;
    let mut left = vec![0.0; BLOCK];
    let mut right = vec![0.0; BLOCK];
    let mut done = 0;
    while done < info.frames {
        let n = (info.frames - done).min(BLOCK);
        if let Err((k, e)) = decode(&mut reader, &info, &mut left[..n], &mut right[..n]) {
            return Ok((info, Err((done + k, DataError::wav(path, e)))));
        }
        for (l, r) in left[..n].iter().zip(&right[..n]) {
            visit(*l, *r);
        }
        done += n;
    }
    Ok((info, Ok(done)))
}

/// Writes stereo audio. Integer formats round and clamp to the representable range (full scale
/// is ±1.0, so `read(write(x))` is `x` to within half a quantisation step).
pub fn write(path: &Path, audio: &Stereo, sample_rate: u32, format: SampleFormat) -> Result<()> {
    if audio.left.len() != audio.right.len() {
        return Err(DataError::Argument(format!(
            "{}: channel lengths differ ({} vs {})",
            path.display(),
            audio.left.len(),
            audio.right.len()
        )));
    }
    let (bits, sample_format) = match format {
        SampleFormat::F32 => (32, hound::SampleFormat::Float),
        SampleFormat::I16 => (16, hound::SampleFormat::Int),
        SampleFormat::I24 => (24, hound::SampleFormat::Int),
    };
    let spec = hound::WavSpec {
        channels: 2,
        sample_rate,
        bits_per_sample: bits,
        sample_format,
    };
    let err = |e| DataError::wav(path, e);
    let mut w = hound::WavWriter::create(path, spec).map_err(err)?;
    let full = (1i64 << (bits - 1)) as f32;
    let quantise = |x: f32| (x * full).round().clamp(-full, full - 1.0) as i32;
    for (&l, &r) in audio.left.iter().zip(&audio.right) {
        match format {
            SampleFormat::F32 => {
                w.write_sample(l).map_err(err)?;
                w.write_sample(r).map_err(err)?;
            }
            SampleFormat::I16 => {
                w.write_sample(quantise(l) as i16).map_err(err)?;
                w.write_sample(quantise(r) as i16).map_err(err)?;
            }
            SampleFormat::I24 => {
                w.write_sample(quantise(l)).map_err(err)?;
                w.write_sample(quantise(r)).map_err(err)?;
            }
        }
    }
    w.finalize().map_err(err)
}
