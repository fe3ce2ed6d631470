//! Gradient buckets for data parallelism (DESIGN.md, "Parameters and flat buffers").
//!
//! A bucket is a contiguous range of the name-ordered flat gradient vector, at most
//! `bucket_bytes` long unless a single parameter is larger. A bucket can be reduced as soon as
//! every block holding one of its parameters has finished its backward on the last
//! micro-batch of the accumulation window: the blocks run backward in reverse order, so
//! buckets become ready in an order set by the model, not by the names.

use crate::engine::FlatLayout;
use std::ops::Range;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// Range of the flat vector.
    pub range: Range<usize>,
    /// Parameters (indices into the layout) in the bucket.
    pub params: Range<usize>,
}

/// The buckets of a layout and, per block, the buckets that its backward completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    pub buckets: Vec<Bucket>,
    /// `pending[b]`: blocks whose backward bucket `b` waits for.
    blocks_of_bucket: Vec<Vec<usize>>,
}

impl BucketPlan {
    /// `block_params[i]`: layout indices of block `i`'s parameters.
    pub fn new(layout: &FlatLayout, block_params: &[Vec<usize>], bucket_bytes: usize) -> Self {
        let max_elems = (bucket_bytes / 4).max(1);
        let mut buckets = Vec::new();
        let mut start_param = 0;
        let mut start = 0;
        for i in 0..layout.specs.len() {
            let end = layout.range(i).end;
            let next_end = layout.specs.get(i + 1).map(|_| layout.range(i + 1).end);
            let closes = next_end.is_none_or(|e| e - start > max_elems);
            if closes {
                buckets.push(Bucket {
                    range: start..end,
                    params: start_param..i + 1,
                });
                start = end;
                start_param = i + 1;
            }
        }
        let mut owner = vec![0; layout.specs.len()];
        for (block, params) in block_params.iter().enumerate() {
            for &p in params {
                owner[p] = block;
            }
        }
        let blocks_of_bucket = buckets
            .iter()
            .map(|b| {
                let mut blocks: Vec<usize> = b.params.clone().map(|p| owner[p]).collect();
                blocks.sort_unstable();
                blocks.dedup();
                blocks
            })
            .collect();
        Self {
            buckets,
            blocks_of_bucket,
        }
    }

    /// Buckets that become ready when `done` lists the blocks whose backward has finished
    /// (in any order) and `newly_done` is the block that just finished: those containing
    /// `newly_done` whose other blocks are all done.
    pub fn ready_after(&self, newly_done: usize, done: &[bool]) -> Vec<usize> {
        self.blocks_of_bucket
            .iter()
            .enumerate()
            .filter(|(_, blocks)| blocks.contains(&newly_done) && blocks.iter().all(|&b| done[b]))
            .map(|(i, _)| i)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sepdist_model::{Init, ParamSpec};

    fn layout(sizes: &[(&str, usize)]) -> FlatLayout {
        FlatLayout::new(
            sizes
                .iter()
                .map(|(n, s)| ParamSpec::new(*n, &[*s], Init::Zeros))
                .collect(),
        )
    }

    #[test]
    fn buckets_cover_the_flat_vector_in_order_within_the_size() {
        let l = layout(&[("a", 3), ("b", 4), ("c", 10), ("d", 1), ("e", 2)]);
        // 8 elements per bucket; `c` alone exceeds it.
        let plan = BucketPlan::new(&l, &[vec![0, 1, 2, 3, 4]], 32);
        let ranges: Vec<Range<usize>> = plan.buckets.iter().map(|b| b.range.clone()).collect();
        assert_eq!(ranges, vec![0..7, 7..17, 17..20]);
        let params: Vec<Range<usize>> = plan.buckets.iter().map(|b| b.params.clone()).collect();
        assert_eq!(params, vec![0..2, 2..3, 3..5]);
    }

    #[test]
    fn a_bucket_is_ready_once_all_its_blocks_are_done() {
        let l = layout(&[("a", 2), ("b", 2), ("c", 2)]);
        // Block 0 holds a and c, block 1 holds b; one bucket per parameter.
        let plan = BucketPlan::new(&l, &[vec![0, 2], vec![1]], 8);
        assert_eq!(plan.buckets.len(), 3);
        let mut done = vec![false, false];
        done[1] = true;
        assert_eq!(plan.ready_after(1, &done), vec![1]);
        done[0] = true;
        assert_eq!(plan.ready_after(0, &done), vec![0, 2]);
    }
}
