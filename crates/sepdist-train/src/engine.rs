//! Block-wise execution (DESIGN.md, "the heart of the engine").
//!
//! The separator is a chain of blocks. Forward runs them in order; each block's input is
//! detached into a fresh `Var`, so each block owns its graph. Backward runs in reverse: a
//! block's backward is `(y · g).sum().backward()` for the upstream gradient `g`, yielding its
//! parameter gradients and the gradient of its input, which is the next `g`. Per block the
//! policy keeps the graph from forward to backward, or keeps only the input and recomputes
//! the forward right before the backward (activation checkpointing).
//!
//! The head and the loss run one source at a time: each source's mask estimator reads only
//! the trunk's output and the loss is a sum over sources, so per source the head's piece
//! (final norm, that source's mask estimator, masking, iSTFT) and the source's loss part run
//! forward and backward, their gradients are added, and the graph is dropped before the next
//! source. Only one source's head and loss graphs are alive at a time (they are most of the
//! activations), and a piece's parameters are all a source needs (ZeRO-3 gathers per piece).
//!
//! Parameters live as one `Var` each, in name order, mirrored by a flat fp32 vector laid out
//! by [`FlatLayout`]; gradients are accumulated straight into a flat buffer.
//!
//! Mixed precision ([`Engine::set_compute_dtype`] bf16, PyTorch's `bf16-mixed`): the `Var`s
//! are a bf16 copy of the fp32 master vector, and the blocks compute in bf16 (the ops run
//! their norms, softmax and STFTs in f32, see `sepdist_model::ops`); the mixture's STFT, the
//! masked iSTFT, the estimate and the loss stay fp32. Gradients leave the blocks in bf16 and
//! are added into the flat fp32 buffer; master weights, optimizer state and the reduction
//! stay fp32.

use crate::checkpoint::{Fingerprint, HostTensor, ParamInfo};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use sepdist_model::loss::SeparationLoss;
use sepdist_model::{
    AttentionKind, ForwardContext, ModelError, ParamSpec, SavedForward, Separator,
};
use std::collections::BTreeMap;

/// Offsets of the name-sorted parameters in the flat vector.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatLayout {
    pub specs: Vec<ParamSpec>,
    pub offsets: Vec<usize>,
    /// Scalars over all parameters (the flat vector's length before padding).
    pub len: usize,
}

impl FlatLayout {
    /// `specs` in any order; the layout sorts them by name.
    pub fn new(mut specs: Vec<ParamSpec>) -> Self {
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        let mut offsets = Vec::with_capacity(specs.len());
        let mut len = 0;
        for s in &specs {
            offsets.push(len);
            len += s.numel();
        }
        Self {
            specs,
            offsets,
            len,
        }
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::new(
            self.specs
                .iter()
                .map(|s| ParamInfo {
                    name: s.name.clone(),
                    shape: s.shape.clone(),
                    dtype: "f32".into(),
                })
                .collect(),
        )
    }

    /// The flat range of parameter `i`.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        self.offsets[i]..self.offsets[i] + self.specs[i].numel()
    }

    /// Flat vector → named host tensors (for checkpoints).
    pub fn unflatten(&self, flat: &[f32]) -> Vec<(String, HostTensor)> {
        self.specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    s.name.clone(),
                    HostTensor {
                        shape: s.shape.clone(),
                        data: flat[self.range(i)].to_vec(),
                    },
                )
            })
            .collect()
    }
}

/// Loss values of one micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossValues {
    pub total: f64,
    pub waveform: f64,
    pub mse: f64,
    pub multi_stft: f64,
}

impl LossValues {
    pub fn add(&mut self, other: LossValues, weight: f64) {
        self.total += weight * other.total;
        self.waveform += weight * other.waveform;
        self.mse += weight * other.mse;
        self.multi_stft += weight * other.multi_stft;
    }
}

