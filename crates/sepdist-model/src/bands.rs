//! Band layout and the grouping of equal-width bands into batched matmuls.
//!
//! Bands are contiguous ranges of STFT bins, in ascending frequency. Bands with the same
//! width `f` form one *group*; groups are numbered by the first band of that width (for
//! `bs_roformer_62`: group 0 = the 24 bands of 2 bins, 1 = 12×4, 2 = 8×12, 3 = 8×24, 4 = 8×48,
//! 5 = the band of 128 bins, 6 = the band of 129 bins). Inside a group, bands keep their
//! frequency order: band `k` is member `member[k]` of group `group[k]`. Every per-band
//! parameter of a group is stacked along a leading axis in that member order, so
//! `band_split.groups.g.linear.weight[j]` is the `Linear` of the `j`-th band of width
//! `widths(g)` counted from low frequencies.

use crate::error::{ModelError, Result};

/// One band group: all bands of one width.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BandGroup {
    /// Bins per band.
    pub width: usize,
    /// Band indices (ascending) in this group.
    pub bands: Vec<usize>,
}

impl BandGroup {
    /// Features per band: (re, im) × 2 channels × `width` bins.
    pub fn dim_in(&self) -> usize {
        4 * self.width
    }
}

/// A maximal run of bands that are consecutive both in frequency and in one group, so that
/// gathering or scattering it is one `narrow` (for `bs_roformer_62` each group is one run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Run {
    pub group: usize,
    /// First member index inside the group.
    pub member: usize,
    /// First band index.
    pub band: usize,
    pub len: usize,
    /// First STFT bin.
    pub bin: usize,
}

/// Bands, their start bins, their groups and the runs between them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BandLayout {
    pub widths: Vec<usize>,
    pub starts: Vec<usize>,
    pub groups: Vec<BandGroup>,
    /// `(group, member)` of each band.
    pub band_to_group: Vec<(usize, usize)>,
    pub(crate) runs: Vec<Run>,
}

impl BandLayout {
    /// Checks that the widths are positive and cover exactly `freq_bins` bins.
    pub fn new(widths: &[usize], freq_bins: usize) -> Result<Self> {
        if widths.is_empty() || widths.contains(&0) {
            return Err(ModelError::Config(
                "bands must be a non-empty list of positive bin counts".into(),
            ));
        }
        let total: usize = widths.iter().sum();
        if total != freq_bins {
            return Err(ModelError::Config(format!(
                "bands cover {total} bins, the STFT has {freq_bins} (n_fft/2+1)"
            )));
        }
        let mut starts = Vec::with_capacity(widths.len());
        let mut acc = 0;
        for &w in widths {
            starts.push(acc);
            acc += w;
        }
        let mut groups: Vec<BandGroup> = Vec::new();
        let mut band_to_group = Vec::with_capacity(widths.len());
        for (k, &w) in widths.iter().enumerate() {
            let g = match groups.iter().position(|g| g.width == w) {
                Some(g) => g,
                None => {
                    groups.push(BandGroup {
                        width: w,
                        bands: Vec::new(),
                    });
                    groups.len() - 1
                }
            };
            band_to_group.push((g, groups[g].bands.len()));
            groups[g].bands.push(k);
        }
        let mut runs: Vec<Run> = Vec::new();
        for (k, &(g, m)) in band_to_group.iter().enumerate() {
            match runs.last_mut() {
                Some(r) if r.group == g && r.member + r.len == m => r.len += 1,
                _ => runs.push(Run {
                    group: g,
                    member: m,
                    band: k,
                    len: 1,
                    bin: starts[k],
                }),
            }
        }
        Ok(Self {
            widths: widths.to_vec(),
            starts,
            groups,
            band_to_group,
            runs,
        })
    }

    pub fn n_bands(&self) -> usize {
        self.widths.len()
    }

    pub fn freq_bins(&self) -> usize {
        self.widths.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_bands_groups_and_runs() -> Result<()> {
        let l = BandLayout::new(&[2, 2, 4, 2, 3], 13)?;
        assert_eq!(l.groups.len(), 3);
        assert_eq!(l.groups[0].bands, vec![0, 1, 3]);
        assert_eq!(l.band_to_group[3], (0, 2));
        assert_eq!(l.runs.len(), 4);
        assert!(BandLayout::new(&[2, 2], 5).is_err());
        Ok(())
    }
}
