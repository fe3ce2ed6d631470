//! A synthetic MUSDB18-HQ-shaped dataset with musically structured stems, for tests, CI and
//! quick-start runs without the 30 GB corpus.
//!
//! Each track has its own tempo, key, mode and chord progression (all drawn from the seed and
//! the track number): drums play kick/snare/hat on a sixteenth grid, the bass follows the chord
//! roots with harmonic notes, `other` plays chord pads and/or arpeggios, and the vocals sing a
//! melody with a harmonic source, vibrato and vowel formants. Stems are peak-normalised together
//! and the mixture is their exact `f32` sum, written as float32 WAV, so `mixture == Σ stems`
//! holds on the files bit for bit (up to the order of summation: sources in list order).
//! Output is a pure function of the arguments: same arguments, same bytes.

use crate::error::{DataError, Result};
use crate::musdb::{MIXTURE, validate_sources};
use crate::rng::{DOMAIN_SYNTH, KeyedRng};
use crate::wav::{self, SampleFormat, Stereo};
use std::f32::consts::PI;
use std::path::{Path, PathBuf};

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub root: PathBuf,
    pub train: Vec<String>,
    pub test: Vec<String>,
    pub sample_rate: u32,
    /// Frames per file (all files have the same length).
    pub frames: usize,
}

/// Peak of the mixture (and of every stem) after normalisation.
pub const PEAK: f32 = 0.89;

/// Name of track `i`.
pub fn track_name(i: usize) -> String {
    format!("synth_{i:03}")
}

/// Number of test tracks out of `tracks`: about a fifth, at least one when `tracks >= 2`.
pub fn test_tracks(tracks: usize) -> usize {
    if tracks < 2 {
        0
    } else {
        ((tracks + 2) / 5).max(1)
    }
}

/// Writes `tracks` tracks of `seconds` seconds to `out_dir/{train,test}/synth_NNN/` with one
/// float32 WAV per source plus `mixture.wav`. The last [`test_tracks`] tracks form `test/`
/// (no `test/` folder when there is none). Existing files of the same names are overwritten.
pub fn generate(
    out_dir: &Path,
    tracks: usize,
    seconds: f32,
    seed: u64,
    sample_rate: u32,
    sources: &[String],
) -> Result<Summary> {
    validate_sources(sources)?;
    if tracks == 0 {
        return Err(DataError::Argument(
            "synthetic dataset needs at least one track".into(),
        ));
    }
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(DataError::Argument(format!(
            "synthetic track length must be positive seconds, got {seconds}"
        )));
    }
    if sample_rate < 4000 {
        return Err(DataError::Argument(format!(
            "sample rate {sample_rate} Hz is too low for the synthesiser (minimum 4000)"
        )));
    }
    let frames = (seconds as f64 * sample_rate as f64).round().max(1.0) as usize;
    let n_test = test_tracks(tracks);
    let mut summary = Summary {
        root: out_dir.to_path_buf(),
        train: Vec::new(),
        test: Vec::new(),
        sample_rate,
        frames,
    };
    for i in 0..tracks {
        let name = track_name(i);
        let is_test = i >= tracks - n_test;
        let dir = out_dir
            .join(if is_test { "test" } else { "train" })
            .join(&name);
        std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
        let stems = render_track(seed, i as u64, frames, sample_rate, sources);
        let mixture = sum(&stems, frames);
        for (source, stem) in sources.iter().zip(&stems) {
            wav::write(
                &dir.join(format!("{source}.wav")),
                stem,
                sample_rate,
                SampleFormat::F32,
            )?;
        }
        wav::write(
            &dir.join(format!("{MIXTURE}.wav")),
            &mixture,
            sample_rate,
            SampleFormat::F32,
        )?;
        if is_test {
            summary.test.push(name);
        } else {
            summary.train.push(name);
        }
    }
    Ok(summary)
}