/// Where the engine is inside a micro-batch, reported to an [`EngineProbe`] (memory
/// accounting: the trainer switches the memory meter's phase on these events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineEvent {
    /// Before the mixture STFT: nothing of the micro-batch's graph exists yet.
    ForwardStart,
    /// Block `i`'s forward is done (its graph or its input is kept).
    BlockForward(usize),
    /// The first source's loss is computed (every kept activation and that source's head and
    /// loss graphs are alive); the backward starts. The later sources' head forwards run after
    /// it, inside the backward phase (like the recomputed forwards of checkpointing).
    BackwardStart,
    /// Block `i`'s backward is done and its graph and gradient store are dropped.
    BlockBackward(usize),
}

/// Observer of [`EngineEvent`]s.
pub type EngineProbe = std::sync::Arc<dyn Fn(EngineEvent) + Send + Sync>;

/// What the forward keeps of a block for its backward.
enum Kept {
    /// The block's graph: its input `Var` (none for the first block, whose input is data)
    /// and its tracked output.
    Graph {
        input: Option<Var>,
        output: Tensor,
        params: Vec<Tensor>,
    },
    /// A transformer's own saved tensors for its hand-written backward
    /// ([`Block::backward_saved`]), and its parameters.
    Saved {
        saved: SavedForward,
        params: Vec<Tensor>,
    },
    /// Only the untracked input; the forward is recomputed before the backward.
    Input(Tensor),
}

/// Parameters fetched together: a block before the head, or one source's piece of the head
/// (ZeRO-3 gathers and reduces per piece).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Piece {
    Block(usize),
    HeadSource(usize),
}

/// Parameters the engine does not hold (ZeRO-3). `gather` returns the values of a piece's
/// parameters ([`Engine::piece_params`]: their flat ranges concatenated in that order), before
/// the piece's forward and again before its recomputed forward; `reduce` takes this
/// micro-batch's gradient of the piece, in the same order, after its backward.
pub trait ShardedParams<E> {
    fn gather(&mut self, piece: Piece) -> Result<Vec<f32>, E>;
    fn reduce(&mut self, piece: Piece, grads: Vec<f32>) -> Result<(), E>;
}

/// Where a micro-batch takes its parameters from and leaves its gradients.
trait Access<E> {
    /// The piece's parameters in [`Engine::piece_params`] order; tracked ones are variables.
    fn fetch(&mut self, engine: &Engine, piece: Piece, tracked: bool) -> Result<Vec<Tensor>, E>;
    /// The gradients of the piece's parameters, in [`Engine::piece_params`] order (`None`:
    /// no gradient). The parameters' tensors are dropped first, so that a gathered piece is
    /// gone before its gradient is handed over.
    fn deliver(&mut self, engine: &Engine, piece: Piece, grads: &[Option<Tensor>])
    -> Result<(), E>;
    /// Every parameter gradient of `block` has been delivered.
    fn block_done(&mut self, block: usize) -> Result<(), E>;
}

/// The engine's own `Var`s; gradients added into a flat buffer, `hook` after each block.
struct Held<'a, F> {
    flat_grads: &'a mut [f32],
    hook: F,
}

impl<E, F> Access<E> for Held<'_, F>
where
    E: From<ModelError> + From<candle_core::Error>,
    F: FnMut(usize, &[f32]) -> Result<(), E>,
{
    fn fetch(&mut self, engine: &Engine, piece: Piece, tracked: bool) -> Result<Vec<Tensor>, E> {
        Ok(engine.held(piece, tracked)?)
    }

    fn deliver(
        &mut self,
        engine: &Engine,
        piece: Piece,
        grads: &[Option<Tensor>],
    ) -> Result<(), E> {
        for (&i, g) in engine.piece_params(piece).iter().zip(grads) {
            if let Some(g) = g {
                for (acc, x) in self.flat_grads[engine.layout.range(i)]
                    .iter_mut()
                    .zip(host_f32(g)?)
                {
                    *acc += x;
                }
            }
        }
        Ok(())
    }

    fn block_done(&mut self, block: usize) -> Result<(), E> {
        (self.hook)(block, self.flat_grads)
    }
}

