//! Scoring separations: uSDR and museval's BSSEval v4 cSDR per track and source (see
//! [`sepdist_model::metrics`]), medians over tracks, and the `results.json` / `results.csv`
//! files. Tracks come from a checkpoint separating a MUSDB18-HQ or `.stem.mp4` split, or from existing
//! estimates in museval's `eval_dir` layout (`DIR/<track>/<source>.wav`).

use crate::infer::{ChunkOptions, InferError, Inference};
use sepdist_data::musdb::MIXTURE;
use sepdist_data::{DataError, stem, wav};
use sepdist_model::metrics::{self, Framing};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Infer(#[from] InferError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
}

pub type Result<T> = std::result::Result<T, EvalError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EvalError + '_ {
    move |source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Scores of one source of one track. `None` serialises as `null` (a cSDR with every window
/// silent).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scores {
    pub usdr: f64,
    pub csdr: Option<f64>,
    /// The same metrics of the mixture taken as the estimate: the baseline to beat.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usdr_mixture: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csdr_mixture: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrackResult {
    pub name: String,
    pub frames: usize,
    pub sources: BTreeMap<String, Scores>,
}

/// Everything written to `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Results {
    pub sample_rate: u32,
    pub sources: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    pub tracks: Vec<TrackResult>,
    /// Per source: the median over tracks of each metric.
    pub median: BTreeMap<String, BTreeMap<String, Option<f64>>>,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Scores one track. `references`, `estimates`: `[2, N]` per source, same lengths after
/// museval's `pad_or_truncate` of the estimates; `mixture` optional for the baseline.
pub fn score_track(
    name: &str,
    sources: &[String],
    references: &[Vec<f32>],
    estimates: &[Vec<f32>],
    mixture: Option<&[f32]>,
    sample_rate: u32,
) -> Result<TrackResult> {
    let invalid = |what: String| EvalError::Invalid {
        path: PathBuf::from(name),
        what,
    };
    let frames = references.first().map_or(0, |r| r.len() / 2);
    let estimates: Vec<Vec<f32>> = estimates
        .iter()
        .map(|e| metrics::pad_or_truncate(e, 2, frames))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| invalid(e.to_string()))?;
    let refs: Vec<&[f32]> = references.iter().map(Vec::as_slice).collect();
    let ests: Vec<&[f32]> = estimates.iter().map(Vec::as_slice).collect();
    let framing = Framing::seconds(sample_rate);
    let csdr = metrics::csdr(&refs, &ests, 2, framing).map_err(|e| invalid(e.to_string()))?;
    let baseline = match mixture {
        Some(m) => {
            let m = metrics::pad_or_truncate(m, 2, frames).map_err(|e| invalid(e.to_string()))?;
            let mixes: Vec<&[f32]> = vec![m.as_slice(); refs.len()];
            let c = metrics::csdr(&refs, &mixes, 2, framing).map_err(|e| invalid(e.to_string()))?;
            let u = refs
                .iter()
                .map(|r| metrics::usdr(r, &m))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| invalid(e.to_string()))?;
            Some((u, c))
        }
        None => None,
    };
    let mut out = BTreeMap::new();
    for (j, s) in sources.iter().enumerate() {
        let usdr = metrics::usdr(refs[j], ests[j]).map_err(|e| invalid(e.to_string()))?;
        out.insert(
            s.clone(),
            Scores {
                usdr,
                csdr: finite(csdr[j]),
                usdr_mixture: baseline.as_ref().map(|(u, _)| u[j]),
                csdr_mixture: baseline.as_ref().and_then(|(_, c)| finite(c[j])),
            },
        );
    }
    Ok(TrackResult {
        name: name.to_string(),
        frames,
        sources: out,
    })
}

/// Reads one metric of a source's scores.
type Metric = fn(&Scores) -> Option<f64>;

