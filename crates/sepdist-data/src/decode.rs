//! Decoding songs of any common format for separation: WAV, FLAC, MP3 and MP4/M4A (AAC) with
//! symphonia, any sample rate, mono (duplicated) or stereo, resampled to the model's rate with
//! rubato's windowed-sinc resampler (256 taps, Blackman-Harris², cubic interpolation of a
//! 256× oversampled sinc table: its "high quality" setting).
//!
//! Memory: decoding is streamed packet by packet and resampled in blocks of
//! [`RESAMPLE_BLOCK`] frames, so the file is never held at its own rate: the peak is the
//! decoded result at the target rate (8 bytes per output frame, reserved up front from the
//! container's frame count when it gives one, so growth does not copy) plus a few blocks. A
//! 5-minute song at 44.1 kHz is about 106 MB.

use crate::error::{DataError, Result};
use crate::wav::Stereo;
use rubato::{
    Resampler, SincFixedIn, SincInterpolationParameters, SincInterpolationType, WindowFunction,
};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Once;
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CODEC_TYPE_NULL, DecoderOptions};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

/// Frames per resampler call.
pub const RESAMPLE_BLOCK: usize = 4096;

/// Sample rates of files that are decoded (others are refused as corrupt).
pub const SOURCE_RATES: std::ops::RangeInclusive<u32> = 1_000..=768_000;

/// A decoded song at the requested rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub audio: Stereo,
    /// Rate and channel count of the file.
    pub source_rate: u32,
    pub source_channels: usize,
    /// Packets the codec could not decode and that were skipped (a damaged stream).
    pub skipped_packets: usize,
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> DataError {
    DataError::Invalid {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

fn symphonia_error(path: &Path, e: SymphoniaError) -> DataError {
    match e {
        SymphoniaError::IoError(source) => DataError::Io {
            path: path.to_path_buf(),
            source,
        },
        SymphoniaError::Unsupported(what) => invalid(
            path,
            format!("cannot decode: unsupported format or codec ({what})"),
        ),
        e => invalid(path, format!("cannot decode: {e}")),
    }
}

/// Reads an audio file and returns it as stereo at `target_rate` Hz.
pub fn read_audio(path: &Path, target_rate: u32) -> Result<Decoded> {
    decode_track(path, None, target_rate, &[])
}

/// The part of a stream to keep (an MP4 edit list: encoder delay and padding dropped), in
/// units of `timescale` per second; `timescale == 0` keeps everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Trim {
    pub skip: u64,
    /// Kept after `skip`; `None`: to the end.
    pub keep: Option<u64>,
    pub timescale: u32,
}

impl Trim {
    /// `(skip, keep)` in frames at `rate` Hz.
    fn frames(&self, rate: u32) -> (u64, Option<u64>) {
        if self.timescale == 0 {
            return (0, None);
        }
        let at = |v: u64| {
            (u128::from(v) * u128::from(rate) / u128::from(self.timescale)).min(u64::MAX as u128)
                as u64
        };
        (at(self.skip), self.keep.map(at))
    }
}

thread_local! {
    /// Depth of [`contained`] calls on this thread: panics inside are not printed.
    static CONTAINED: Cell<u32> = const { Cell::new(0) };
}

/// Runs third-party decoding code (symphonia) on `path`, turning a panic inside it into an
/// error naming the file: symphonia 0.5 has arithmetic and indexing panics on some malformed
/// files (found by the fuzz targets in tests/fuzz.rs), and a broken song must be a clean error,
/// not a crash. The panic message is not printed: a panic hook (installed once, passing every
/// other panic to the previous hook) stays silent inside this scope.
pub(crate) fn contained<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CONTAINED.with(Cell::get) == 0 {
                previous(info);
            }
        }));
    });
    CONTAINED.with(|c| c.set(c.get() + 1));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(c.get() - 1));
    result.unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown error".into());
        Err(invalid(
            path,
            format!("cannot decode: malformed file (the decoder failed: {what})"),
        ))
    })
}

/// Probes `path`: its container reader and the ids of its audio tracks in file order.
pub(crate) fn open_format(
    path: &Path,
) -> Result<(Box<dyn symphonia::core::formats::FormatReader>, Vec<u32>)> {
    contained(path, || probe(path))
}

/// Whether the file starts with an ISO-BMFF `ftyp` box (MP4, M4A).
fn is_mp4(file: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut head = Vec::with_capacity(8);
    file.by_ref().take(8).read_to_end(&mut head)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(head.get(4..8) == Some(b"ftyp"))
}