/// Parameters gathered from shards per piece, gradients handed back per piece (ZeRO-3).
struct Sharded<'a, S: ?Sized>(&'a mut S);

impl<E, S> Access<E> for Sharded<'_, S>
where
    E: From<ModelError> + From<candle_core::Error>,
    S: ShardedParams<E> + ?Sized,
{
    fn fetch(&mut self, engine: &Engine, piece: Piece, tracked: bool) -> Result<Vec<Tensor>, E> {
        let values = self.0.gather(piece)?;
        let ids = engine.piece_params(piece);
        let mut params = Vec::with_capacity(ids.len());
        let mut at = 0;
        for &i in ids {
            let spec = &engine.layout.specs[i];
            let n = spec.numel();
            let Some(slice) = values.get(at..at + n) else {
                break;
            };
            let shape = spec.shape.as_slice();
            params.push(if tracked {
                engine.compute_var(slice, shape)?.into_inner()
            } else {
                engine.compute_copy(slice, shape)?
            });
            at += n;
        }
        if at != values.len() || params.len() != ids.len() {
            return Err(ModelError::Input(format!(
                "{piece:?}: gathered {} values for parameters of {at}",
                values.len()
            ))
            .into());
        }
        Ok(params)
    }

    fn deliver(
        &mut self,
        engine: &Engine,
        piece: Piece,
        grads: &[Option<Tensor>],
    ) -> Result<(), E> {
        let ids = engine.piece_params(piece);
        let len = ids.iter().map(|&i| engine.layout.specs[i].numel()).sum();
        let mut out = Vec::with_capacity(len);
        for (&i, g) in ids.iter().zip(grads) {
            match g {
                Some(g) => out.extend(host_f32(g)?),
                None => out.resize(out.len() + engine.layout.specs[i].numel(), 0.0),
            }
        }
        self.0.reduce(piece, out)
    }

    fn block_done(&mut self, _block: usize) -> Result<(), E> {
        Ok(())
    }
}

/// The model, its parameters as `Var`s and the loss, run block by block.
pub struct Engine {
    separator: Separator,
    loss: SeparationLoss,
    layout: FlatLayout,
    vars: Vec<Var>,
    /// Per block: indices into `layout`/`vars`, in the block's parameter order.
    block_params: Vec<Vec<usize>>,
    /// Per source: indices into `layout`/`vars` of the head's piece, in the order
    /// `Block::head_source` takes them.
    head_pieces: Vec<Vec<usize>>,
    recompute: bool,
    device: Device,
    /// The dtype of the parameters' copy and of the blocks' activations (f32, or bf16).
    compute: DType,
    probe: Option<EngineProbe>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("params", &self.layout.len)
            .field("blocks", &self.block_params.len())
            .field("recompute", &self.recompute)
            .field("compute", &self.compute)
            .finish()
    }
}

