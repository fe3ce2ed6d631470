//! Block-wise execution (DESIGN.md, "the heart of the engine").
//!
//! The separator is a chain of blocks. Forward runs them in order; each block's input is
//! detached into a fresh `Var`, so each block owns its graph. Backward runs in reverse: a
//! block's backward is `(y · g).sum().backward()` for the upstream gradient `g`, yielding its
//! parameter gradients and the gradient of its input, which is the next `g`. Per block the
//! policy keeps the graph from forward to backward, or keeps only the input and recomputes
//! the forward right before the backward (activation checkpointing).
//!
//! Parameters live as one `Var` each, in name order, mirrored by a flat fp32 vector laid out
//! by [`FlatLayout`]; gradients are accumulated straight into a flat buffer.

use crate::checkpoint::{Fingerprint, HostTensor, ParamInfo};
use candle_core::{DType, Device, Tensor, Var};
use sepdist_model::loss::SeparationLoss;
use sepdist_model::{ModelError, ParamSpec, Separator};
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
    /// The loss is computed (every kept activation and the head/loss graph are alive); the
    /// backward starts.
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
    Graph { input: Option<Var>, output: Tensor },
    /// Only the untracked input; the forward is recomputed before the backward.
    Input(Tensor),
}

/// The model, its parameters as `Var`s and the loss, run block by block.
pub struct Engine {
    separator: Separator,
    loss: SeparationLoss,
    layout: FlatLayout,
    vars: Vec<Var>,
    /// Per block: indices into `layout`/`vars`, in the block's parameter order.
    block_params: Vec<Vec<usize>>,
    recompute: bool,
    device: Device,
    probe: Option<EngineProbe>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("params", &self.layout.len)
            .field("blocks", &self.block_params.len())
            .field("recompute", &self.recompute)
            .finish()
    }
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
        Ok(Self {
            separator,
            loss,
            layout,
            vars,
            block_params,
            recompute,
            device,
            probe: None,
        })
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

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn set_recompute(&mut self, recompute: bool) {
        self.recompute = recompute;
    }

    /// The parameters as one flat fp32 vector.
    pub fn flat_params(&self) -> Result<Vec<f32>, ModelError> {
        let mut flat = vec![0.0; self.layout.len];
        for (i, v) in self.vars.iter().enumerate() {
            let data = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            flat[self.layout.range(i)].copy_from_slice(&data);
        }
        Ok(flat)
    }

    /// Copies a flat vector (at least `layout.len` long) into the parameters.
    pub fn load_flat(&self, flat: &[f32]) -> Result<(), ModelError> {
        for (i, v) in self.vars.iter().enumerate() {
            let t = Tensor::from_slice(&flat[self.layout.range(i)], v.shape(), &self.device)?;
            v.set(&t)?;
        }
        Ok(())
    }

    fn params_of(&self, block: usize, tracked: bool) -> Vec<Tensor> {
        self.block_params[block]
            .iter()
            .map(|&i| {
                let t = self.vars[i].as_tensor();
                if tracked { t.clone() } else { t.detach() }
            })
            .collect()
    }

    fn accumulate(
        &self,
        block: usize,
        grads: &candle_core::backprop::GradStore,
        flat_grads: &mut [f32],
    ) -> Result<(), ModelError> {
        for &i in &self.block_params[block] {
            if let Some(g) = grads.get(self.vars[i].as_tensor()) {
                let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                for (acc, x) in flat_grads[self.layout.range(i)].iter_mut().zip(g) {
                    *acc += x;
                }
            }
        }
        Ok(())
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
        mut block_done: impl FnMut(usize, &[f32]) -> Result<(), E>,
    ) -> Result<LossValues, E> {
        self.mark(EngineEvent::ForwardStart);
        let ctx = self.separator.prepare_context(mixture)?;
        let blocks = self.separator.blocks();
        let last = blocks.len() - 1;
        // Forward through every block but the head. Keeping: block i's input Var and its
        // output with the graph. Recomputing: only the untracked input.
        let mut kept: Vec<Kept> = Vec::with_capacity(blocks.len());
        let mut x = ctx.first_input().clone();
        for (i, block) in blocks[..last].iter().enumerate() {
            if self.recompute {
                let y = block.forward(&self.params_of(i, false), &x, &ctx)?;
                kept.push(Kept::Input(x));
                x = y;
            } else {
                // The first block's input is data; later inputs need their gradient.
                let input = if i == 0 {
                    None
                } else {
                    Some(Var::from_tensor(&x)?)
                };
                let arg = input.as_ref().map_or(&x, |v| v.as_tensor());
                let y = block.forward(&self.params_of(i, true), arg, &ctx)?;
                x = y.detach();
                kept.push(Kept::Graph { input, output: y });
            }
            self.mark(EngineEvent::BlockForward(i));
        }
        // Head and loss: one backward from the loss gives the head's gradients and `g`.
        let head_in = Var::from_tensor(&x)?;
        let estimate =
            blocks[last].forward(&self.params_of(last, true), head_in.as_tensor(), &ctx)?;
        let parts = self.loss.compute(&estimate, target)?;
        let values = LossValues {
            total: scalar(&parts.total)?,
            waveform: scalar(&parts.waveform)?,
            mse: scalar(&parts.mse)?,
            multi_stft: scalar(&parts.multi_stft)?,
        };
        self.mark(EngineEvent::BlockForward(last));
        self.mark(EngineEvent::BackwardStart);
        let grads = parts.total.backward()?;
        drop((parts, estimate));
        self.accumulate(last, &grads, flat_grads)?;
        block_done(last, flat_grads)?;
        let mut g = grads
            .get(head_in.as_tensor())
            .cloned()
            .unwrap_or(x.zeros_like()?);
        drop(grads);
        self.mark(EngineEvent::BlockBackward(last));
        for i in (0..last).rev() {
            let (input, y) = match kept.pop() {
                Some(Kept::Graph { input, output }) => (input, output),
                Some(Kept::Input(x)) => {
                    // Recompute: the same forward, now tracked.
                    let input = if i == 0 {
                        None
                    } else {
                        Some(Var::from_tensor(&x)?)
                    };
                    let arg = input.as_ref().map_or(&x, |v| v.as_tensor());
                    let y = blocks[i].forward(&self.params_of(i, true), arg, &ctx)?;
                    (input, y)
                }
                None => {
                    return Err(ModelError::Input("block bookkeeping out of step".into()).into());
                }
            };
            let grads = (y * &g)?.sum_all()?.backward()?;
            self.accumulate(i, &grads, flat_grads)?;
            block_done(i, flat_grads)?;
            if let Some(v) = &input {
                g = grads
                    .get(v.as_tensor())
                    .cloned()
                    .unwrap_or(v.as_tensor().zeros_like()?);
            }
            drop((grads, input));
            self.mark(EngineEvent::BlockBackward(i));
        }
        Ok(values)
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
        let ctx = self.separator.prepare_context(mixture)?;
        let mut x = ctx.first_input().clone();
        for (i, block) in self.separator.blocks().iter().enumerate() {
            x = block.forward(&self.params_of(i, false), &x, &ctx)?;
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
