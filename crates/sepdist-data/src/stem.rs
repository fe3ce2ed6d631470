//! MUSDB18 `.stem.mp4` files: `ROOT/{train,test}/<track>.stem.mp4`, one MP4 with five AAC
//! streams in the order mixture, drums, bass, other, vocals.
//!
//! AAC cannot be seeked sample-exactly and cheaply, so training does not read these files
//! directly: [`wav_cache`] decodes every file once into the MUSDB18-HQ WAV layout under
//! `ROOT/.sepdist-wav-cache/<rate>/` (32-bit float), and the WAV reader seeks in that.
//! [`convert_dataset`] (`sepdist data convert`) writes the same layout anywhere.
//!
//! Encoder delay: each stream's MP4 edit list is applied (symphonia 0.5 ignores it), so the
//! AAC priming frames are dropped and the padding of the last packet is cut: the decoded
//! streams have the original length (to the precision of the movie timescale, 1 ms in files
//! written by ffmpeg) and start where the original audio started. Files without an edit list
//! are decoded whole.

use crate::decode::{Decoded, decode_track};
use crate::error::{DataError, Result};
use crate::musdb::MIXTURE;
use crate::wav::{self, SampleFormat};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The streams of a `.stem.mp4`, in file order.
pub const STREAMS: [&str; 5] = [MIXTURE, "drums", "bass", "other", "vocals"];

/// File name suffix of a stem file.
pub const SUFFIX: &str = ".stem.mp4";

/// Folder of the WAV cache inside the dataset root.
pub const CACHE_DIR: &str = ".sepdist-wav-cache";

/// Track name of a stem file: its file name without `.stem.mp4`.
pub fn track_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.strip_suffix(SUFFIX) {
        Some(stem) => stem.to_string(),
        None => name,
    }
}