fn probe(path: &Path) -> Result<(Box<dyn symphonia::core::formats::FormatReader>, Vec<u32>)> {
    use symphonia::default::formats::{AdtsReader, FlacReader, IsoMp4Reader, MpaReader, WavReader};
    let io = |e| DataError::io(path, e);
    let mut file = std::fs::File::open(path).map_err(io)?;
    if file.metadata().map_err(io)?.len() == 0 {
        return Err(invalid(path, "empty file (0 bytes)"));
    }
    // symphonia's probe scans the whole first MiB for any format's marker, so a damaged file
    // could be read as an MP4 from wherever the bytes `ftyp` happen to lie, with no bounds
    // check of its tables. Only a file that starts as an MP4 is read as one, after
    // `check_bounds` (see mp4.rs); everything else is probed without the MP4 reader.
    let mut probe = symphonia::core::probe::Probe::default();
    if is_mp4(&mut file).map_err(io)? {
        crate::mp4::check_bounds(path)?;
        probe.register_all::<IsoMp4Reader>();
    } else {
        probe.register_all::<AdtsReader>();
        probe.register_all::<FlacReader>();
        probe.register_all::<MpaReader>();
        probe.register_all::<WavReader>();
        probe.register_all::<symphonia_metadata::id3v2::Id3v2Reader>();
    }
    let stream = MediaSourceStream::new(Box::new(file), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    // Gapless: MP3/AAC encoder delay and padding are trimmed where the container says so.
    let format_options = FormatOptions {
        enable_gapless: true,
        ..Default::default()
    };
    let probed = probe
        .format(&hint, stream, &format_options, &MetadataOptions::default())
        .map_err(|e| symphonia_error(path, e))?;
    let format = probed.format;
    let ids = format
        .tracks()
        .iter()
        .filter(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .map(|t| t.id)
        .collect();
    Ok((format, ids))
}

/// Decodes audio track number `index` (in file order among the audio tracks; the first when
/// `None`) of `path` to stereo at `target_rate` Hz, dropping the source frames outside
/// `trims[track id]` (none when absent).
pub(crate) fn decode_track(
    path: &Path,
    index: Option<usize>,
    target_rate: u32,
    trims: &[Trim],
) -> Result<Decoded> {
    contained(path, || decode_contained(path, index, target_rate, trims))
}

fn decode_contained(
    path: &Path,
    index: Option<usize>,
    target_rate: u32,
    trims: &[Trim],
) -> Result<Decoded> {
    if target_rate == 0 {
        return Err(DataError::Argument(
            "target sample rate must be positive".into(),
        ));
    }
    let (mut format, ids) = open_format(path)?;
    let Some(&track_id) = ids.get(index.unwrap_or(0)) else {
        return Err(match index {
            None => invalid(path, "no audio track"),
            Some(i) => invalid(
                path,
                format!(
                    "no audio stream {i} (the file has {} audio streams)",
                    ids.len()
                ),
            ),
        });
    };
    let params = format
        .tracks()
        .iter()
        .find(|t| t.id == track_id)
        .map(|t| t.codec_params.clone())
        .ok_or_else(|| invalid(path, "no audio track"))?;
    let source_rate = params
        .sample_rate
        .ok_or_else(|| invalid(path, "the stream does not give its sample rate"))?;
    // A corrupt header can claim 1 Hz; resampling that to 44.1 kHz would need buffers of
    // gigabytes. Real audio lies well inside this range.
    if !SOURCE_RATES.contains(&source_rate) {
        return Err(invalid(
            path,
            format!(
                "sample rate {source_rate} Hz is outside the supported {}..={} Hz",
                SOURCE_RATES.start(),
                SOURCE_RATES.end()
            ),
        ));
    }
    let mut decoder = symphonia::default::get_codecs()
        .make(&params, &DecoderOptions::default())
        .map_err(|e| symphonia_error(path, e))?;
    let (skip, keep) = trims
        .get(track_id as usize)
        .copied()
        .unwrap_or_default()
        .frames(source_rate);

    let ratio = f64::from(target_rate) / f64::from(source_rate);
    let mut out = Output::new(path, source_rate, target_rate)?;
    if let Some(n) = params.n_frames {
        // Reserving the final size avoids the transient double buffer of Vec growth. The count
        // comes from the header, so it is believed only up to 16 frames per byte of file (more
        // than AAC or MP3 reach): a corrupt one must not reserve gigabytes.
        let file_len = std::fs::metadata(path).map_or(0, |m| m.len());
        let n = n.min(file_len.saturating_mul(16));
        let expected = (n as f64 * ratio).ceil() as usize + RESAMPLE_BLOCK;
        out.audio.left.reserve(expected);
        out.audio.right.reserve(expected);
    }
    let mut channels = params.channels.map(|c| c.count()).unwrap_or(0);
    let mut skipped = 0;
    let mut samples: Option<SampleBuffer<f32>> = None;
    // Source frames decoded so far (before trimming).
    let mut seen: u64 = 0;
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break;
            }
            Err(SymphoniaError::ResetRequired) => break,
            Err(e) => return Err(symphonia_error(path, e)),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(d) => d,
            // A corrupt packet is skipped (as players do); counted for the caller.
            Err(SymphoniaError::DecodeError(_)) => {
                skipped += 1;
                continue;
            }
            Err(e) => return Err(symphonia_error(path, e)),
        };
        let spec = *decoded.spec();
        channels = spec.channels.count();
        if !(1..=2).contains(&channels) {
            return Err(DataError::Channels {
                path: path.to_path_buf(),
                channels: channels as u16,
            });
        }
        let frames = decoded.frames();
        let buf = match &mut samples {
            Some(b) if b.capacity() >= frames * channels => b,
            _ => samples.insert(SampleBuffer::new(decoded.capacity() as u64, spec)),
        };
        buf.copy_interleaved_ref(decoded);
        // The part of this packet's frames `[seen, seen + frames)` inside the trim window.
        let first = skip.saturating_sub(seen).min(frames as u64) as usize;
        let end = match keep {
            Some(keep) => (skip + keep).saturating_sub(seen).min(frames as u64) as usize,
            None => frames,
        };
        seen += frames as u64;
        if first < end {
            out.push_interleaved(&buf.samples()[first * channels..end * channels], channels)?;
        }
    }
    if channels == 0 {
        return Err(invalid(path, "no audio frames decoded"));
    }
    let audio = out.finish()?;
    Ok(Decoded {
        audio,
        source_rate,
        source_channels: channels,
        skipped_packets: skipped,
    })
}