/// `f32` sum of the stems in list order: the definition of the mixture everywhere in the crate.
pub(crate) fn sum(stems: &[Stereo], frames: usize) -> Stereo {
    let mut mix = Stereo::zeros(frames);
    for s in stems {
        for (m, x) in mix.left.iter_mut().zip(&s.left) {
            *m += x;
        }
        for (m, x) in mix.right.iter_mut().zip(&s.right) {
            *m += x;
        }
    }
    mix
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timbre {
    Drums,
    Bass,
    Other,
    Vocals,
}

impl Timbre {
    /// Known names map to their timbre; any other source takes one by position.
    fn of(name: &str, position: usize) -> Timbre {
        match name {
            "drums" => Timbre::Drums,
            "bass" => Timbre::Bass,
            "other" => Timbre::Other,
            "vocals" => Timbre::Vocals,
            _ => [Timbre::Drums, Timbre::Bass, Timbre::Other, Timbre::Vocals][position % 4],
        }
    }

    fn level(self) -> f32 {
        match self {
            Timbre::Drums => 0.9,
            Timbre::Bass => 0.7,
            Timbre::Other => 0.35,
            Timbre::Vocals => 0.6,
        }
    }
}

const MAJOR: [i32; 7] = [0, 2, 4, 5, 7, 9, 11];
const MINOR: [i32; 7] = [0, 2, 3, 5, 7, 8, 10];
/// Chord progressions as scale degrees (0 = tonic), one chord per bar.
const PROGRESSIONS: [[usize; 4]; 6] = [
    [0, 4, 5, 3],
    [0, 5, 3, 4],
    [5, 3, 0, 4],
    [0, 3, 4, 3],
    [0, 2, 5, 4],
    [3, 4, 0, 0],
];

/// The shared musical skeleton of one track.
struct Song {
    sr: f32,
    frames: usize,
    /// Samples per sixteenth note.
    step: f32,
    key: i32,
    scale: [i32; 7],
    progression: [usize; 4],
}

impl Song {
    fn new(rng: &mut KeyedRng, frames: usize, sample_rate: u32) -> Song {
        let bpm = rng.range_f64(84.0, 144.0) as f32;
        let sr = sample_rate as f32;
        Song {
            sr,
            frames,
            step: sr * 60.0 / bpm / 4.0,
            key: rng.below(12) as i32,
            scale: if rng.coin() { MAJOR } else { MINOR },
            progression: PROGRESSIONS[rng.below(PROGRESSIONS.len() as u64) as usize],
        }
    }

    fn steps(&self) -> usize {
        (self.frames as f32 / self.step).ceil() as usize
    }

    fn at(&self, step: usize) -> usize {
        (step as f32 * self.step).round() as usize
    }

    /// Semitones above the key's tonic of scale degree `d` (any integer).
    fn degree(&self, d: i32) -> i32 {
        self.scale[d.rem_euclid(7) as usize] + 12 * d.div_euclid(7)
    }

    /// Chord degree (root) at sixteenth `step`: one chord per bar.
    fn chord_root(&self, step: usize) -> i32 {
        self.progression[(step / 16) % 4] as i32
    }

    fn hz(&self, midi: i32) -> f32 {
        440.0 * 2f32.powf((midi + self.key - 69) as f32 / 12.0)
    }
}

fn render_track(
    seed: u64,
    track: u64,
    frames: usize,
    sample_rate: u32,
    sources: &[String],
) -> Vec<Stereo> {
    let song = Song::new(
        &mut KeyedRng::new(DOMAIN_SYNTH, seed, track, 0),
        frames,
        sample_rate,
    );
    let mut stems: Vec<Stereo> = sources
        .iter()
        .enumerate()
        .map(|(pos, name)| {
            let mut rng = KeyedRng::new(DOMAIN_SYNTH, seed, track, 1 + pos as u64);
            let mut out = Stereo::zeros(frames);
            let timbre = Timbre::of(name, pos);
            match timbre {
                Timbre::Drums => drums(&song, &mut rng, &mut out),
                Timbre::Bass => bass(&song, &mut rng, &mut out),
                Timbre::Other => other(&song, &mut rng, &mut out),
                Timbre::Vocals => vocals(&song, &mut rng, &mut out),
            }
            let peak = peak(&out);
            if peak > 0.0 {
                scale(&mut out, timbre.level() / peak);
            }
            out
        })
        .collect();
    let mix_peak = peak(&sum(&stems, frames));
    let stem_peak = stems.iter().map(peak).fold(0.0, f32::max);
    let top = mix_peak.max(stem_peak);
    if top > 0.0 {
        for s in &mut stems {
            scale(s, PEAK / top);
        }
    }
    stems
}

fn peak(s: &Stereo) -> f32 {
    s.left
        .iter()
        .chain(&s.right)
        .fold(0.0f32, |m, x| m.max(x.abs()))
}

fn scale(s: &mut Stereo, g: f32) {
    for x in s.left.iter_mut().chain(s.right.iter_mut()) {
        *x *= g;
    }
}

/// Adds a mono event rendered by `f(n)` for `n in 0..len` at `start`, panned (-1 left, 1 right).
fn add(out: &mut Stereo, start: usize, len: usize, pan: f32, mut f: impl FnMut(usize) -> f32) {
    let theta = (pan.clamp(-1.0, 1.0) + 1.0) * PI / 4.0;
    let (gl, gr) = (theta.cos(), theta.sin());
    let end = (start + len).min(out.frames());
    for (n, i) in (start..end).enumerate() {
        let x = f(n);
        out.left[i] += gl * x;
        out.right[i] += gr * x;
    }
}

/// `Σ_k weights[k-1]·sin(kφ)` by the Chebyshev recurrence (one sin/cos per sample).
fn harmonics(phi: f32, weights: &[f32]) -> f32 {
    let (s1, c) = phi.sin_cos();
    let two_c = 2.0 * c;
    let (mut prev, mut cur, mut acc) = (0.0f32, s1, 0.0f32);
    for w in weights {
        acc += w * cur;
        let next = two_c * cur - prev;
        prev = cur;
        cur = next;
    }
    acc
}

/// Harmonic count below 0.45·sr, at most `cap`.
fn n_harmonics(f: f32, sr: f32, cap: usize) -> usize {
    ((0.45 * sr / f.max(1.0)) as usize).clamp(1, cap)
}

/// Linear fade over the last `fade` samples of a note of `len` samples.
fn release(n: usize, len: usize, fade: f32) -> f32 {
    ((len - n.min(len)) as f32 / fade.max(1.0)).min(1.0)
}

fn drums(song: &Song, rng: &mut KeyedRng, out: &mut Stereo) {
    let sr = song.sr;
    // A per-track pattern: extra kicks, hats on eighths or sixteenths.
    let extra_kicks: Vec<usize> = [3, 6, 10, 11, 14]
        .into_iter()
        .filter(|_| rng.f64() < 0.3)
        .collect();
    let hat_every = if rng.coin() { 1 } else { 2 };
    let hat_pan = rng.range_f64(-0.5, 0.5) as f32;
    for step in 0..song.steps() {
        let pos = step % 16;
        let start = song.at(step);
        let vel = 0.85 + 0.15 * rng.f64() as f32;
        if pos == 0 || pos == 8 || (extra_kicks.contains(&pos) && rng.f64() < 0.8) {
            let len = (0.3 * sr) as usize;
            let mut phase = 0.0f32;
            let mut click = KeyedRng::new(DOMAIN_SYNTH, rng.u64(), 0, 0);
            add(out, start, len, 0.0, |n| {
                let t = n as f32 / sr;
                phase += 2.0 * PI * (45.0 + 90.0 * (-t / 0.03).exp()) / sr;
                let body = phase.sin() * (-t / 0.12).exp();
                let c = if t < 0.003 { 0.3 * click.noise() } else { 0.0 };
                vel * (body + c) * release(n, len, 0.01 * sr)
            });
        }
        if pos == 4 || pos == 12 {
            let len = (0.2 * sr) as usize;
            let mut noise = KeyedRng::new(DOMAIN_SYNTH, rng.u64(), 1, 0);
            let mut last = 0.0f32;
            add(out, start, len, 0.1, |n| {
                let t = n as f32 / sr;
                let w = noise.noise();
                let bright = w - 0.5 * last;
                last = w;
                let tone = (2.0 * PI * 185.0 * t).sin() * (-t / 0.04).exp();
                vel * (0.5 * bright * (-t / 0.05).exp() + 0.4 * tone) * release(n, len, 0.01 * sr)
            });
        }
        if pos % hat_every == 0 {
            let open = pos == 14 && rng.f64() < 0.5;
            let decay = if open { 0.08 } else { 0.015 };
            let len = ((decay * 5.0) * sr) as usize;
            let mut noise = KeyedRng::new(DOMAIN_SYNTH, rng.u64(), 2, 0);
            let mut last = 0.0f32;
            let accent = if pos % 4 == 0 { 1.0 } else { 0.6 };
            add(out, start, len, hat_pan, |n| {
                let t = n as f32 / sr;
                let w = noise.noise();
                let high = w - last;
                last = w;
                0.2 * accent * vel * high * (-t / decay).exp()
            });
        }
    }
}

fn bass(song: &Song, rng: &mut KeyedRng, out: &mut Stereo) {
    let sr = song.sr;
    // Note grid in sixteenths: quarters or eighths, with occasional rests and fifths/octaves.
    let every = if rng.coin() { 2 } else { 4 };
    let mut step = 0;
    while step < song.steps() {
        let len_steps = every;
        if step % 16 == 0 || rng.f64() > 0.12 {
            let root = song.chord_root(step);
            let interval = match rng.below(8) {
                0 => 4, // the fifth, in scale degrees
                1 => 7, // the octave
                _ => 0,
            };
            let f = song.hz(36 + song.degree(root + interval));
            let weights: Vec<f32> = (1..=n_harmonics(f, sr, 10))
                .map(|k| (-0.35 * (k - 1) as f32).exp() / k as f32)
                .collect();
            let len = (len_steps as f32 * song.step * 0.92) as usize;
            let vel = 0.8 + 0.2 * rng.f64() as f32;
            let w = 2.0 * PI * f / sr;
            add(out, song.at(step), len, 0.0, |n| {
                let t = n as f32 / sr;
                let env = (t / 0.005).min(1.0) * (0.6 + 0.4 * (-t / 0.15).exp());
                let phi = (w * n as f32) % (2.0 * PI);
                vel * env * harmonics(phi, &weights) * release(n, len, 0.01 * sr)
            });
        }
        step += len_steps;
    }
}

fn other(song: &Song, rng: &mut KeyedRng, out: &mut Stereo) {
    let sr = song.sr;
    let style = rng.below(3); // 0 pads, 1 arpeggio, 2 both
    let detune = 1.0 + rng.range_f64(0.002, 0.006) as f32;
    let bars = song.steps().div_ceil(16);
    for bar in 0..bars {
        let root = song.chord_root(bar * 16);
        let chord: Vec<i32> = (0..3).map(|i| 60 + song.degree(root + 2 * i)).collect();
        if style != 1 {
            let start = song.at(bar * 16);
            let len = (16.0 * song.step) as usize;
            for &m in &chord {
                let f = song.hz(m);
                let weights: Vec<f32> = (1..=n_harmonics(f * detune, sr, 6))
                    .map(|k| 0.3 / k as f32)
                    .collect();
                let (wl, wr) = (2.0 * PI * f / sr, 2.0 * PI * f * detune / sr);
                let end = (start + len).min(out.frames());
                for (n, i) in (start..end).enumerate() {
                    let t = n as f32 / sr;
                    let env = (t / 0.08).min(1.0) * release(n, len, 0.15 * sr);
                    out.left[i] += env * harmonics((wl * n as f32) % (2.0 * PI), &weights);
                    out.right[i] += env * harmonics((wr * n as f32) % (2.0 * PI), &weights);
                }
            }
        }
        if style != 0 {
            let pan = if bar % 2 == 0 { -0.4 } else { 0.4 };
            for s in 0..16 {
                let m = chord[(s + s / 3) % 3] + 12;
                let f = song.hz(m);
                let weights: Vec<f32> = (1..=n_harmonics(f, sr, 6))
                    .map(|k| 0.5 / (k * k) as f32)
                    .collect();
                let len = (song.step * 1.5) as usize;
                let w = 2.0 * PI * f / sr;
                add(out, song.at(bar * 16 + s), len, pan, |n| {
                    let t = n as f32 / sr;
                    (t / 0.002).min(1.0)
                        * (-t / 0.12).exp()
                        * harmonics((w * n as f32) % (2.0 * PI), &weights)
                        * release(n, len, 0.005 * sr)
                });
            }
        }
    }
}

/// Vowel formants (Hz): F1, F2, F3.
const VOWELS: [[f32; 3]; 5] = [
    [730.0, 1090.0, 2440.0],
    [530.0, 1840.0, 2480.0],
    [270.0, 2290.0, 3010.0],
    [570.0, 840.0, 2410.0],
    [300.0, 870.0, 2240.0],
];

fn formant_weights(f0: f32, vowel: &[f32; 3], weights: &mut [f32]) {
    const GAIN: [f32; 3] = [1.0, 0.6, 0.3];
    const BW: [f32; 3] = [90.0, 110.0, 150.0];
    for (k, w) in weights.iter_mut().enumerate() {
        let f = (k + 1) as f32 * f0;
        let mut env = 0.03;
        for i in 0..3 {
            let d = (f - vowel[i]) / BW[i];
            env += GAIN[i] / (1.0 + d * d);
        }
        *w = env / (k + 1) as f32;
    }
}

fn vocals(song: &Song, rng: &mut KeyedRng, out: &mut Stereo) {
    let sr = song.sr;
    let vib_rate = rng.range_f64(4.8, 6.2) as f32;
    let vib_depth = rng.range_f64(0.15, 0.35) as f32; // semitones
    let mut degree = 2 * rng.below(3) as i32; // start on a chord tone of the tonic
    let mut step = 0;
    let mut weights = [0.0f32; 40];
    while step < song.steps() {
        // Two-bar phrases; after each, sometimes a bar of rest.
        if step % 32 == 0 && step > 0 && rng.f64() < 0.35 {
            step += 16;
            continue;
        }
        let len_steps = [2, 2, 4, 4, 6, 8][rng.below(6) as usize];
        if step % 32 != 0 && rng.f64() < 0.12 {
            step += len_steps;
            continue;
        }
        let chord_root = song.chord_root(step);
        degree += [-2, -1, -1, 0, 1, 1, 2][rng.below(7) as usize];
        if rng.f64() < 0.5 {
            // Pull towards the nearest chord tone.
            let rel = (degree - chord_root).rem_euclid(7);
            if rel % 2 == 1 && rel != 7 {
                degree -= 1;
            }
        }
        degree = degree.clamp(-3, 10);
        let f = song.hz(60 + song.degree(degree));
        let vowel = VOWELS[rng.below(VOWELS.len() as u64) as usize];
        let nh = n_harmonics(f * 1.05, sr, weights.len());
        let len = (len_steps as f32 * song.step * 0.95) as usize;
        let vel = 0.7 + 0.3 * rng.f64() as f32;
        let mut breath = KeyedRng::new(DOMAIN_SYNTH, rng.u64(), 3, 0);
        let mut phase = 0.0f32;
        let mut f0 = f;
        add(out, song.at(step), len, 0.0, |n| {
            let t = n as f32 / sr;
            if n % 32 == 0 {
                let depth = vib_depth * (t / 0.2).min(1.0);
                f0 = f * 2f32.powf(depth * (2.0 * PI * vib_rate * t).sin() / 12.0);
                formant_weights(f0, &vowel, &mut weights[..nh]);
            }
            phase = (phase + 2.0 * PI * f0 / sr) % (2.0 * PI);
            let env = (t / 0.03).min(1.0) * release(n, len, 0.06 * sr);
            vel * env * (harmonics(phase, &weights[..nh]) + 0.01 * breath.noise())
        });
        step += len_steps;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_split_sizes() {
        assert_eq!(test_tracks(1), 0);
        assert_eq!(test_tracks(2), 1);
        assert_eq!(test_tracks(5), 1);
        assert_eq!(test_tracks(10), 2);
        assert_eq!(test_tracks(150), 30);
    }

    #[test]
    fn custom_sources_take_timbres_by_position() {
        assert_eq!(Timbre::of("vocals", 0), Timbre::Vocals);
        assert_eq!(Timbre::of("piano", 1), Timbre::Bass);
        assert_eq!(Timbre::of("guitar", 6), Timbre::Other);
    }

    #[test]
    fn stems_are_non_silent_and_tracks_differ() {
        let sources: Vec<String> = ["drums", "bass", "other", "vocals", "extra"]
            .map(String::from)
            .to_vec();
        let a = render_track(7, 0, 16_000, 8_000, &sources);
        let b = render_track(7, 1, 16_000, 8_000, &sources);
        for s in &a {
            let p = peak(s);
            assert!(p > 0.01 && p <= PEAK + 1e-6, "peak {p}");
        }
        assert!(peak(&sum(&a, 16_000)) <= PEAK * 1.0001);
        assert_ne!(a[0], b[0]);
        assert_ne!(a[3], b[3]);
    }

    #[test]
    fn chebyshev_harmonics_match_direct_sum() {
        let w = [1.0, 0.5, 0.25, 0.2, 0.1];
        for phi in [0.1f32, 1.0, 2.5, 4.0, 6.0] {
            let direct: f32 = w
                .iter()
                .enumerate()
                .map(|(k, a)| a * ((k + 1) as f32 * phi).sin())
                .sum();
            assert!((harmonics(phi, &w) - direct).abs() < 1e-4);
        }
    }
}
