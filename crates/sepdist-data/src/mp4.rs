//! Just enough of the ISO base media file format to read each track's edit list (`elst`).
//!
//! symphonia 0.5's MP4 demuxer ignores edit lists, so an AAC stream decodes with its encoder
//! delay (priming: 1024 frames from ffmpeg, 2112 from Apple's encoder) in front and padding to a
//! whole 1024-frame packet at the end. The edit list says which media frames form the
//! presentation; applying it restores the original length and alignment.

use crate::decode::Trim;
use crate::error::{DataError, Result};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// A `moov` box larger than this is refused (real files have a few hundred kB).
const MAX_MOOV: u64 = 64 << 20;

fn invalid(path: &Path, what: impl Into<String>) -> DataError {
    DataError::Invalid {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// One trim per `trak` box, in file order (symphonia numbers tracks the same way); a track
/// without an edit list gets the default (nothing trimmed).
pub(crate) fn edit_trims(path: &Path) -> Result<Vec<Trim>> {
    let moov = read_moov(path)?;
    let bad = |what: &str| invalid(path, format!("malformed MP4 `moov` box: {what}"));
    let mut movie_scale = 0u32;
    let mut trims = Vec::new();
    for (kind, body) in boxes(&moov).map_err(&bad)? {
        match kind {
            b"mvhd" => movie_scale = timescale(body).ok_or_else(|| bad("short mvhd"))?,
            b"trak" => trims.push(trak_trim(body, movie_scale).map_err(&bad)?),
            _ => {}
        }
    }
    Ok(trims)
}

/// The body of the top-level `moov` box.
fn read_moov(path: &Path) -> Result<Vec<u8>> {
    let io = |e| DataError::io(path, e);
    let mut f = BufReader::new(File::open(path).map_err(io)?);
    let len = f.get_ref().metadata().map_err(io)?.len();
    let mut pos = 0u64;
    while pos + 8 <= len {
        f.seek(SeekFrom::Start(pos)).map_err(io)?;
        let mut head = [0u8; 8];
        f.read_exact(&mut head).map_err(io)?;
        let mut size = u64::from(u32::from_be_bytes([head[0], head[1], head[2], head[3]]));
        let mut header = 8;
        if size == 1 {
            let mut large = [0u8; 8];
            f.read_exact(&mut large).map_err(io)?;
            size = u64::from_be_bytes(large);
            header = 16;
        } else if size == 0 {
            size = len - pos;
        }
        if size < header || pos + size > len {
            return Err(invalid(
                path,
                "not an MP4 file, or a truncated one (a box runs past the end of the file)",
            ));
        }
        if &head[4..] == b"moov" {
            if size > MAX_MOOV {
                return Err(invalid(path, "MP4 `moov` box is implausibly large"));
            }
            let mut body = vec![0u8; (size - header) as usize];
            f.read_exact(&mut body).map_err(io)?;
            return Ok(body);
        }
        pos += size;
    }
    Err(invalid(path, "not an MP4 file (no `moov` box)"))
}

/// A child box: its type and body.
type Child<'a> = (&'a [u8; 4], &'a [u8]);

/// The child boxes of a container body.
fn boxes(mut data: &[u8]) -> std::result::Result<Vec<Child<'_>>, &'static str> {
    let mut out = Vec::new();
    while data.len() >= 8 {
        let size = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let kind: &[u8; 4] = data[4..8].try_into().map_err(|_| "short box header")?;
        let (header, size) = match size {
            0 => (8, data.len()),
            1 => {
                let large = data.get(8..16).ok_or("short box header")?;
                let large = u64::from_be_bytes(large.try_into().map_err(|_| "short header")?);
                (16, usize::try_from(large).map_err(|_| "box too large")?)
            }
            n => (8, n),
        };
        if size < header || size > data.len() {
            return Err("a box runs past its parent");
        }
        out.push((kind, &data[header..size]));
        data = &data[size..];
    }
    Ok(out)
}

/// `timescale` of an `mvhd` or `mdhd` body.
fn timescale(body: &[u8]) -> Option<u32> {
    let at = if *body.first()? == 1 { 20 } else { 12 };
    Some(u32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?))
}

fn trak_trim(trak: &[u8], movie_scale: u32) -> std::result::Result<Trim, &'static str> {
    let mut media_scale = 0;
    let mut edits: Vec<(u64, i64)> = Vec::new();
    for (kind, body) in boxes(trak)? {
        match kind {
            b"mdia" => {
                for (kind, body) in boxes(body)? {
                    if kind == b"mdhd" {
                        media_scale = timescale(body).ok_or("short mdhd")?;
                    }
                }
            }
            b"edts" => {
                for (kind, body) in boxes(body)? {
                    if kind == b"elst" {
                        edits = elst(body).ok_or("short elst")?;
                    }
                }
            }
            _ => {}
        }
    }
    // Empty edits (media time -1) only delay the presentation; the stems all start together,
    // so they are ignored. The first real edit gives the priming to drop, all real edits
    // together the length to keep.
    let real: Vec<(u64, i64)> = edits.into_iter().filter(|&(_, t)| t >= 0).collect();
    let Some(&(_, start)) = real.first() else {
        return Ok(Trim::default());
    };
    if media_scale == 0 || movie_scale == 0 {
        return Err("zero timescale");
    }
    let duration: u64 = real.iter().map(|&(d, _)| d).sum();
    // A zero duration means "to the end of the media" in files written by some muxers.
    let keep = (duration > 0)
        .then(|| (u128::from(duration) * u128::from(media_scale) / u128::from(movie_scale)) as u64);
    Ok(Trim {
        skip: start as u64,
        keep,
        timescale: media_scale,
    })
}