/// Collects decoded frames, resampling block by block when the rates differ.
struct Output<'a> {
    path: &'a Path,
    resampler: Option<SincFixedIn<f32>>,
    pending: [Vec<f32>; 2],
    /// Input frames pushed. (rubato 0.16's sinc resampler starts its first chunk half a filter
    /// early, so its output is already aligned with the input: measured within two output
    /// samples, see tests/decode.rs; `output_delay()` must not be dropped again.)
    frames_in: usize,
    ratio: f64,
    audio: Stereo,
}

impl<'a> Output<'a> {
    fn new(path: &'a Path, from: u32, to: u32) -> Result<Self> {
        let ratio = f64::from(to) / f64::from(from);
        let resampler = if from == to {
            None
        } else {
            let params = SincInterpolationParameters {
                sinc_len: 256,
                f_cutoff: rubato::calculate_cutoff(256, WindowFunction::BlackmanHarris2),
                interpolation: SincInterpolationType::Cubic,
                oversampling_factor: 256,
                window: WindowFunction::BlackmanHarris2,
            };
            Some(
                SincFixedIn::new(ratio, 1.0, params, RESAMPLE_BLOCK, 2).map_err(|e| {
                    invalid(path, format!("cannot resample {from} Hz to {to} Hz: {e}"))
                })?,
            )
        };
        Ok(Output {
            path,
            resampler,
            pending: [Vec::new(), Vec::new()],
            frames_in: 0,
            ratio,
            audio: Stereo::default(),
        })
    }

    fn push_interleaved(&mut self, samples: &[f32], channels: usize) -> Result<()> {
        let frames = samples.len() / channels;
        self.frames_in += frames;
        let [l, r] = if self.resampler.is_some() {
            &mut self.pending
        } else {
            let Stereo { left, right } = &mut self.audio;
            // No resampling: straight into the result.
            for f in samples.chunks_exact(channels) {
                left.push(f[0]);
                right.push(f[channels - 1]);
            }
            return Ok(());
        };
        for f in samples.chunks_exact(channels) {
            l.push(f[0]);
            r.push(f[channels - 1]);
        }
        self.drain(false)
    }

    /// Resamples the pending input in whole blocks (all of it when `last`).
    fn drain(&mut self, last: bool) -> Result<()> {
        let expected = self.expected();
        let Some(resampler) = &mut self.resampler else {
            return Ok(());
        };
        loop {
            let need = resampler.input_frames_next();
            let have = self.pending[0].len();
            let produced = if have >= need {
                let out = resampler
                    .process(&[&self.pending[0][..need], &self.pending[1][..need]], None)
                    .map_err(|e| invalid(self.path, format!("resampling failed: {e}")))?;
                for p in &mut self.pending {
                    p.drain(..need);
                }
                out
            } else if last {
                let out = if have > 0 {
                    resampler
                        .process_partial(Some(&[&self.pending[0][..], &self.pending[1][..]]), None)
                } else {
                    resampler.process_partial::<&[f32]>(None, None)
                }
                .map_err(|e| invalid(self.path, format!("resampling failed: {e}")))?;
                for p in &mut self.pending {
                    p.clear();
                }
                out
            } else {
                return Ok(());
            };
            self.audio.left.extend_from_slice(&produced[0]);
            self.audio.right.extend_from_slice(&produced[1]);
            if last && self.audio.left.len() >= expected {
                return Ok(());
            }
        }
    }

    fn expected(&self) -> usize {
        (self.frames_in as f64 * self.ratio).round() as usize
    }

    fn finish(mut self) -> Result<Stereo> {
        if self.resampler.is_some() {
            self.drain(true)?;
            let n = self.expected();
            self.audio.left.truncate(n);
            self.audio.right.truncate(n);
        }
        Ok(self.audio)
    }
}
