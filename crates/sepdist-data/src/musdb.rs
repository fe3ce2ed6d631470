//! The MUSDB18-HQ layout: `ROOT/{train,test}/<track>/{mixture,<source>...}.wav`, and MUSDB18
//! `.stem.mp4` datasets through a WAV cache in that layout ([`crate::stem`]).
//!
//! Opening reads headers only. Tracks are sorted by folder name, so track indices (and hence
//! the sampler's draws) are the same on every machine. The validation subset is the train
//! tracks named in `dataset.validation_tracks`; they are removed from the training list.

use crate::error::{DataError, Result};
use crate::wav;
use sepdist_config::{DatasetConfig, DatasetFormat};
use std::path::{Path, PathBuf};

/// File stem of the mixture in each track folder.
pub const MIXTURE: &str = "mixture";

/// One track folder with the paths of its files.
#[derive(Debug, Clone, PartialEq)]
pub struct Track {
    pub name: String,
    pub dir: PathBuf,
    pub mixture: PathBuf,
    /// One path per source, in the order of `dataset.sources`.
    pub stems: Vec<PathBuf>,
    /// Frames present in every file of the track (the shortest of mixture and stems).
    pub frames: usize,
}

impl Track {
    /// Paths of a track folder (no file access).
    pub fn at(dir: &Path, sources: &[String]) -> Track {
        let wav = |stem: &str| dir.join(format!("{stem}.wav"));
        Track {
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            dir: dir.to_path_buf(),
            mixture: wav(MIXTURE),
            stems: sources.iter().map(|s| wav(s)).collect(),
            frames: 0,
        }
    }
}

/// An opened dataset: the three track lists plus the tracks that were skipped.
#[derive(Debug)]
pub struct Musdb {
    pub root: PathBuf,
    pub sources: Vec<String>,
    pub sample_rate: u32,
    /// Train split minus the validation tracks.
    pub train: Vec<Track>,
    /// Train tracks named in the validation list, in name order.
    pub valid: Vec<Track>,
    /// Test split; empty when `ROOT/test` does not exist.
    pub test: Vec<Track>,
    /// Tracks left out because a header could not be read or did not match (missing file,
    /// wrong sample rate, more than two channels); each error names its file.
    pub skipped: Vec<DataError>,
}

impl Musdb {
    /// Opens `root`. Errors: `ROOT/train` (or an existing `ROOT/test`) cannot be listed.
    /// Empty lists are not errors here (evaluation needs no training tracks); the sampler
    /// refuses an empty training list. Unusable tracks are skipped (listed in `skipped` and printed once to stderr) so that one
    /// bad track does not stop a training run.
    pub fn open(
        root: &Path,
        sources: &[String],
        sample_rate: u32,
        validation_tracks: &[String],
    ) -> Result<Musdb> {
        validate_sources(sources)?;
        let (all_train, mut skipped) = list_split(&root.join("train"), sources, sample_rate)?;
        let test_dir = root.join("test");
        let test = if test_dir.is_dir() {
            let (test, bad) = list_split(&test_dir, sources, sample_rate)?;
            skipped.extend(bad);
            test
        } else {
            Vec::new()
        };
        for e in &skipped {
            eprintln!("warning: skipping track: {e}");
        }
        let (valid, train): (Vec<Track>, Vec<Track>) = all_train
            .into_iter()
            .partition(|t| validation_tracks.contains(&t.name));
        Ok(Musdb {
            root: root.to_path_buf(),
            sources: sources.to_vec(),
            sample_rate,
            train,
            valid,
            test,
            skipped,
        })
    }

    /// [`Musdb::open`] with `dataset.root`, `sources`, `sample_rate` and `validation_tracks`.
    /// With `format: synthetic` and no `ROOT/train`, the dataset of `dataset.synthetic` is
    /// generated first, so the quickstart needs no download.
    pub fn from_config(cfg: &DatasetConfig) -> Result<Musdb> {
        match cfg.format {
            DatasetFormat::Synthetic if !cfg.root.join("train").exists() => {
                let s = &cfg.synthetic;
                let summary = crate::synth::generate(
                    &cfg.root,
                    s.tracks,
                    s.seconds,
                    s.seed,
                    cfg.sample_rate,
                    &cfg.sources,
                )?;
                eprintln!(
                    "generated the synthetic dataset in {} ({} train, {} test tracks)",
                    summary.root.display(),
                    summary.train.len(),
                    summary.test.len()
                );
            }
            DatasetFormat::StemMp4 => return Musdb::open_stem_mp4(cfg),
            DatasetFormat::Auto if crate::stem::is_stem_dataset(&cfg.root) => {
                return Musdb::open_stem_mp4(cfg);
            }
            _ => {}
        }
        Musdb::open(
            &cfg.root,
            &cfg.sources,
            cfg.sample_rate,
            &cfg.validation_tracks,
        )
    }
}

impl Musdb {
    /// A `.stem.mp4` dataset, read through its WAV cache (see [`crate::stem::wav_cache`]):
    /// track paths point into the cache; `root` stays the dataset root. Files that fail to
    /// decode are skipped like unreadable WAV tracks, each error naming the `.stem.mp4`.
    fn open_stem_mp4(cfg: &DatasetConfig) -> Result<Musdb> {
        validate_sources(&cfg.sources)?;
        let (cache, failed) = crate::stem::wav_cache(&cfg.root, &cfg.sources, cfg.sample_rate)?;
        for e in &failed {
            eprintln!("warning: skipping track: {e}");
        }
        let mut data = Musdb::open(
            &cache,
            &cfg.sources,
            cfg.sample_rate,
            &cfg.validation_tracks,
        )?;
        data.root = cfg.root.clone();
        data.skipped.extend(failed);
        Ok(data)
    }
}

pub(crate) fn validate_sources(sources: &[String]) -> Result<()> {
    if sources.is_empty() {
        return Err(DataError::Argument("the source list is empty".into()));
    }
    for (i, s) in sources.iter().enumerate() {
        if s.is_empty() || s.contains(['/', '\\']) || s == MIXTURE {
            return Err(DataError::Argument(format!(
                "source name `{s}` is not a usable file name"
            )));
        }
        if sources[..i].contains(s) {
            return Err(DataError::Argument(format!("source `{s}` is listed twice")));
        }
    }
    Ok(())
}

/// Track folders of one split, sorted by name (non-directory entries are ignored).
pub(crate) fn track_dirs(split: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(split).map_err(|e| DataError::io(split, e))?;
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(split, e))?;
        let path = entry.path();
        if path.is_dir() {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Reads the headers of every track of a split: usable tracks, and the errors of the others.
pub fn list_split(
    split: &Path,
    sources: &[String],
    sample_rate: u32,
) -> Result<(Vec<Track>, Vec<DataError>)> {
    let mut tracks = Vec::new();
    let mut skipped = Vec::new();
    for dir in track_dirs(split)? {
        let mut track = Track::at(&dir, sources);
        let mut frames = usize::MAX;
        let mut bad = None;
        for path in std::iter::once(&track.mixture).chain(&track.stems) {
            match wav::info(path) {
                Ok(i) if i.sample_rate != sample_rate => {
                    bad = Some(DataError::SampleRate {
                        path: path.clone(),
                        found: i.sample_rate,
                        expected: sample_rate,
                    });
                    break;
                }
                Ok(i) => frames = frames.min(i.frames),
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            }
        }
        match bad {
            Some(e) => skipped.push(e),
            None => {
                track.frames = frames;
                tracks.push(track);
            }
        }
    }
    Ok((tracks, skipped))
}