/// `(segment duration, media time)` of every `elst` entry.
fn elst(body: &[u8]) -> Option<Vec<(u64, i64)>> {
    let version = *body.first()?;
    let count = u32::from_be_bytes(body.get(4..8)?.try_into().ok()?) as usize;
    let (entry, wide) = if version == 1 {
        (20, true)
    } else {
        (12, false)
    };
    let mut out = Vec::with_capacity(count.min(64));
    for i in 0..count {
        let e = body.get(8 + i * entry..8 + (i + 1) * entry)?;
        out.push(if wide {
            (
                u64::from_be_bytes(e[0..8].try_into().ok()?),
                i64::from_be_bytes(e[8..16].try_into().ok()?),
            )
        } else {
            (
                u64::from(u32::from_be_bytes(e[0..4].try_into().ok()?)),
                i64::from(i32::from_be_bytes(e[4..8].try_into().ok()?)),
            )
        });
    }
    Some(out)
}

/// Refuses an MP4 whose boxes, sample tables or codec descriptors claim more bytes than they
/// or the file hold, before symphonia reads it: its demuxer reserves memory from these sizes
/// and counts as they stand (a corrupt `stsz` count would reserve gigabytes), so every one of
/// them is bounded here by the box around it, and every box by the file. The media data may
/// end early (a truncated download still decodes up to the cut).
pub(crate) fn check_bounds(path: &Path) -> Result<()> {
    let io = |e| DataError::io(path, e);
    let bad = |what: &str| invalid(path, format!("malformed MP4: {what}"));
    let mut f = BufReader::new(File::open(path).map_err(io)?);
    let len = f.get_ref().metadata().map_err(io)?.len();
    let mut pos = 0u64;
    while pos + 8 <= len {
        f.seek(SeekFrom::Start(pos)).map_err(io)?;
        let mut head = [0u8; 8];
        f.read_exact(&mut head).map_err(io)?;
        let kind: [u8; 4] = [head[4], head[5], head[6], head[7]];
        let mut size = u64::from(u32::from_be_bytes([head[0], head[1], head[2], head[3]]));
        let mut header = 8;
        if size == 1 {
            let mut large = [0u8; 8];
            f.read_exact(&mut large).map_err(io)?;
            size = u64::from_be_bytes(large);
            header = 16;
        } else if size == 0 {
            size = len - pos;
        }
        if size < header {
            return Err(bad("a top-level box is smaller than its header"));
        }
        if size > len - pos {
            if &kind == b"mdat" {
                break;
            }
            return Err(bad(&format!(
                "the `{}` box runs past the end of the file (truncated?)",
                String::from_utf8_lossy(&kind)
            )));
        }
        if matches!(&kind, b"moov" | b"meta" | b"moof" | b"mfra") {
            if size > MAX_MOOV {
                return Err(bad("a metadata box is implausibly large"));
            }
            let mut body = vec![0u8; (size - header) as usize];
            f.read_exact(&mut body).map_err(io)?;
            let checked = if &kind == b"meta" {
                check_meta(&body, len, 0)
            } else {
                check_children(&body, len, 0)
            };
            checked.map_err(&bad)?;
        }
        pos += size;
    }
    Ok(())
}

