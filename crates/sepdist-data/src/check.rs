//! `sepdist data check`: every problem of a MUSDB18-HQ-layout dataset, each with its path.
//! Every file is decoded to its last sample (a truncated file often has an intact header), so
//! this reads the whole dataset once.

use crate::error::DataError;
use crate::musdb::{MIXTURE, track_dirs, validate_sources};
use crate::wav;
use std::fmt;
use std::path::{Path, PathBuf};

/// One problem found by [`check_dataset`]. Displays as `PATH: description`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    pub kind: ProblemKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemKind {
    MissingRoot,
    MissingTrainSplit,
    EmptySplit,
    /// A source or the mixture has no file in a track folder.
    MissingFile,
    /// The file cannot be opened or its header is not a supported WAV.
    Unreadable(String),
    /// Fewer frames decode than the header promises.
    Truncated {
        header_frames: usize,
        decoded_frames: usize,
        detail: String,
    },
    SampleRate {
        found: u32,
        expected: u32,
    },
    /// Frame count differs from the track's reference file (the mixture when readable).
    LengthMismatch {
        frames: usize,
        reference: PathBuf,
        reference_frames: usize,
    },
    /// The mixture is all zeros.
    Silent,
    /// The arguments themselves (source list) are unusable.
    InvalidArgument(String),
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProblemKind::MissingRoot => write!(f, "dataset root does not exist"),
            ProblemKind::MissingTrainSplit => write!(f, "missing `train` folder"),
            ProblemKind::EmptySplit => write!(f, "split holds no track folders"),
            ProblemKind::MissingFile => write!(f, "missing file"),
            ProblemKind::Unreadable(why) => write!(f, "unreadable WAV: {why}"),
            ProblemKind::Truncated {
                header_frames,
                decoded_frames,
                detail,
            } => write!(
                f,
                "truncated WAV: header promises {header_frames} frames, decoding stopped after {decoded_frames} ({detail})"
            ),
            ProblemKind::SampleRate { found, expected } => {
                write!(f, "sample rate {found} Hz, expected {expected} Hz")
            }
            ProblemKind::LengthMismatch {
                frames,
                reference,
                reference_frames,
            } => write!(
                f,
                "length {frames} frames differs from {} ({reference_frames} frames)",
                reference.display()
            ),
            ProblemKind::Silent => write!(f, "mixture is silent (every sample is zero)"),
            ProblemKind::InvalidArgument(why) => write!(f, "{why}"),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.kind)
    }
}

/// Checks `root/{train,test}/<track>/{mixture,<sources>}.wav`, or the `.stem.mp4` files of a
/// split without track folders (each decoded whole: unreadable files, missing streams, length
/// mismatches between streams, silent mixtures; any rate is fine, it is resampled). Returns every problem found
/// (empty when the dataset is sound), in path order; never stops at the first one. A missing
/// `test` folder is not a problem (small synthetic sets have none); an empty one is.
pub fn check_dataset(root: &Path, sources: &[String], sample_rate: u32) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut add = |path: &Path, kind| {
        problems.push(Problem {
            path: path.to_path_buf(),
            kind,
        })
    };
    if let Err(e) = validate_sources(sources) {
        add(root, ProblemKind::InvalidArgument(e.to_string()));
        return problems;
    }
    if !root.is_dir() {
        add(root, ProblemKind::MissingRoot);
        return problems;
    }
    for split in ["train", "test"] {
        let dir = root.join(split);
        if !dir.is_dir() {
            if split == "train" {
                add(&dir, ProblemKind::MissingTrainSplit);
            }
            continue;
        }
        // A MUSDB18 `.stem.mp4` split (no track folders) is checked file by file.
        let stems = crate::stem::stem_files(&dir).unwrap_or_default();
        match track_dirs(&dir) {
            Err(e) => add(&dir, ProblemKind::Unreadable(message(&e))),
            Ok(tracks) if tracks.is_empty() && !stems.is_empty() => {
                for file in stems {
                    check_stem_file(&file, sources, sample_rate, &mut add);
                }
            }
            Ok(tracks) if tracks.is_empty() => add(&dir, ProblemKind::EmptySplit),
            Ok(tracks) => {
                for track in tracks {
                    check_track(&track, sources, sample_rate, &mut add);
                }
            }
        }
    }
    problems
}

/// The error text without the path (the problem carries the path).
fn message(e: &DataError) -> String {
    match e {
        DataError::Io { source, .. } => source.to_string(),
        DataError::Wav { source, .. } => source.to_string(),
        DataError::Channels { channels, .. } => {
            format!("{channels} channels; only mono and stereo are supported")
        }
        DataError::Invalid { what, .. } => what.clone(),
        other => other.to_string(),
    }
}