/// The `.stem.mp4` files of a split folder, sorted by name (empty when it does not exist).
pub fn stem_files(split: &Path) -> Result<Vec<PathBuf>> {
    if !split.is_dir() {
        return Ok(Vec::new());
    }
    let entries = std::fs::read_dir(split).map_err(|e| DataError::io(split, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| DataError::io(split, e))?.path();
        let is_stem = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(SUFFIX));
        if is_stem && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Whether `ROOT/train` holds `.stem.mp4` files (what `format: auto` looks for).
pub fn is_stem_dataset(root: &Path) -> bool {
    stem_files(&root.join("train")).is_ok_and(|f| !f.is_empty())
}

/// Position of a MUSDB stream name in the file; an error for any other name.
pub fn stream_index(name: &str) -> Result<usize> {
    STREAMS.iter().position(|s| *s == name).ok_or_else(|| {
        DataError::Argument(format!(
            "source `{name}` is not a MUSDB18 stream; a .stem.mp4 holds {}",
            STREAMS.join(", ")
        ))
    })
}

/// Decodes the stream called `name` (mixture, drums, bass, other or vocals) of a stem file,
/// as stereo at `target_rate` Hz. A file with too few streams is an error naming it.
pub fn read_stream(path: &Path, name: &str, target_rate: u32) -> Result<Decoded> {
    let index = stream_index(name)?;
    let trims = crate::mp4::edit_trims(path)?;
    read_index(path, name, index, target_rate, &trims)
}

fn read_index(
    path: &Path,
    name: &str,
    index: usize,
    target_rate: u32,
    trims: &[crate::decode::Trim],
) -> Result<Decoded> {
    let (_, ids) = crate::decode::open_format(path)?;
    if ids.len() <= index {
        return Err(DataError::Invalid {
            path: path.to_path_buf(),
            what: format!(
                "no `{name}` stream: the file has {} audio streams, a .stem.mp4 has 5 ({})",
                ids.len(),
                STREAMS.join(", ")
            ),
        });
    }
    decode_track(path, Some(index), target_rate, trims)
}

/// Decodes all five streams of a stem file, in the order of [`STREAMS`].
pub fn read_stems(path: &Path, target_rate: u32) -> Result<Vec<Decoded>> {
    let trims = crate::mp4::edit_trims(path)?;
    STREAMS
        .iter()
        .enumerate()
        .map(|(i, name)| read_index(path, name, i, target_rate, &trims))
        .collect()
}

/// Writes the WAVs of one stem file into `dir` (the MUSDB18-HQ track folder), atomically:
/// everything goes into a temporary sibling folder that is renamed at the end, so a crash or
/// a bad stream never leaves a half-written track. `streams`: names to write (the mixture is
/// always written). An existing `dir` is replaced.
pub fn convert_track(
    src: &Path,
    dir: &Path,
    streams: &[String],
    sample_rate: u32,
    format: SampleFormat,
) -> Result<()> {
    let mut names: Vec<&str> = vec![MIXTURE];
    for s in streams {
        stream_index(s)?;
        if !names.contains(&s.as_str()) {
            names.push(s);
        }
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
    // The temporary folder sits next to the split folder (same file system, so the rename is
    // atomic), not inside it, where it would be listed as a track; the pid keeps concurrent
    // converters apart.
    let split = parent
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.parent().unwrap_or(parent).join(format!(
        ".sepdist-tmp-{}-{split}-{}",
        std::process::id(),
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    ));
    let result = write_streams(src, &tmp, &names, sample_rate, format).and_then(|()| {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| DataError::io(dir, e))
    });
    if result.is_err() {
        // Best effort: the temporary folder is ours and useless after a failure.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_streams(
    src: &Path,
    tmp: &Path,
    names: &[&str],
    sample_rate: u32,
    format: SampleFormat,
) -> Result<()> {
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).map_err(|e| DataError::io(tmp, e))?;
    }
    std::fs::create_dir_all(tmp).map_err(|e| DataError::io(tmp, e))?;
    let trims = crate::mp4::edit_trims(src)?;
    // One stream at a time, so only one decoded stream is in memory.
    for name in names {
        let decoded = read_index(src, name, stream_index(name)?, sample_rate, &trims)?;
        wav::write(
            &tmp.join(format!("{name}.wav")),
            &decoded.audio,
            sample_rate,
            format,
        )?;
    }
    Ok(())
}

/// Whether `dir` holds every WAV of `names`, each at least as new as `src`.
fn up_to_date(src: &Path, dir: &Path, names: &[&str]) -> bool {
    let modified = |p: &Path| -> Option<SystemTime> { std::fs::metadata(p).ok()?.modified().ok() };
    let Some(source) = modified(src) else {
        return false;
    };
    names.iter().all(|n| {
        let wav = dir.join(format!("{n}.wav"));
        modified(&wav).is_some_and(|t| t >= source) && wav::info(&wav).is_ok()
    })
}

/// What [`convert_dataset`] and [`wav_cache`] did.
#[derive(Debug, Default)]
pub struct ConvertReport {
    pub converted: usize,
    /// Tracks whose output was already there.
    pub skipped: usize,
    /// One error per track that failed, naming its file.
    pub failed: Vec<DataError>,
}

/// Progress of one track: index (from 1), count, `split/name`, and the outcome.
pub enum Progress<'a> {
    Converted,
    Skipped,
    Failed(&'a DataError),
}

