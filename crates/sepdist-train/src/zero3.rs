//! ZeRO-3 parameter sharding: moving one piece of the model (a block, or one source's part of
//! the head) between its shards and a whole copy.
//!
//! The flat parameter vector (name-sorted, [`crate::engine::FlatLayout`]) is split evenly:
//! rank `r` owns `flat[r·per..(r+1)·per]`, the same split as ZeRO 1 and 2, so checkpoints of
//! every stage are interchangeable. A piece is a set of flat ranges; its parameters are spread
//! over the owners of those ranges. Gathering a piece is one all-gather of equal-sized chunks:
//! each rank packs the part of the piece it owns into a chunk padded to the largest owner's
//! part (all ranks derive the same packing from the layout alone). Reducing a piece's
//! gradient is the mirror image: one reduce-scatter of the same packing, each rank adding the
//! sum of its part to its gradient shard.

use crate::engine::{Engine, FlatLayout, Piece, ShardedParams};
use sepdist_comm::{CommError, Communicator, Result};
use sepdist_model::ModelError;
use std::collections::BTreeMap;
use std::ops::Range;

/// Every piece's exchange, for one world size and shard length.
#[derive(Debug, Clone)]
pub struct Zero3 {
    exchanges: BTreeMap<Piece, PieceExchange>,
}

impl Zero3 {
    /// The pieces of `engine` ([`Engine::pieces`]) over `world` shards of `per` elements.
    pub fn new(engine: &Engine, per: usize, world: usize) -> Self {
        let exchanges = engine
            .pieces()
            .into_iter()
            .map(|piece| {
                let ids = engine.piece_params(piece).iter().copied();
                (
                    piece,
                    PieceExchange::of_params(engine.layout(), ids, per, world),
                )
            })
            .collect();
        Self { exchanges }
    }

    /// Elements of the largest piece (what one gather materialises at most).
    pub fn largest_piece(&self) -> usize {
        self.exchanges
            .values()
            .map(PieceExchange::len)
            .max()
            .unwrap_or(0)
    }

    /// The engine's view of the shards: gathers from `params` (this rank's parameter shard),
    /// adds the reduced gradients into `grad_shard`.
    pub fn access<'a>(
        &'a self,
        comm: &'a dyn Communicator,
        params: &'a [f32],
        grad_shard: &'a mut [f32],
    ) -> Zero3Access<'a> {
        Zero3Access {
            zero3: self,
            comm,
            params,
            grad_shard,
        }
    }

    fn exchange(&self, piece: Piece) -> std::result::Result<&PieceExchange, ModelError> {
        self.exchanges
            .get(&piece)
            .ok_or_else(|| ModelError::Input(format!("{piece:?} is not a piece of the model")))
    }
}

/// [`ShardedParams`] over this rank's shards (see [`Zero3::access`]).
pub struct Zero3Access<'a> {
    zero3: &'a Zero3,
    comm: &'a dyn Communicator,
    params: &'a [f32],
    grad_shard: &'a mut [f32],
}

impl<E: From<CommError> + From<ModelError>> ShardedParams<E> for Zero3Access<'_> {
    fn gather(&mut self, piece: Piece) -> std::result::Result<Vec<f32>, E> {
        Ok(self.zero3.exchange(piece)?.gather(self.comm, self.params)?)
    }

    fn reduce(&mut self, piece: Piece, grads: Vec<f32>) -> std::result::Result<(), E> {
        self.zero3
            .exchange(piece)?
            .reduce_scatter_add(self.comm, &grads, self.grad_shard)?;
        Ok(())
    }
}

/// A contiguous run of a piece owned by one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    /// Offset in the piece's buffer (the piece's ranges concatenated in the given order).
    piece_offset: usize,
    /// Offset in the owner's shard.
    shard_offset: usize,
    len: usize,
}

/// How the parameters of one piece are spread over the ranks' shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceExchange {
    /// Per rank, its segments in piece order.
    owned: Vec<Vec<Segment>>,
    /// Elements per rank in one collective: the largest owner's part.
    chunk: usize,
    /// Elements in the whole piece.
    len: usize,
}

impl PieceExchange {
    /// The piece made of `ranges` of the flat vector (in this order), with shards of `per`
    /// elements on `world` ranks.
    pub fn new(ranges: &[Range<usize>], per: usize, world: usize) -> Self {
        let mut owned = vec![Vec::new(); world];
        let mut piece_offset = 0;
        for range in ranges {
            let mut start = range.start;
            while start < range.end {
                let rank = start / per.max(1);
                let shard_end = (rank + 1) * per;
                let end = range.end.min(shard_end);
                if let Some(segments) = owned.get_mut(rank) {
                    segments.push(Segment {
                        piece_offset: piece_offset + start - range.start,
                        shard_offset: start - rank * per,
                        len: end - start,
                    });
                }
                start = end;
            }
            piece_offset += range.len();
        }
        let chunk = owned
            .iter()
            .map(|s| s.iter().map(|g| g.len).sum::<usize>())
            .max()
            .unwrap_or(0);
        Self {
            owned,
            chunk,
            len: piece_offset,
        }
    }

