//! Whole-track iteration for validation and test: fixed-length chunks of mixture and stems.
//! Every chunk has exactly `chunk_length` frames; the last chunk of a track is zero-padded and
//! reports its true length in [`Chunk::valid_frames`], so chunks batch without ragged shapes.

use crate::error::{DataError, Result};
use crate::musdb::Track;
use crate::wav;

/// One chunk of one track: `mixture [2, N]`, `stems [S, 2, N]` with `N = chunk_length`.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub track: String,
    /// Chunk number within the track, from 0.
    pub index: usize,
    /// First frame of the chunk in the track.
    pub start: usize,
    /// Frames that are audio; the rest (to `frames`) are zero padding.
    pub valid_frames: usize,
    pub frames: usize,
    /// Chunks of this track in all.
    pub chunks_in_track: usize,
    pub mixture: Vec<f32>,
    pub stems: Vec<f32>,
}

/// Iterator over the chunks of a list of tracks, in track order then chunk order. A read error
/// is yielded as `Err` (naming the file) and iteration continues with the next chunk.
#[derive(Debug, Clone)]
pub struct ChunkIter {
    tracks: Vec<Track>,
    sample_rate: u32,
    chunk: usize,
    track: usize,
    index: usize,
}

impl ChunkIter {
    /// `tracks` usually [`crate::Musdb::valid`] or [`crate::Musdb::test`]; `chunk_length > 0`.
    pub fn new(tracks: Vec<Track>, sample_rate: u32, chunk_length: usize) -> Result<ChunkIter> {
        if chunk_length == 0 {
            return Err(DataError::Argument("chunk length must be positive".into()));
        }
        Ok(ChunkIter {
            tracks,
            sample_rate,
            chunk: chunk_length,
            track: 0,
            index: 0,
        })
    }

    fn read(&self, track: &Track, start: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = self.chunk;
        let rate = Some(self.sample_rate);
        let mut mixture = vec![0.0; 2 * n];
        let mut stems = vec![0.0; track.stems.len() * 2 * n];
        let valid = track.frames.saturating_sub(start).min(n);
        // Files may be longer than `track.frames` (the shortest file): read only the common part.
        let (l, r) = mixture.split_at_mut(n);
        wav::read_segment_into(
            &track.mixture,
            start,
            &mut l[..valid],
            &mut r[..valid],
            rate,
        )?;
        for (path, stem) in track.stems.iter().zip(stems.chunks_exact_mut(2 * n)) {
            let (l, r) = stem.split_at_mut(n);
            wav::read_segment_into(path, start, &mut l[..valid], &mut r[..valid], rate)?;
        }
        Ok((mixture, stems))
    }
}

impl Iterator for ChunkIter {
    type Item = Result<Chunk>;

    fn next(&mut self) -> Option<Result<Chunk>> {
        loop {
            let track = self.tracks.get(self.track)?;
            let chunks = track.frames.div_ceil(self.chunk);
            if self.index >= chunks {
                self.track += 1;
                self.index = 0;
                continue;
            }
            let index = self.index;
            self.index += 1;
            let start = index * self.chunk;
            let result = self.read(track, start).map(|(mixture, stems)| Chunk {
                track: track.name.clone(),
                index,
                start,
                valid_frames: track.frames.saturating_sub(start).min(self.chunk),
                frames: self.chunk,
                chunks_in_track: chunks,
                mixture,
                stems,
            });
            return Some(result);
        }
    }
}
