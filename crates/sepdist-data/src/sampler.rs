//! Deterministic training examples and their assignment to steps, ranks and micro-steps.
//!
//! **Examples.** [`Sampler::example`] is a pure function of `(seed, epoch, index)`: a ChaCha
//! generator keyed by those numbers draws, in a fixed order, the track and offset of every stem
//! (one track and offset for all stems without `augment.remix`), then per stem a gain uniform in
//! `augment.gain`, a channel swap and a polarity flip (each with probability 1/2, applied when
//! enabled). The mixture is the `f32` sum of the augmented stems in source order. No state is
//! shared between examples, so the result does not depend on which thread, rank or process
//! computes it, nor on what was computed before.
//!
//! **Bad files.** A file that fails to decode is reported once per path (stderr and
//! [`Sampler::bad_files`]) and the example is drawn again with an attempt counter folded into
//! the key: the replacement is as deterministic as the original, and every rank still gets its
//! full batch. After [`Sampler::max_attempts`] failures the example is an error.
//!
//! **Index mapping** ([`Schedule`]): with `G = batch_size × accumulation × world_size` and
//! `steps_per_epoch = ceil(samples_per_epoch / G)`, optimizer step `s` is in epoch
//! `s / steps_per_epoch` and uses in-epoch indices `[(s % steps_per_epoch)·G, … + G)`; rank `r`
//! takes the contiguous slice `[r·b·a, (r+1)·b·a)` of that window and its micro-step `m` the `b`
//! indices starting at `r·b·a + m·b`. Any split of the same global batch sees the same examples.
//! The last step of an epoch may use indices past `samples_per_epoch`; they are examples like
//! any other.

use crate::error::{DataError, Result};
use crate::musdb::{Musdb, Track};
use crate::rng::{DOMAIN_EXAMPLE, KeyedRng};
use crate::wav;
use sepdist_config::{AugmentConfig, Config};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

/// Default bound on redraws of one example when files fail to decode.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 16;

/// How global example indices are split over steps, ranks and micro-steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Examples per rank per micro-step (`b`).
    pub batch_size: usize,
    /// Micro-steps per optimizer step (`a`).
    pub accumulation: usize,
    pub world_size: usize,
    pub samples_per_epoch: usize,
}

impl Schedule {
    /// All four numbers must be positive.
    pub fn new(
        batch_size: usize,
        accumulation: usize,
        world_size: usize,
        samples_per_epoch: usize,
    ) -> Result<Schedule> {
        for (name, v) in [
            ("batch_size", batch_size),
            ("gradient_accumulation_steps", accumulation),
            ("world_size", world_size),
            ("samples_per_epoch", samples_per_epoch),
        ] {
            if v == 0 {
                return Err(DataError::Argument(format!("{name} must be positive")));
            }
        }
        Ok(Schedule {
            batch_size,
            accumulation,
            world_size,
            samples_per_epoch,
        })
    }

    /// From `training.batch_size`, `training.gradient_accumulation_steps` and
    /// `dataset.samples_per_epoch`.
    pub fn from_config(cfg: &Config, world_size: usize) -> Result<Schedule> {
        Schedule::new(
            cfg.training.batch_size,
            cfg.training.gradient_accumulation_steps,
            world_size,
            cfg.dataset.samples_per_epoch,
        )
    }

    /// `G`: examples per optimizer step over all ranks.
    pub fn global_batch(&self) -> u64 {
        (self.batch_size * self.accumulation * self.world_size) as u64
    }

    pub fn steps_per_epoch(&self) -> u64 {
        (self.samples_per_epoch as u64).div_ceil(self.global_batch())
    }

    /// `(epoch, index)` of the `batch_size` examples of `rank`'s micro-step `micro` of `step`.
    pub fn indices(&self, step: u64, rank: usize, micro: usize) -> Result<Vec<(u64, u64)>> {
        if rank >= self.world_size {
            return Err(DataError::Argument(format!(
                "rank {rank} out of range for world size {}",
                self.world_size
            )));
        }
        if micro >= self.accumulation {
            return Err(DataError::Argument(format!(
                "micro-step {micro} out of range for {} accumulation steps",
                self.accumulation
            )));
        }
        let spe = self.steps_per_epoch();
        let epoch = step / spe;
        let b = self.batch_size as u64;
        let first = (step % spe) * self.global_batch()
            + (rank * self.batch_size * self.accumulation) as u64
            + micro as u64 * b;
        Ok((first..first + b).map(|i| (epoch, i)).collect())
    }
}

/// One training example as flat buffers: `mixture [2, frames]`, `stems [S, 2, frames]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub epoch: u64,
    pub index: u64,
    pub frames: usize,
    pub mixture: Vec<f32>,
    pub stems: Vec<f32>,
}