/// Converts every `SRC/{train,test}/*.stem.mp4` into `DST/{split}/<track>/{mixture,drums,bass,
/// other,vocals}.wav` at `sample_rate`. Tracks whose WAVs exist and are newer than their stem
/// file are skipped unless `force`. A failing track is recorded and the others continue.
/// Errors: `SRC/train` is not a folder, or a split cannot be listed.
pub fn convert_dataset(
    src: &Path,
    dst: &Path,
    sample_rate: u32,
    format: SampleFormat,
    force: bool,
    mut progress: impl FnMut(usize, usize, &str, Progress<'_>),
) -> Result<ConvertReport> {
    let train = src.join("train");
    if !train.is_dir() {
        return Err(DataError::NoTracks {
            path: train,
            split: "train (.stem.mp4)",
        });
    }
    let all: Vec<String> = STREAMS[1..].iter().map(|s| s.to_string()).collect();
    let mut jobs = Vec::new();
    for split in ["train", "test"] {
        for file in stem_files(&src.join(split))? {
            jobs.push((split, file));
        }
    }
    let mut report = ConvertReport::default();
    for (i, (split, file)) in jobs.iter().enumerate() {
        let name = track_name(file);
        let dir = dst.join(split).join(&name);
        let label = format!("{split}/{name}");
        if !force && up_to_date(file, &dir, &STREAMS) {
            report.skipped += 1;
            progress(i + 1, jobs.len(), &label, Progress::Skipped);
            continue;
        }
        match convert_track(file, &dir, &all, sample_rate, format) {
            Ok(()) => {
                report.converted += 1;
                progress(i + 1, jobs.len(), &label, Progress::Converted);
            }
            Err(e) => {
                progress(i + 1, jobs.len(), &label, Progress::Failed(&e));
                report.failed.push(e);
            }
        }
    }
    Ok(report)
}

/// The WAV cache of a stem dataset: `ROOT/.sepdist-wav-cache/<sample_rate>` in the MUSDB18-HQ
/// layout, built on first use (reported once on stderr) and rebuilt per track when the
/// `.stem.mp4` is newer than its WAVs. The rate is part of the path, so changing
/// `dataset.sample_rate` never reads stale audio. All five streams are cached whatever
/// `sources` is; `sources` must be MUSDB stream names. Tracks that fail to decode are left out
/// of the cache (a stale copy is removed) and returned, each error naming its file.
pub fn wav_cache(
    root: &Path,
    sources: &[String],
    sample_rate: u32,
) -> Result<(PathBuf, Vec<DataError>)> {
    for s in sources {
        stream_index(s)?;
    }
    let cache = root.join(CACHE_DIR).join(sample_rate.to_string());
    let all: Vec<String> = STREAMS[1..].iter().map(|s| s.to_string()).collect();
    let mut failed = Vec::new();
    let mut announced = false;
    for split in ["train", "test"] {
        let split_dir = root.join(split);
        if split == "train" && !split_dir.is_dir() {
            return Err(DataError::NoTracks {
                path: split_dir,
                split: "train (.stem.mp4)",
            });
        }
        // The cache split folder must exist for the WAV reader even when it stays empty.
        let out = cache.join(split);
        if split_dir.is_dir() {
            std::fs::create_dir_all(&out).map_err(|e| DataError::io(&out, e))?;
        }
        let files = stem_files(&split_dir)?;
        prune(&out, &files)?;
        for file in files {
            let dir = out.join(track_name(&file));
            if up_to_date(&file, &dir, &STREAMS) {
                continue;
            }
            if !announced {
                eprintln!(
                    "decoding the .stem.mp4 files of {} once into the WAV cache {} (AAC cannot be seeked sample-exactly)",
                    root.display(),
                    cache.display()
                );
                announced = true;
            }
            if let Err(e) = convert_track(&file, &dir, &all, sample_rate, SampleFormat::F32) {
                // A stale copy of a track whose source changed and no longer decodes must not
                // be trained on.
                if dir.exists() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                failed.push(e);
            }
        }
    }
    Ok((cache, failed))
}

/// Removes cached track folders whose `.stem.mp4` is gone, so they are not trained on.
fn prune(out: &Path, files: &[PathBuf]) -> Result<()> {
    if !out.is_dir() {
        return Ok(());
    }
    let names: Vec<String> = files.iter().map(|f| track_name(f)).collect();
    for dir in crate::musdb::track_dirs(out)? {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !names.contains(&name) {
            std::fs::remove_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
        }
    }
    Ok(())
}