    /// The piece made of the layout's parameters `ids` (in this order).
    pub fn of_params(
        layout: &FlatLayout,
        ids: impl IntoIterator<Item = usize>,
        per: usize,
        world: usize,
    ) -> Self {
        // Neighbouring parameters make one range: fewer, longer copies.
        let mut ranges: Vec<Range<usize>> = Vec::new();
        for i in ids {
            let r = layout.range(i);
            match ranges.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => ranges.push(r),
            }
        }
        Self::new(&ranges, per, world)
    }

    /// Elements in the whole piece.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements each rank sends in one gather or reduce (the padded chunk).
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// The whole piece from every rank's `shard` (this rank's is passed): one all-gather.
    pub fn gather(&self, comm: &dyn Communicator, shard: &[f32]) -> Result<Vec<f32>> {
        let world = self.owned.len();
        let mut whole = vec![0.0; self.len];
        if world == 1 {
            for g in &self.owned[0] {
                whole[g.piece_offset..g.piece_offset + g.len]
                    .copy_from_slice(&shard[g.shard_offset..g.shard_offset + g.len]);
            }
            return Ok(whole);
        }
        let mut mine = vec![0.0; self.chunk];
        let mut at = 0;
        for g in &self.owned[comm.rank()] {
            mine[at..at + g.len].copy_from_slice(&shard[g.shard_offset..g.shard_offset + g.len]);
            at += g.len;
        }
        let mut all = vec![0.0; self.chunk * world];
        comm.all_gather(&mine, &mut all)?;
        drop(mine);
        for (rank, segments) in self.owned.iter().enumerate() {
            let mut at = rank * self.chunk;
            for g in segments {
                whole[g.piece_offset..g.piece_offset + g.len].copy_from_slice(&all[at..at + g.len]);
                at += g.len;
            }
        }
        Ok(whole)
    }

    /// Sums the piece's gradient `grads` (the whole piece, this rank's contribution) over the
    /// ranks and adds this rank's part of the sum to `grad_shard`: one reduce-scatter.
    pub fn reduce_scatter_add(
        &self,
        comm: &dyn Communicator,
        grads: &[f32],
        grad_shard: &mut [f32],
    ) -> Result<()> {
        let world = self.owned.len();
        if world == 1 {
            for g in &self.owned[0] {
                for (acc, x) in grad_shard[g.shard_offset..g.shard_offset + g.len]
                    .iter_mut()
                    .zip(&grads[g.piece_offset..g.piece_offset + g.len])
                {
                    *acc += x;
                }
            }
            return Ok(());
        }
        let mut send = vec![0.0; self.chunk * world];
        for (rank, segments) in self.owned.iter().enumerate() {
            let mut at = rank * self.chunk;
            for g in segments {
                send[at..at + g.len]
                    .copy_from_slice(&grads[g.piece_offset..g.piece_offset + g.len]);
                at += g.len;
            }
        }
        let mut mine = vec![0.0; self.chunk];
        comm.reduce_scatter_sum(&send, &mut mine)?;
        drop(send);
        let mut at = 0;
        for g in &self.owned[comm.rank()] {
            for (acc, x) in grad_shard[g.shard_offset..g.shard_offset + g.len]
                .iter_mut()
                .zip(&mine[at..at + g.len])
            {
                *acc += x;
            }
            at += g.len;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sepdist_comm::Threads;
    use std::time::Duration;

    /// A flat vector of `n` padded to `world` shards; value i at index i.
    fn shards(n: usize, world: usize) -> (usize, Vec<Vec<f32>>) {
        let per = n.div_ceil(world);
        let shards = (0..world)
            .map(|r| {
                (r * per..(r + 1) * per)
                    .map(|i| if i < n { i as f32 } else { 0.0 })
                    .collect()
            })
            .collect();
        (per, shards)
    }

    #[test]
    fn gather_returns_the_piece_on_every_world_size() {
        let n = 103;
        // Two ranges out of order, one crossing shard borders, one inside a shard.
        let ranges = [40..97, 3..9];
        let want: Vec<f32> = ranges
            .iter()
            .flat_map(|r| r.clone().map(|i| i as f32))
            .collect();
        for world in [1, 2, 3, 4, 7] {
            let (per, shards) = shards(n, world);
            let piece = PieceExchange::new(&ranges, per, world);
            assert_eq!(piece.len(), want.len());
            let got = Threads::run(world, Duration::from_secs(10), |comm| {
                piece.gather(&comm, &shards[comm.rank()]).unwrap()
            });
            for g in got {
                assert_eq!(g, want, "world {world}");
            }
        }
    }

    #[test]
    fn reduce_scatter_adds_the_sum_of_the_ranks_into_the_owners_shards() {
        let n: usize = 50;
        let ranges = [10..45, 0..4];
        let len: usize = ranges.iter().map(|r| r.len()).sum();
        for world in [1, 2, 4] {
            let per = n.div_ceil(world);
            let piece = PieceExchange::new(&ranges, per, world);
            let out = Threads::run(world, Duration::from_secs(10), |comm| {
                // Rank r contributes (r + 1) · (piece index + 1); the shard starts at 0.5.
                let grads: Vec<f32> = (0..len)
                    .map(|i| ((comm.rank() + 1) * (i + 1)) as f32)
                    .collect();
                let mut shard = vec![0.5; per];
                piece.reduce_scatter_add(&comm, &grads, &mut shard).unwrap();
                shard
            });
            let rank_sum = (world * (world + 1) / 2) as f32;
            let mut expected = vec![0.5; per * world];
            let mut at = 0;
            for r in &ranges {
                for flat in r.clone() {
                    expected[flat] += rank_sum * (at + 1) as f32;
                    at += 1;
                }
            }
            let got: Vec<f32> = out.concat();
            assert_eq!(got, expected, "world {world}");
            // Only the owners' parts travel, padded to the largest.
            assert!(piece.chunk() <= len && piece.chunk() * world >= len);
        }
    }
}