/// A micro-batch of one rank: `mixture [b, 2, N]`, `stems [b, S, 2, N]`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub step: u64,
    pub micro: usize,
    /// `(epoch, index)` of each example, in batch order.
    pub ids: Vec<(u64, u64)>,
    pub mixture: Vec<f32>,
    pub mixture_shape: [usize; 3],
    pub stems: Vec<f32>,
    pub stems_shape: [usize; 4],
}

/// Draws training examples from a list of tracks. `Send + Sync`: share it behind an `Arc`.
#[derive(Debug)]
pub struct Sampler {
    tracks: Vec<Track>,
    n_sources: usize,
    sample_rate: u32,
    segment: usize,
    augment: AugmentConfig,
    seed: u64,
    max_attempts: u32,
    reported: Mutex<(HashSet<PathBuf>, Vec<PathBuf>)>,
}

impl Sampler {
    /// `tracks` (usually [`Musdb::train`]) must be non-empty and share one source list.
    pub fn new(
        tracks: Vec<Track>,
        sample_rate: u32,
        segment_length: usize,
        augment: AugmentConfig,
        seed: u64,
    ) -> Result<Sampler> {
        let n_sources = tracks.first().map(|t| t.stems.len()).unwrap_or(0);
        if tracks.is_empty() || n_sources == 0 {
            return Err(DataError::Argument(
                "the sampler needs at least one track with at least one source".into(),
            ));
        }
        if let Some(t) = tracks.iter().find(|t| t.stems.len() != n_sources) {
            return Err(DataError::Invalid {
                path: t.dir.clone(),
                what: format!("{} stems, expected {n_sources}", t.stems.len()),
            });
        }
        if segment_length == 0 {
            return Err(DataError::Argument(
                "segment_length must be positive".into(),
            ));
        }
        let [lo, hi] = augment.gain;
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return Err(DataError::Argument(format!(
                "augment.gain must be [min, max] with min <= max, got [{lo}, {hi}]"
            )));
        }
        Ok(Sampler {
            tracks,
            n_sources,
            sample_rate,
            segment: segment_length,
            augment,
            seed,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            reported: Mutex::new((HashSet::new(), Vec::new())),
        })
    }

    /// The training tracks of `data` with `dataset.segment_length`, `dataset.augment` and
    /// `training.seed`.
    pub fn from_config(data: &Musdb, cfg: &Config) -> Result<Sampler> {
        if data.train.is_empty() {
            return Err(DataError::NoTracks {
                path: data.root.join("train"),
                split: "usable training",
            });
        }
        Sampler::new(
            data.train.clone(),
            data.sample_rate,
            cfg.dataset.segment_length,
            cfg.dataset.augment.clone(),
            cfg.training.seed,
        )
    }

    /// Bound on draws per example (at least 1).
    pub fn with_max_attempts(mut self, attempts: u32) -> Sampler {
        self.max_attempts = attempts.max(1);
        self
    }

    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    pub fn n_sources(&self) -> usize {
        self.n_sources
    }

    pub fn segment_length(&self) -> usize {
        self.segment
    }

    /// Files that failed to decode so far, each once, in the order first seen.
    pub fn bad_files(&self) -> Vec<PathBuf> {
        self.reported
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .clone()
    }

    /// The example `(epoch, index)`; see the module docs.
    pub fn example(&self, epoch: u64, index: u64) -> Result<Example> {
        let n = self.segment;
        let mut mixture = vec![0.0; 2 * n];
        let mut stems = vec![0.0; self.n_sources * 2 * n];
        self.example_into(epoch, index, &mut mixture, &mut stems)?;
        Ok(Example {
            epoch,
            index,
            frames: n,
            mixture,
            stems,
        })
    }

    /// The micro-batch of `rank` at `(step, micro)` under `schedule`.
    pub fn batch(
        &self,
        schedule: &Schedule,
        step: u64,
        rank: usize,
        micro: usize,
    ) -> Result<Batch> {
        let ids = schedule.indices(step, rank, micro)?;
        let (b, s, n) = (ids.len(), self.n_sources, self.segment);
        let mut mixture = vec![0.0; b * 2 * n];
        let mut stems = vec![0.0; b * s * 2 * n];
        for ((&(epoch, index), mix), st) in ids
            .iter()
            .zip(mixture.chunks_exact_mut(2 * n))
            .zip(stems.chunks_exact_mut(s * 2 * n))
        {
            self.example_into(epoch, index, mix, st)?;
        }
        Ok(Batch {
            step,
            micro,
            ids,
            mixture,
            mixture_shape: [b, 2, n],
            stems,
            stems_shape: [b, s, 2, n],
        })
    }

    fn example_into(
        &self,
        epoch: u64,
        index: u64,
        mixture: &mut [f32],
        stems: &mut [f32],
    ) -> Result<()> {
        let mut attempt = 0;
        loop {
            match self.draw(epoch, index, attempt, stems) {
                Ok(()) => break,
                Err(e) => {
                    let Some(path) = e.path() else { return Err(e) };
                    self.report(path.to_path_buf(), &e, epoch, index);
                    attempt += 1;
                    if attempt >= self.max_attempts {
                        return Err(DataError::TooManyBadFiles {
                            epoch,
                            index,
                            attempts: attempt,
                            last: Box::new(e),
                        });
                    }
                }
            }
        }
        let n = self.segment;
        mixture.fill(0.0);
        for stem in stems.chunks_exact(2 * n) {
            for (m, x) in mixture.iter_mut().zip(stem) {
                *m += x;
            }
        }
        Ok(())
    }

    fn report(&self, path: PathBuf, e: &DataError, epoch: u64, index: u64) {
        let mut r = self.reported.lock().unwrap_or_else(PoisonError::into_inner);
        if r.0.insert(path.clone()) {
            eprintln!(
                "warning: {e}; example (epoch {epoch}, index {index}) and later ones using this file are redrawn"
            );
            r.1.push(path);
        }
    }

    /// Fills `stems [S, 2, N]` for one attempt. Draw order is part of the format: changing it
    /// changes every example.
    fn draw(&self, epoch: u64, index: u64, attempt: u32, stems: &mut [f32]) -> Result<()> {
        let n = self.segment;
        let mut rng = KeyedRng::new(
            DOMAIN_EXAMPLE.wrapping_add(attempt as u64),
            self.seed,
            epoch,
            index,
        );
        let n_tracks = self.tracks.len() as u64;
        let pick = |rng: &mut KeyedRng| {
            let t = &self.tracks[rng.below(n_tracks) as usize];
            let offset = rng.below(t.frames.saturating_sub(n) as u64 + 1) as usize;
            (t, offset)
        };
        let shared = pick(&mut rng);
        let [lo, hi] = self.augment.gain;
        for (s, stem) in stems.chunks_exact_mut(2 * n).enumerate() {
            let (track, offset) = if self.augment.remix && s > 0 {
                pick(&mut rng)
            } else {
                shared
            };
            let gain = rng.range_f64(lo as f64, hi as f64) as f32;
            let swap = rng.coin() && self.augment.channel_swap;
            let flip = rng.coin() && self.augment.polarity_flip;
            let (left, right) = stem.split_at_mut(n);
            let (left, right) = if swap { (right, left) } else { (left, right) };
            wav::read_segment_into(&track.stems[s], offset, left, right, Some(self.sample_rate))?;
            let g = if flip { -gain } else { gain };
            for x in stem.iter_mut() {
                *x *= g;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_maps_steps_ranks_and_micro_steps() {
        // b=2, a=2, w=2: G = 8; 20 samples per epoch -> 3 steps per epoch.
        let s = Schedule::new(2, 2, 2, 20).unwrap();
        assert_eq!((s.global_batch(), s.steps_per_epoch()), (8, 3));
        assert_eq!(s.indices(0, 0, 0).unwrap(), [(0, 0), (0, 1)]);
        assert_eq!(s.indices(0, 0, 1).unwrap(), [(0, 2), (0, 3)]);
        assert_eq!(s.indices(0, 1, 0).unwrap(), [(0, 4), (0, 5)]);
        assert_eq!(s.indices(2, 1, 1).unwrap(), [(0, 22), (0, 23)]);
        assert_eq!(s.indices(4, 1, 1).unwrap(), [(1, 14), (1, 15)]);
        assert!(s.indices(0, 2, 0).is_err());
        assert!(s.indices(0, 0, 2).is_err());
        assert!(Schedule::new(0, 1, 1, 1).is_err());
        // Every split of the same global batch covers the same indices in the same order.
        for step in 0..7 {
            let mut splits = Vec::new();
            for (b, a, w) in [(8, 1, 1), (2, 2, 2), (1, 2, 4), (4, 2, 1)] {
                let s = Schedule::new(b, a, w, 20).unwrap();
                let mut all = Vec::new();
                for r in 0..w {
                    for m in 0..a {
                        all.extend(s.indices(step, r, m).unwrap());
                    }
                }
                splits.push(all);
            }
            assert!(splits.windows(2).all(|p| p[0] == p[1]), "step {step}");
        }
    }
}