/// A gradient's values as host fp32, flattened.
fn host_f32(g: &Tensor) -> candle_core::Result<Vec<f32>> {
    g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// The gradients of `params` in `grads`, in their order (views of the store's tensors).
fn grads_of(params: &[Tensor], grads: &GradStore) -> Vec<Option<Tensor>> {
    params.iter().map(|p| grads.get(p).cloned()).collect()
}

fn scalar(t: &Tensor) -> Result<f64, ModelError> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl Engine {
    /// Builds the separator and its parameters from `initial` (name → tensor, e.g. from
    /// `Separator::init_params`).
    pub fn new(
        separator: Separator,
        loss: SeparationLoss,
        initial: &BTreeMap<String, Tensor>,
        recompute: bool,
        device: Device,
    ) -> Result<Self, ModelError> {
        let layout = FlatLayout::new(separator.param_specs());
        let index: BTreeMap<&str, usize> = layout
            .specs
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut vars = Vec::with_capacity(layout.specs.len());
        for s in &layout.specs {
            let t = initial
                .get(&s.name)
                .ok_or_else(|| ModelError::Input(format!("missing parameter {}", s.name)))?;
            vars.push(Var::from_tensor(
                &t.to_dtype(DType::F32)?.to_device(&device)?,
            )?);
        }
        let mut block_params = Vec::new();
        for block in separator.blocks() {
            let mut ids = Vec::new();
            for s in block.param_specs() {
                let i = index.get(s.name.as_str()).copied().ok_or_else(|| {
                    ModelError::Input(format!("block parameter {} not in the layout", s.name))
                })?;
                ids.push(i);
            }
            block_params.push(ids);
        }
        let head = separator
            .blocks()
            .last()
            .ok_or_else(|| ModelError::Input("the separator has no blocks".into()))?;
        let head_ids = block_params.last().cloned().unwrap_or_default();
        let head_pieces = (0..head.head_sources())
            .map(|s| {
                Ok(head
                    .head_source_params(s)?
                    .into_iter()
                    .map(|j| head_ids[j])
                    .collect())
            })
            .collect::<Result<Vec<Vec<usize>>, ModelError>>()?;
        Ok(Self {
            separator,
            loss,
            layout,
            vars,
            block_params,
            head_pieces,
            recompute,
            device,
            compute: DType::F32,
            probe: None,
        })
    }

    /// Computes in `dtype` from now on: the held parameters become a copy in `dtype` (cast
    /// from the current one, so call it before training, on fp32 values: [`Engine::new`]'s or
    /// [`Engine::load_flat`]'s), every later load casts the flat fp32 values to it, and the
    /// blocks' activations are in it. f32 (the default) or bf16 (mixed precision; see the
    /// module docs); the loss and the gradients delivered stay fp32.
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<(), ModelError> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(ModelError::Input(format!(
                "the engine computes in f32 or bf16, not {dtype:?}"
            )));
        }
        if dtype != self.compute {
            self.vars = self
                .vars
                .iter()
                .map(|v| Var::from_tensor(&v.as_tensor().to_dtype(dtype)?))
                .collect::<candle_core::Result<_>>()?;
            self.compute = dtype;
        }
        Ok(())
    }

    /// The dtype the blocks compute in ([`Engine::set_compute_dtype`]).
    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    /// Bytes of the engine's copy of the parameters (none after [`Engine::release_params`]).
    pub fn param_copy_bytes(&self) -> usize {
        usize::from(self.holds_params()) * self.layout.len * self.compute.size_in_bytes()
    }

    /// The tensor of `values` (fp32, of `shape`) on the device, in the compute dtype.
    fn compute_copy(&self, values: &[f32], shape: &[usize]) -> candle_core::Result<Tensor> {
        Tensor::from_slice(values, shape, &self.device)?.to_dtype(self.compute)
    }

    /// [`Engine::compute_copy`] as a variable (in f32 without a second copy).
    fn compute_var(&self, values: &[f32], shape: &[usize]) -> candle_core::Result<Var> {
        if self.compute == DType::F32 {
            return Var::from_slice(values, shape, &self.device);
        }
        Var::from_tensor(&self.compute_copy(values, shape)?)
    }

    /// Reports the micro-batch's progress to `probe` (memory accounting).
    pub fn set_probe(&mut self, probe: Option<EngineProbe>) {
        self.probe = probe;
    }

    fn mark(&self, event: EngineEvent) {
        if let Some(probe) = &self.probe {
            probe(event);
        }
    }

    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    pub fn separator(&self) -> &Separator {
        &self.separator
    }

    /// Per block, the layout indices of its parameters.
    pub fn block_param_indices(&self) -> &[Vec<usize>] {
        &self.block_params
    }

    /// Number of sources: the pieces the head (the last block) runs in, one after another.
    pub fn head_sources(&self) -> usize {
        self.head_pieces.len()
    }

    /// The layout indices of the head's piece of source `s` (ascending): the final norm's
    /// gamma, which every piece shares (its gradient adds up over the pieces), and source
    /// `s`'s mask estimator. Together the pieces cover the head's parameters. Empty past the
    /// last source.
    pub fn head_source_params(&self, s: usize) -> &[usize] {
        self.head_pieces.get(s).map_or(&[], Vec::as_slice)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn set_recompute(&mut self, recompute: bool) {
        self.recompute = recompute;
    }

    /// The parameters as one flat fp32 vector (in bf16 the compute copy's values, rounded:
    /// take the fp32 master before [`Engine::set_compute_dtype`]).
    pub fn flat_params(&self) -> Result<Vec<f32>, ModelError> {
        self.require_params()?;
        let mut flat = vec![0.0; self.layout.len];
        for (i, v) in self.vars.iter().enumerate() {
            let data = host_f32(v.as_tensor())?;
            flat[self.layout.range(i)].copy_from_slice(&data);
        }
        Ok(flat)
    }

    /// Copies a flat vector (at least `layout.len` long) into the parameters, cast to the
    /// compute dtype.
    pub fn load_flat(&self, flat: &[f32]) -> Result<(), ModelError> {
        self.require_params()?;
        for (i, v) in self.vars.iter().enumerate() {
            let t = self.compute_copy(&flat[self.layout.range(i)], v.dims())?;
            v.set(&t)?;
        }
        Ok(())
    }

    /// The layout indices of `piece`'s parameters, in the order its forward takes them.
    pub fn piece_params(&self, piece: Piece) -> &[usize] {
        match piece {
            Piece::Block(i) => self.block_params.get(i).map_or(&[], Vec::as_slice),
            Piece::HeadSource(s) => self.head_source_params(s),
        }
    }

    /// Every piece, in forward order: the blocks before the head, then the head's sources.
    pub fn pieces(&self) -> Vec<Piece> {
        let last = self.block_params.len().saturating_sub(1);
        (0..last)
            .map(Piece::Block)
            .chain((0..self.head_pieces.len()).map(Piece::HeadSource))
            .collect()
    }

    /// Whether the engine holds the parameters (not after [`Engine::release_params`]).
    pub fn holds_params(&self) -> bool {
        !self.vars.is_empty()
    }

    fn require_params(&self) -> Result<(), ModelError> {
        if self.holds_params() {
            return Ok(());
        }
        Err(ModelError::Input(
            "the engine holds no parameters (released for ZeRO-3): use the sharded path, or materialize them".into(),
        ))
    }

    /// Drops the engine's copy of the parameters (ZeRO-3: they live as shards and are
    /// gathered per piece); [`Engine::materialize`] brings them back.
    pub fn release_params(&mut self) {
        self.vars = Vec::new();
    }

    /// Holds `flat` (at least `layout.len` long) as the parameters, after a release too.
    pub fn materialize(&mut self, flat: &[f32]) -> Result<(), ModelError> {
        if self.holds_params() {
            return self.load_flat(flat);
        }
        let mut vars = Vec::with_capacity(self.layout.specs.len());
        for (i, s) in self.layout.specs.iter().enumerate() {
            vars.push(self.compute_var(&flat[self.layout.range(i)], s.shape.as_slice())?);
        }
        self.vars = vars;
        Ok(())
    }

    /// All of block `i`'s parameters (the whole head for the last), untracked.
    fn whole_block(&self, i: usize) -> Result<Vec<Tensor>, ModelError> {
        self.require_params()?;
        Ok(self.block_params[i]
            .iter()
            .map(|&i| self.vars[i].as_tensor().detach())
            .collect())
    }

    /// The engine's parameters of `piece`: tracked ones are its `Var`s.
    fn held(&self, piece: Piece, tracked: bool) -> Result<Vec<Tensor>, ModelError> {
        self.require_params()?;
        Ok(self
            .piece_params(piece)
            .iter()
            .map(|&i| {
                let t = self.vars[i].as_tensor();
                if tracked { t.clone() } else { t.detach() }
            })
            .collect())
    }

    /// The forward context of `mixture` (FlashAttention) for the compute dtype.
    fn context(&self, mixture: &Tensor) -> Result<ForwardContext, ModelError> {
        self.separator
            .prepare_context_in(mixture, AttentionKind::Flash, self.compute)
    }

    /// Forward and backward of one micro-batch (`mixture [B, 2, N]`, `target [B, S, 2, N]`),
    /// adding the gradient of the mean loss into `flat_grads`.
    pub fn forward_backward(
        &self,
        mixture: &Tensor,
        target: &Tensor,
        flat_grads: &mut [f32],
    ) -> Result<LossValues, ModelError> {
        self.forward_backward_with(mixture, target, flat_grads, |_, _| Ok(()))
    }

    /// [`Engine::forward_backward`], calling `block_done(i, grads)` as soon as block `i`'s
    /// parameter gradients are in `grads` (blocks finish in reverse order): the hook where data
    /// parallelism starts reducing the buckets those blocks complete.
    pub fn forward_backward_with<E: From<ModelError> + From<candle_core::Error>>(
        &self,
        mixture: &Tensor,
        target: &Tensor,
        flat_grads: &mut [f32],
        block_done: impl FnMut(usize, &[f32]) -> Result<(), E>,
    ) -> Result<LossValues, E> {
        let mut held = Held {
            flat_grads,
            hook: block_done,
        };
        self.micro_batch(mixture, target, &mut held)
    }

    /// [`Engine::forward_backward`] with parameters the engine does not hold (ZeRO-3): each
    /// piece is gathered from `params` right before its forward, and again before its backward
    /// when its forward is recomputed; its gradient goes to `params` after its backward.
    /// Without checkpointing, a block's kept graph holds its gathered parameters until its
    /// backward (candle keeps every op's inputs).
    pub fn forward_backward_sharded<E, S>(
        &self,
        mixture: &Tensor,
        target: &Tensor,
        params: &mut S,
    ) -> Result<LossValues, E>
    where
        E: From<ModelError> + From<candle_core::Error>,
        S: ShardedParams<E> + ?Sized,
    {
        self.micro_batch(mixture, target, &mut Sharded(params))
    }

    fn micro_batch<E: From<ModelError> + From<candle_core::Error>>(
        &self,
        mixture: &Tensor,
        target: &Tensor,
        access: &mut impl Access<E>,
    ) -> Result<LossValues, E> {
        self.mark(EngineEvent::ForwardStart);
        let ctx = self.context(mixture)?;
        let blocks = self.separator.blocks();
        let last = blocks.len() - 1;
        // Forward through every block but the head. Keeping: block i's input Var and its
        // output with the graph. Recomputing: only the untracked input.
        let mut kept: Vec<Kept> = Vec::with_capacity(blocks.len());
        let mut x = ctx.first_input().clone();
        for (i, block) in blocks[..last].iter().enumerate() {
            if self.recompute {
                let y = block.forward(&access.fetch(self, Piece::Block(i), false)?, &x, &ctx)?;
                kept.push(Kept::Input(x));
                x = y;
            } else if block.has_own_backward(&x, &ctx) {
                let params = access.fetch(self, Piece::Block(i), false)?;
                let (y, saved) = block.forward_saved(&params, &x, &ctx)?;
                kept.push(Kept::Saved { saved, params });
                x = y;
            } else {
                // The first block's input is data; later inputs need their gradient.
                let input = if i == 0 {
                    None
                } else {
                    Some(Var::from_tensor(&x)?)
                };
                let arg = input.as_ref().map_or(&x, |v| v.as_tensor());
                let params = access.fetch(self, Piece::Block(i), true)?;
                let y = block.forward(&params, arg, &ctx)?;
                x = y.detach();
                kept.push(Kept::Graph {
                    input,
                    output: y,
                    params,
                });
            }
            self.mark(EngineEvent::BlockForward(i));
        }
        // Head and loss, one source at a time: the backward of source s's loss part gives its
        // piece's gradients and its share of `g`, the gradient of the trunk's output.
        let head = &blocks[last];
        let own = head.has_own_backward(&x, &ctx);
        // Candle's backward needs the head's input as a Var, a copy: the trunk's output is
        // then no longer needed (when checkpointing the Var is its only holder; when keeping
        // graphs, a view of the kept one). The hand-written backward takes `x` as it is.
        let head_in = if own {
            x.detach()
        } else {
            Var::from_tensor(&x)?.as_tensor().clone()
        };
        drop(x);
        let n_sources = self.head_pieces.len();
        if target.dim(1)? != n_sources {
            return Err(ModelError::Input(format!(
                "target {:?} does not hold the {n_sources} sources of the model",
                target.dims()
            ))
            .into());
        }
        let mut values = LossValues::default();
        let mut g: Option<Tensor> = None;
        for s in 0..n_sources {
            let params = access.fetch(self, Piece::HeadSource(s), !own)?;
            // Own backward: the mask without a graph, then candle's graph from the mask (a
            // Var) through the iSTFT and the loss only.
            let (saved, mask, estimate) = if own {
                let (mask, saved) = head.head_source_saved(&params, s, &head_in)?;
                let mask = Var::from_tensor(&mask)?;
                let estimate = head.head_estimate(mask.as_tensor(), &ctx)?;
                (Some(saved), Some(mask), estimate)
            } else {
                let estimate = head.head_source(&params, s, &head_in, &ctx)?;
                (None, None, estimate)
            };
            let parts =
                self.loss
                    .compute_source(&estimate, &target.narrow(1, s, 1)?, s, n_sources)?;
            values.add(
                LossValues {
                    total: scalar(&parts.total)?,
                    waveform: scalar(&parts.waveform)?,
                    mse: scalar(&parts.mse)?,
                    multi_stft: scalar(&parts.multi_stft)?,
                },
                1.0,
            );
            if s == 0 {
                self.mark(EngineEvent::BlockForward(last));
                self.mark(EngineEvent::BackwardStart);
            }
            let grads = parts.total.backward()?;
            drop((parts, estimate));
            // Detached: a gradient's own graph (it is computed with forward tensors) is of no
            // use and would keep them alive.
            let gs = match (saved, mask) {
                (Some(saved), Some(mask)) => {
                    let dmask = match grads.get(mask.as_tensor()) {
                        Some(d) => d.detach(),
                        None => mask.as_tensor().zeros_like()?,
                    };
                    drop((grads, mask));
                    let (dx, piece_grads) =
                        head.head_source_backward(&params, s, saved, dmask, &head_in)?;
                    drop(params);
                    let piece_grads: Vec<Option<Tensor>> =
                        piece_grads.into_iter().map(Some).collect();
                    access.deliver(self, Piece::HeadSource(s), &piece_grads)?;
                    Some(dx)
                }
                _ => {
                    let piece_grads = grads_of(&params, &grads);
                    drop(params);
                    access.deliver(self, Piece::HeadSource(s), &piece_grads)?;
                    drop(piece_grads);
                    grads.get(&head_in).map(|gs| gs.detach())
                }
            };
            if let Some(gs) = gs {
                g = Some(match g {
                    None => gs,
                    Some(acc) => (acc + gs)?,
                });
            }
        }
        access.block_done(last)?;
        let mut g = match g {
            Some(g) => g,
            None => head_in.zeros_like()?,
        };
        drop(head_in);
        self.mark(EngineEvent::BlockBackward(last));
        for i in (0..last).rev() {
            let block = &blocks[i];
            let kept_i = kept
                .pop()
                .ok_or_else(|| ModelError::Input("block bookkeeping out of step".into()))?;
            let (input, y, params) = match kept_i {
                Kept::Graph {
                    input,
                    output,
                    params,
                } => (input, output, params),
                Kept::Saved { saved, params } => {
                    let (dx, grads) = block.backward_saved(&params, saved, g, &ctx)?;
                    drop(params);
                    g = self.own_backward_done(access, i, dx, grads)?;
                    continue;
                }
                Kept::Input(x) if block.has_own_backward(&x, &ctx) => {
                    // The hand-written backward reruns the forward itself, without a graph.
                    let params = access.fetch(self, Piece::Block(i), false)?;
                    let (dx, grads) = block.backward_recomputed(&params, &x, g, &ctx)?;
                    drop((params, x));
                    g = self.own_backward_done(access, i, dx, grads)?;
                    continue;
                }
                Kept::Input(x) => {
                    // Recompute: the same forward, now tracked.
                    let input = if i == 0 {
                        None
                    } else {
                        Some(Var::from_tensor(&x)?)
                    };
                    let arg = input.as_ref().map_or(&x, |v| v.as_tensor());
                    let params = access.fetch(self, Piece::Block(i), true)?;
                    let y = block.forward(&params, arg, &ctx)?;
                    (input, y, params)
                }
            };
            let grads = (y * &g)?.sum_all()?.backward()?;
            let piece_grads = grads_of(&params, &grads);
            drop(params);
            access.deliver(self, Piece::Block(i), &piece_grads)?;
            drop(piece_grads);
            access.block_done(i)?;
            if let Some(v) = &input {
                g = match grads.get(v.as_tensor()) {
                    Some(gi) => gi.detach(),
                    None => v.as_tensor().zeros_like()?,
                };
            }
            drop((grads, input));
            self.mark(EngineEvent::BlockBackward(i));
        }
        Ok(values)
    }

    /// After block `i`'s hand-written backward: delivers its parameters' gradients and
    /// returns its input's gradient `dx` (the next `g`).
    fn own_backward_done<E: From<ModelError> + From<candle_core::Error>>(
        &self,
        access: &mut impl Access<E>,
        i: usize,
        dx: Tensor,
        grads: Vec<Tensor>,
    ) -> Result<Tensor, E> {
        let grads: Vec<Option<Tensor>> = grads.into_iter().map(Some).collect();
        access.deliver(self, Piece::Block(i), &grads)?;
        drop(grads);
        access.block_done(i)?;
        self.mark(EngineEvent::BlockBackward(i));
        Ok(dx)
    }

    /// Loss of one batch without gradients (validation), and the estimate it scored.
    pub fn evaluate(
        &self,
        mixture: &Tensor,
        target: &Tensor,
    ) -> Result<(LossValues, Tensor), ModelError> {
        let estimate = self.separate(mixture)?;
        let parts = self.loss.compute(&estimate, target)?;
        let values = LossValues {
            total: scalar(&parts.total)?,
            waveform: scalar(&parts.waveform)?,
            mse: scalar(&parts.mse)?,
            multi_stft: scalar(&parts.multi_stft)?,
        };
        Ok((values, estimate))
    }

    /// The separated sources `[B, S, 2, N]` of `mixture`, untracked.
    pub fn separate(&self, mixture: &Tensor) -> Result<Tensor, ModelError> {
        let ctx = self.context(mixture)?;
        let mut x = ctx.first_input().clone();
        for (i, block) in self.separator.blocks().iter().enumerate() {
            x = block.forward(&self.whole_block(i)?, &x, &ctx)?;
        }
        Ok(x)
    }
}

/// Builds `[b, ...]` tensors from a data batch.
pub fn batch_tensors(
    batch: &sepdist_data::Batch,
    device: &Device,
) -> Result<(Tensor, Tensor), ModelError> {
    let mixture = Tensor::from_slice(&batch.mixture, batch.mixture_shape.as_slice(), device)?;
    let stems = Tensor::from_slice(&batch.stems, batch.stems_shape.as_slice(), device)?;
    Ok((mixture, stems))
}