/// Builds the medians over tracks.
pub fn results(
    sample_rate: u32,
    sources: &[String],
    checkpoint: Option<PathBuf>,
    tracks: Vec<TrackResult>,
) -> Results {
    let mut median = BTreeMap::new();
    for s in sources {
        let mut m = BTreeMap::new();
        let pick: [(&str, Metric); 4] = [
            ("usdr", |x| Some(x.usdr)),
            ("csdr", |x| x.csdr),
            ("usdr_mixture", |x| x.usdr_mixture),
            ("csdr_mixture", |x| x.csdr_mixture),
        ];
        for (key, get) in pick {
            let values: Vec<f64> = tracks
                .iter()
                .filter_map(|t| t.sources.get(s).and_then(get))
                .collect();
            if !values.is_empty() {
                m.insert(key.to_string(), finite(metrics::nan_median(&values)));
            }
        }
        median.insert(s.clone(), m);
    }
    Results {
        sample_rate,
        sources: sources.to_vec(),
        checkpoint,
        tracks,
        median,
    }
}

/// Separates every track of `split` (`test` or `train`) of the MUSDB18-HQ folder `root` and
/// scores it. `progress` is called with each track's result as it is done.
pub fn evaluate_checkpoint(
    inference: &Inference,
    root: &Path,
    split: &str,
    options: &ChunkOptions,
    mut progress: impl FnMut(&TrackResult),
) -> Result<Results> {
    let sources = inference.sources().to_vec();
    let rate = inference.sample_rate();
    let split_dir = root.join(split);
    let mut done = Vec::new();
    let mut score = |name: &str, mixture: Vec<f32>, references: Vec<Vec<f32>>| -> Result<()> {
        let estimate = inference.separate(&mixture, options)?;
        let n = mixture.len() / 2;
        let estimates: Vec<Vec<f32>> = estimate.chunks_exact(2 * n).map(<[f32]>::to_vec).collect();
        drop(estimate);
        let r = score_track(
            name,
            &sources,
            &references,
            &estimates,
            Some(&mixture),
            rate,
        )?;
        progress(&r);
        done.push(r);
        Ok(())
    };
    // MUSDB18 as `.stem.mp4` files: decoded whole (evaluation reads every track once).
    let stem_files = stem::stem_files(&split_dir)?;
    if !stem_files.is_empty() {
        let indices = sources
            .iter()
            .map(|s| stem::stream_index(s))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        for path in &stem_files {
            let streams = stem::read_stems(path, rate)?;
            // AAC streams decode to lengths that may differ by a few frames: keep the common part.
            let n = streams.iter().map(|d| d.audio.frames()).min().unwrap_or(0);
            let planar = |i: usize| {
                let a = &streams[i].audio;
                let mut v = Vec::with_capacity(2 * n);
                v.extend_from_slice(&a.left[..n]);
                v.extend_from_slice(&a.right[..n]);
                v
            };
            let references = indices.iter().map(|&i| planar(i)).collect();
            score(&stem::track_name(path), planar(0), references)?;
        }
    } else {
        let (tracks, skipped) = sepdist_data::musdb::list_split(&split_dir, &sources, rate)?;
        if let Some(e) = skipped.into_iter().next() {
            return Err(e.into());
        }
        for track in &tracks {
            let mixture = wav::read(&track.mixture, Some(rate))?.to_planar();
            let references = track
                .stems
                .iter()
                .map(|p| Ok(wav::read(p, Some(rate))?.to_planar()))
                .collect::<Result<Vec<_>>>()?;
            score(&track.name, mixture, references)?;
        }
    }
    if done.is_empty() {
        return Err(DataError::NoTracks {
            path: split_dir,
            split: if split == "test" { "test" } else { "train" },
        }
        .into());
    }
    Ok(results(
        rate,
        &sources,
        Some(inference.checkpoint().to_path_buf()),
        done,
    ))
}