/// Bounds of the boxes inside a container body (see [`check_bounds`]).
fn check_children(
    body: &[u8],
    file_len: u64,
    depth: usize,
) -> std::result::Result<(), &'static str> {
    if depth > 16 {
        return Err("boxes nested too deeply");
    }
    for (kind, body) in boxes(body)? {
        let word = |at: usize| -> std::result::Result<u64, &'static str> {
            body.get(at..at + 4)
                .map(|b| u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])))
                .ok_or("a sample table box is too short")
        };
        // `count` entries of `entry` bytes after the count at byte 4 (after version/flags).
        let table = |entry: u64| -> std::result::Result<(), &'static str> {
            let count = word(4)?;
            let room = (body.len() as u64).saturating_sub(8);
            if count.saturating_mul(entry) > room {
                return Err("a sample table counts more entries than its box holds");
            }
            Ok(())
        };
        match kind {
            b"moov" | b"trak" | b"mdia" | b"minf" | b"stbl" | b"edts" | b"dinf" | b"udta"
            | b"mvex" | b"moof" | b"traf" | b"ilst" | b"mfra" | b"tref" => {
                check_children(body, file_len, depth + 1)?
            }
            b"meta" => check_meta(body, file_len, depth + 1)?,
            b"stsd" => check_children(body.get(8..).unwrap_or_default(), file_len, depth + 1)?,
            b"mp4a" => {
                // Sound sample entry: 28 bytes of fields (16 or 36 more in versions 1 and 2).
                let version = body
                    .get(8..10)
                    .map_or(0, |v| u16::from_be_bytes([v[0], v[1]]));
                let fields = match version {
                    1 => 44,
                    2 => 64,
                    _ => 28,
                };
                check_children(body.get(fields..).unwrap_or_default(), file_len, depth + 1)?
            }
            b"esds" => descriptors(body.get(4..).unwrap_or_default(), 0)?,
            b"stts" | b"ctts" | b"co64" => table(8)?,
            b"stsc" => table(12)?,
            b"stco" | b"stss" => table(4)?,
            b"elst" => table(if body.first() == Some(&1) { 20 } else { 12 })?,
            b"stsz" => {
                let (size, count) = (word(4)?, word(8)?);
                if size == 0 {
                    let sizes = body.get(12..).unwrap_or_default();
                    if count.saturating_mul(4) > sizes.len() as u64 {
                        return Err("`stsz` counts more samples than its box holds");
                    }
                    let too_big = sizes.chunks_exact(4).take(count as usize).any(|s| {
                        u64::from(u32::from_be_bytes([s[0], s[1], s[2], s[3]])) > file_len
                    });
                    if too_big {
                        return Err("a sample is larger than the file");
                    }
                } else if size > file_len {
                    return Err("the sample size is larger than the file");
                }
            }
            b"trun" => {
                // Per-sample fields present by flag: duration, size, flags, composition offset.
                let flags = word(0)? & 0xFF_FFFF;
                let entry = [0x100, 0x200, 0x400, 0x800]
                    .iter()
                    .filter(|&&f| flags & f != 0)
                    .count() as u64
                    * 4;
                let header = 8 + 4 * u64::from(flags & 1 != 0) + 4 * u64::from(flags & 4 != 0);
                let count = word(4)?;
                if count.saturating_mul(entry.max(1)) > (body.len() as u64).saturating_sub(header) {
                    return Err("`trun` counts more samples than its box holds");
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A `meta` box: a full box (version and flags first) in ISO files, a plain container in
/// QuickTime ones.
fn check_meta(body: &[u8], file_len: u64, depth: usize) -> std::result::Result<(), &'static str> {
    check_children(body.get(4..).unwrap_or_default(), file_len, depth)
        .or_else(|_| check_children(body, file_len, depth))
}

/// MPEG-4 descriptors of an `esds` box: every length within what holds it.
fn descriptors(mut data: &[u8], depth: usize) -> std::result::Result<(), &'static str> {
    const OVERRUN: &str = "an `esds` descriptor runs past its box";
    if depth > 8 {
        return Err("`esds` descriptors nested too deeply");
    }
    while let Some(&tag) = data.first() {
        // Length: up to four bytes of 7 bits, high bit = more follow.
        let mut len = 0usize;
        let mut used = 1;
        loop {
            let b = *data.get(used).ok_or(OVERRUN)?;
            len = (len << 7) | usize::from(b & 0x7F);
            used += 1;
            if b & 0x80 == 0 || used > 4 {
                break;
            }
        }
        let body = data.get(used..used + len).ok_or(OVERRUN)?;
        match tag {
            // ES_Descriptor: ES_ID, flags, optional dependency, URL and OCR fields.
            3 => {
                let flags = *body.get(2).ok_or(OVERRUN)?;
                let mut at = 3;
                if flags & 0x80 != 0 {
                    at += 2;
                }
                if flags & 0x40 != 0 {
                    at += 1 + usize::from(*body.get(at).ok_or(OVERRUN)?);
                }
                if flags & 0x20 != 0 {
                    at += 2;
                }
                descriptors(body.get(at..).ok_or(OVERRUN)?, depth + 1)?;
            }
            // DecoderConfigDescriptor: 13 bytes of fields, then the decoder-specific info.
            4 => descriptors(body.get(13..).ok_or(OVERRUN)?, depth + 1)?,
            _ => {}
        }
        data = &data[used + len..];
    }
    Ok(())
}