fn check_track(
    dir: &Path,
    sources: &[String],
    sample_rate: u32,
    add: &mut impl FnMut(&Path, ProblemKind),
) {
    // (path, header frames) of every file whose header could be read.
    let mut lengths: Vec<(PathBuf, usize)> = Vec::new();
    for name in std::iter::once(MIXTURE).chain(sources.iter().map(String::as_str)) {
        let path = dir.join(format!("{name}.wav"));
        if !path.is_file() {
            add(&path, ProblemKind::MissingFile);
            continue;
        }
        if let Some(why) = not_a_wav(&path) {
            add(&path, ProblemKind::Unreadable(why));
            continue;
        }
        let mut nonzero = false;
        let scanned = wav::scan(&path, |l, r| nonzero |= l != 0.0 || r != 0.0);
        match scanned {
            Err(e) => add(&path, ProblemKind::Unreadable(message(&e))),
            Ok((info, decoded)) => {
                if info.sample_rate != sample_rate {
                    add(
                        &path,
                        ProblemKind::SampleRate {
                            found: info.sample_rate,
                            expected: sample_rate,
                        },
                    );
                }
                match decoded {
                    Err((done, e)) => add(
                        &path,
                        ProblemKind::Truncated {
                            header_frames: info.frames,
                            decoded_frames: done,
                            detail: message(&e),
                        },
                    ),
                    Ok(_) if name == MIXTURE && !nonzero => add(&path, ProblemKind::Silent),
                    Ok(_) => {}
                }
                lengths.push((path, info.frames));
            }
        }
    }
    if let Some((reference, reference_frames)) = lengths.first().cloned() {
        for (path, frames) in &lengths[1..] {
            if *frames != reference_frames {
                add(
                    path,
                    ProblemKind::LengthMismatch {
                        frames: *frames,
                        reference: reference.clone(),
                        reference_frames,
                    },
                );
            }
        }
    }
}

/// Why a `.wav` file is plainly not a WAV (empty, too short, another format), in words more
/// useful than the decoder's; `None` when it starts like one.
fn not_a_wav(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut head = Vec::with_capacity(12);
    let read = std::fs::File::open(path).and_then(|f| f.take(12).read_to_end(&mut head));
    if read.is_err() {
        return None; // The decoder reports the I/O error.
    }
    if head.is_empty() {
        return Some("empty file (0 bytes)".into());
    }
    if head.starts_with(b"RIFF") && head.get(8..12).is_none_or(|w| w == b"WAVE") {
        return (head.len() < 12)
            .then(|| format!("too short for a WAV header ({} bytes)", head.len()));
    }
    let format = if head.starts_with(b"fLaC") {
        "a FLAC file"
    } else if head.starts_with(b"ID3")
        || (head[0] == 0xFF && head.get(1).is_some_and(|b| b & 0xE0 == 0xE0))
    {
        "an MP3 file"
    } else if head.get(4..8) == Some(b"ftyp") {
        "an MP4/M4A file"
    } else if head.starts_with(b"OggS") {
        "an Ogg file"
    } else if head.starts_with(b"RIFF") {
        "a RIFF file of another kind"
    } else {
        "no RIFF/WAVE header"
    };
    Some(format!("not a WAV file ({format}); convert it to WAV"))
}

fn check_stem_file(
    path: &Path,
    sources: &[String],
    sample_rate: u32,
    add: &mut impl FnMut(&Path, ProblemKind),
) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        add(path, ProblemKind::Unreadable("empty file (0 bytes)".into()));
        return;
    }
    let mut frames: Vec<(String, usize)> = Vec::new();
    for name in std::iter::once(MIXTURE).chain(sources.iter().map(String::as_str)) {
        match crate::stem::read_stream(path, name, sample_rate) {
            Err(e) => {
                add(
                    path,
                    ProblemKind::Unreadable(format!("{name}: {}", message(&e))),
                );
                // Every further stream of an unreadable file fails the same way.
                if !matches!(e, DataError::Invalid { ref what, .. } if what.starts_with("no `")) {
                    return;
                }
            }
            Ok(d) => {
                let silent = d.audio.left.iter().chain(&d.audio.right).all(|&x| x == 0.0);
                if name == MIXTURE && silent {
                    add(path, ProblemKind::Silent);
                }
                frames.push((name.to_string(), d.audio.frames()));
            }
        }
    }
    if let Some((reference, reference_frames)) = frames.first().cloned() {
        for (name, n) in &frames[1..] {
            if *n != reference_frames {
                add(
                    path,
                    ProblemKind::Unreadable(format!(
                        "stream `{name}` has {n} frames, `{reference}` {reference_frames}"
                    )),
                );
            }
        }
    }
}