/// Scores existing separations: for every track folder of `references`, the sources are the
/// WAVs present in both it and the same-named folder of `estimates` (except `mixture.wav`,
/// which gives the baseline when present). Track and source order is by name.
pub fn evaluate_dirs(
    estimates: &Path,
    references: &Path,
    mut progress: impl FnMut(&TrackResult),
) -> Result<Results> {
    let mut names: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(references).map_err(io(references))? {
        let entry = entry.map_err(io(references))?;
        if entry.path().is_dir() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    if names.is_empty() {
        return Err(EvalError::Invalid {
            path: references.to_path_buf(),
            what: "no track folders".into(),
        });
    }
    let mut all_sources: Vec<String> = Vec::new();
    let mut rate = None;
    let mut done = Vec::new();
    for name in &names {
        let (ref_dir, est_dir) = (references.join(name), estimates.join(name));
        if !est_dir.is_dir() {
            return Err(EvalError::Invalid {
                path: est_dir,
                what: "no estimates for this reference track".into(),
            });
        }
        let mut sources = Vec::new();
        for entry in std::fs::read_dir(&ref_dir).map_err(io(&ref_dir))? {
            let path = entry.map_err(io(&ref_dir))?.path();
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
            if let Some(stem) = stem.filter(|s| s != MIXTURE) {
                if path.extension().is_some_and(|e| e == "wav")
                    && est_dir.join(format!("{stem}.wav")).is_file()
                {
                    sources.push(stem);
                }
            }
        }
        sources.sort();
        if sources.is_empty() {
            return Err(EvalError::Invalid {
                path: est_dir,
                what: format!("no <source>.wav in common with {}", ref_dir.display()),
            });
        }
        let track_rate = wav::info(&ref_dir.join(format!("{}.wav", sources[0])))?.sample_rate;
        let rate = *rate.get_or_insert(track_rate);
        let read = |p: PathBuf| -> Result<Vec<f32>> { Ok(wav::read(&p, Some(rate))?.to_planar()) };
        let refs = sources
            .iter()
            .map(|s| read(ref_dir.join(format!("{s}.wav"))))
            .collect::<Result<Vec<_>>>()?;
        let ests = sources
            .iter()
            .map(|s| read(est_dir.join(format!("{s}.wav"))))
            .collect::<Result<Vec<_>>>()?;
        let mix_path = ref_dir.join(format!("{MIXTURE}.wav"));
        let mixture = if mix_path.is_file() {
            Some(read(mix_path)?)
        } else {
            None
        };
        let r = score_track(name, &sources, &refs, &ests, mixture.as_deref(), rate)?;
        for s in &sources {
            if !all_sources.contains(s) {
                all_sources.push(s.clone());
            }
        }
        progress(&r);
        done.push(r);
    }
    Ok(results(rate.unwrap_or(0), &all_sources, None, done))
}

impl Results {
    /// Writes `results.json` and `results.csv` into `dir` (created); returns their paths.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let json_path = dir.join("results.json");
        let json = serde_json::to_string_pretty(self).map_err(|e| EvalError::Invalid {
            path: json_path.clone(),
            what: e.to_string(),
        })?;
        std::fs::write(&json_path, json + "\n").map_err(io(&json_path))?;
        let csv_path = dir.join("results.csv");
        std::fs::write(&csv_path, self.csv()).map_err(io(&csv_path))?;
        Ok((json_path, csv_path))
    }

    /// One row per track and source, then one `median` row per source; empty cells for
    /// missing values.
    pub fn csv(&self) -> String {
        let cell = |x: Option<f64>| x.map(|v| format!("{v:.6}")).unwrap_or_default();
        let mut out = String::from("track,source,usdr,csdr,usdr_mixture,csdr_mixture\n");
        for t in &self.tracks {
            for (s, x) in &t.sources {
                out.push_str(&format!(
                    "{},{s},{},{},{},{}\n",
                    csv_field(&t.name),
                    cell(Some(x.usdr)),
                    cell(x.csdr),
                    cell(x.usdr_mixture),
                    cell(x.csdr_mixture)
                ));
            }
        }
        for (s, m) in &self.median {
            let get = |k: &str| m.get(k).copied().flatten();
            out.push_str(&format!(
                "median,{s},{},{},{},{}\n",
                cell(get("usdr")),
                cell(get("csdr")),
                cell(get("usdr_mixture")),
                cell(get("csdr_mixture"))
            ));
        }
        out
    }
}

/// Quotes a CSV field holding a comma or a quote (MUSDB track names have commas).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
