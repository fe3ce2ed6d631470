//! Shared helpers of the integration tests: a small synthetic dataset at a low sample rate.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

pub const SR: u32 = 8_000;

pub fn sources() -> Vec<String> {
    ["drums", "bass", "other", "vocals"]
        .map(String::from)
        .to_vec()
}

/// `tracks` tracks of `seconds` s at [`SR`] under `dir`.
pub fn synth(dir: &Path, tracks: usize, seconds: f32, seed: u64) -> sepdist_data::Summary {
    sepdist_data::generate(dir, tracks, seconds, seed, SR, &sources()).expect("generate")
}

/// All files under `dir`, sorted, relative paths with their bytes.
pub fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.push((p.strip_prefix(dir).unwrap().to_path_buf(), bytes));
            }
        }
    }
    out.sort();
    out
}

/// Bit patterns, so that comparisons are bitwise (and NaN-proof).
pub fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}
