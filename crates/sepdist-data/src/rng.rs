//! Counter-based randomness: a ChaCha generator keyed by a tuple of integers, so every draw is a
//! pure function of its key and never of shared mutable state. Uniform helpers are written here
//! (not taken from `rand`) so that the values are stable across `rand` releases.

use rand_chacha::ChaCha12Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

/// Domain tags keep the streams of different uses apart.
pub(crate) const DOMAIN_EXAMPLE: u64 = 0x5345_5044_4558_4d50; // "SEPDEXMP"
pub(crate) const DOMAIN_SYNTH: u64 = 0x5345_5044_5359_4e54; // "SEPDSYNT"

pub(crate) struct KeyedRng(ChaCha12Rng);

impl KeyedRng {
    /// A generator for the key `(domain, a, b, c)`: 32 bytes of ChaCha seed, one word each.
    pub(crate) fn new(domain: u64, a: u64, b: u64, c: u64) -> Self {
        let mut seed = [0u8; 32];
        for (chunk, word) in seed.chunks_exact_mut(8).zip([domain, a, b, c]) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        KeyedRng(ChaCha12Rng::from_seed(seed))
    }

    pub(crate) fn u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `[0, 1)` with 53 bits.
    pub(crate) fn f64(&mut self) -> f64 {
        (self.u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)` (or `lo` when the range is empty).
    pub(crate) fn range_f64(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }

    /// Uniform integer in `[0, n)`; `0` when `n == 0`. Multiply-high mapping: bias below 2^-64·n.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((self.u64() as u128 * n as u128) >> 64) as u64
    }

    pub(crate) fn coin(&mut self) -> bool {
        self.u64() >> 63 == 1
    }

    /// Standard-ish noise in `[-1, 1)`.
    pub(crate) fn noise(&mut self) -> f32 {
        (self.u64() >> 40) as f32 * (2.0 / (1u64 << 24) as f32) - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_stream_and_ranges_hold() {
        let mut a = KeyedRng::new(1, 2, 3, 4);
        let mut b = KeyedRng::new(1, 2, 3, 4);
        let mut c = KeyedRng::new(1, 2, 3, 5);
        let xa: Vec<u64> = (0..8).map(|_| a.u64()).collect();
        let xb: Vec<u64> = (0..8).map(|_| b.u64()).collect();
        let xc: Vec<u64> = (0..8).map(|_| c.u64()).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
        for _ in 0..1000 {
            assert!(a.below(7) < 7);
            let f = a.f64();
            assert!((0.0..1.0).contains(&f));
            let n = a.noise();
            assert!((-1.0..1.0).contains(&n));
        }
        assert_eq!(a.below(0), 0);
    }
}
