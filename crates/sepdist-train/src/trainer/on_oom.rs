//! What the trainer does when a step went over the memory budget or ran out of CUDA memory on
//! some rank (the step's scalar all-reduce carried the flag, so every rank is here for the same
//! step and nothing of the step was applied): diagnose, then stop or refit (`training.on_oom`).

use super::{StepFailure, TrainError, Trainer, io};
use crate::memory::Phase;
use crate::oom::{capacity_after_failure, fitted_after_failure, fitted_text, planner_for};
use crate::plan::text::describe_fit;
use crate::plan::{Setting, format_bytes};
use crate::progress::MetricsWriter;
use sepdist_config::OnOom;
use sepdist_data::Schedule;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// One rank's part of the diagnosis, gathered by every rank.
#[derive(Debug, Serialize, Deserialize)]
struct RankFailure {
    /// Bytes the failed step needed on this rank: its heap peak over the budget, or more than
    /// the rank could use when an op ran out of CUDA memory (0 on a rank that did not fail).
    peak: u64,
    /// What this rank could use: the budget, or its memory at a CUDA out-of-memory.
    limit: Option<u64>,
    /// Where and how an op ran out of CUDA memory on this rank.
    cuda: Option<String>,
    /// A CUDA failure in the first micro-batch's forward: the bytes needed at least and the
    /// block (engine index) where, for [`crate::oom::shortfall`].
    reached: Option<(u64, usize)>,
    text: String,
}

impl Trainer<'_> {
    /// Optimizer step `step` (0-based) was discarded for going over the memory budget or for a
    /// CUDA out-of-memory error on some rank. Every rank shares its measured figures; rank 0
    /// prints them, the plan's prediction and the fitted setting. With `training.on_oom: refit`
    /// and a smaller setting that fits, the setting is applied and `Ok` returned (the caller
    /// redoes the step from the same state); otherwise every rank returns
    /// [`TrainError::OutOfMemory`] and nothing is saved, so the last checkpoint stays the
    /// newest.
    pub(super) fn out_of_memory(
        &mut self,
        step: u64,
        failed: &StepFailure,
        metrics: Option<&mut MetricsWriter>,
    ) -> Result<(), TrainError> {
        let window = &failed.window;
        let figures = self.meter.discard_step();
        let planner = planner_for(&self.cfg, self.comm.world_size(), self.engine.device())?;
        let current = planner.configured();
        let predicted = planner.predict(&current);
        let sr = self.cfg.dataset.sample_rate;
        let rank = self.comm.rank();
        let names: Vec<String> = self
            .engine
            .separator()
            .blocks()
            .iter()
            .map(|b| b.name().to_string())
            .collect();
        let acc = current.accumulation;
        let at = |l: Option<crate::memory::Location>| {
            l.map_or("step".into(), |l| l.describe(&names, acc))
        };
        let snap = self.meter.snapshot();
        let mut part = RankFailure {
            peak: 0,
            limit: window.budget.map(|b| b as u64),
            cuda: None,
            reached: None,
            text: String::new(),
        };
        // The first micro-batch's forward at a block: where the plan has a figure to compare.
        let in_first_forward = |l: Option<crate::memory::Location>| {
            l.filter(|l| l.phase == crate::memory::Phase::Forward && l.micro == Some(1))
                .and_then(|l| l.block)
        };
        let text = &mut part.text;
        if window.over_budget() {
            let budget = window.budget.unwrap_or(0) as u64;
            part.peak = window.peak as u64;
            let _ = writeln!(
                text,
                "rank {rank}: optimizer step {} went over training.memory_budget {}: heap peak {} ({} over); first over the budget in the {}, highest in the {}",
                step + 1,
                format_bytes(budget),
                format_bytes(window.peak as u64),
                format_bytes(window.peak as u64 - budget),
                at(window.first_over),
                at(window.peak_at)
            );
            let _ = writeln!(
                text,
                "  now: allocated {}, resident {}; peaks: allocated {}, resident {}",
                format_bytes(snap.allocated as u64),
                format_bytes(snap.reserved as u64),
                format_bytes(snap.peak_allocated as u64),
                format_bytes(snap.peak_reserved as u64)
            );
        }
        if let Some(c) = &failed.cuda {
            // What this rank could use: what its pool holds and what the device has left,
            // both now that the step's tensors are gone.
            let free = crate::device::memory(self.engine.device()).free();
            let (limit, source) =
                match capacity_after_failure(&self.cfg.training, snap.reserved as u64, free) {
                    Some(a) => (a.bytes, a.source),
                    // Nothing known: it failed above the highest the step reached.
                    None => (
                        window.peak.max(c.memory.allocated) as u64,
                        "this step's high-water mark before the failure".into(),
                    ),
                };
            part.limit = Some(part.limit.map_or(limit, |b| b.min(limit)));
            // At least one byte more than it had.
            part.peak = part.peak.max(limit.saturating_add(1));
            // Only here: a budget is crossed inside a block, above what the plan has for the
            // blocks done (their kept tensors), even when the plan is right; a CUDA failure
            // this early means the plan is low.
            if c.after_update_of.is_none() {
                part.reached = in_first_forward(Some(c.at)).map(|b| (part.peak, b));
            }
            let place = at(Some(c.at));
            let what = match c.after_update_of {
                Some(updated) => format!(
                    "ran out of CUDA memory refreshing the device's parameters after the update of optimizer step {} (applied on every rank; the host's weights are whole), in the {place}",
                    updated + 1
                ),
                None => format!(
                    "optimizer step {} ran out of CUDA memory in the {place}",
                    step + 1
                ),
            };
            part.cuda = Some(format!("{place}: {}", c.message));
            let _ = writeln!(text, "rank {rank}: {what}: {}", c.message);
            let _ = writeln!(
                text,
                "  at the failure: allocated {}, reserved {} (once the failing op had returned); this step's high-water mark {} in the {}",
                format_bytes(c.memory.allocated as u64),
                format_bytes(c.memory.reserved as u64),
                format_bytes(window.peak as u64),
                at(window.peak_at)
            );
            let _ = writeln!(
                text,
                "  the rank could use {} ({source}); peaks: allocated {}, reserved {}",
                format_bytes(limit),
                format_bytes(snap.peak_allocated as u64),
                format_bytes(snap.peak_reserved as u64)
            );
        }
        if part.peak > 0 {
            let peaks = self.meter.phase_peaks();
            let phases: Vec<String> = [
                Phase::Data,
                Phase::Forward,
                Phase::Backward,
                Phase::Communication,
                Phase::Optimizer,
                Phase::Validation,
                Phase::Checkpoint,
            ]
            .iter()
            .filter_map(|p| {
                peaks
                    .get(p.name())
                    .map(|b| format!("{} {}", p.name(), format_bytes(*b as u64)))
            })
            .collect();
            let _ = writeln!(text, "  phase peaks so far: {}", phases.join(", "));
            let title = format!(
                "  optimizer step {} measured ({}) next to the plan of {}:",
                step + 1,
                if failed.cuda.is_some() {
                    self.meter.describe()
                } else {
                    "this rank's heap".into()
                },
                current.describe(sr)
            );
            text.push_str(&crate::memory::report_step(
                &self.meter,
                &title,
                &figures,
                &self.known_buffers(step),
                Some(&predicted),
            ));
        }
        let bytes = serde_json::to_vec(&part)
            .map_err(|e| TrainError::Setup(format!("cannot encode the memory diagnosis: {e}")))?;
        let parts: Vec<RankFailure> = self
            .comm
            .all_gather_bytes(&bytes)?
            .iter()
            .map(|b| serde_json::from_slice(b))
            .collect::<Result<_, _>>()
            .map_err(|e| TrainError::Setup(format!("a rank sent a bad memory diagnosis: {e}")))?;
        // Every rank decides from the same gathered figures.
        let over: Vec<usize> = (0..parts.len()).filter(|&r| parts[r].peak > 0).collect();
        let cuda: Vec<usize> = (0..parts.len())
            .filter(|&r| parts[r].cuda.is_some())
            .collect();
        let budget_over: Vec<usize> = over.iter().copied().filter(|r| !cuda.contains(r)).collect();
        let measured = parts.iter().map(|p| p.peak).max().unwrap_or(0);
        // The tightest limit of the ranks that failed.
        let budget = over
            .iter()
            .filter_map(|&r| parts[r].limit)
            .min()
            .unwrap_or(0);
        let refit = self.cfg.training.on_oom == OnOom::Refit;
        // The rank whose failure shows the plan lowest sets the correction.
        let low = over
            .iter()
            .map(|&r| {
                let s = crate::oom::shortfall(&predicted, parts[r].peak, parts[r].reached);
                (s, parts[r].cuda.is_some())
            })
            .filter(|(s, _)| s.factor > 1.0)
            .max_by(|a, b| a.0.factor.total_cmp(&b.0.factor));
        let factor = low.map_or(1.0, |(s, _)| s.factor);
        let fitted = fitted_after_failure(&planner, budget, factor, refit)?;
        let g = current.micro_batch * current.accumulation * self.comm.world_size();
        let mut text: String = parts.iter().map(|p| p.text.as_str()).collect();
        let latest =
            std::fs::read_to_string(self.ckpt_dir.join(crate::checkpoint::LATEST_FILE)).ok();
        let _ = writeln!(
            text,
            "the step is discarded on every rank: weights and optimizer state are those after step {step}{}",
            latest.map_or(String::new(), |l| format!(
                "; the last checkpoint is {}",
                self.ckpt_dir.join(l.trim()).display()
            ))
        );
        match &fitted {
            Some(best) => {
                // The plan was low: its figures are scaled by what was measured (for a CUDA
                // out-of-memory, by the least the step needed: more than the rank had).
                let corrected = match low {
                    None => String::new(),
                    Some((s, cuda)) => {
                        let place = s.block.map_or(String::new(), |b| {
                            format!(
                                " by the forward of {}",
                                names.get(b).map_or("?", |n| n.as_str())
                            )
                        });
                        // A CUDA failure's figure is one byte more than the rank had.
                        let need = if cuda {
                            format!("more than {}", format_bytes(s.needed.saturating_sub(1)))
                        } else {
                            format_bytes(s.needed)
                        };
                        format!(
                            ", the plan scaled by {:.2}× ({need} needed{place}, {} predicted)",
                            s.factor,
                            format_bytes(s.predicted)
                        )
                    }
                };
                let _ = writeln!(
                    text,
                    "fitted setting for {} with the same effective batch {g}{corrected}: {}",
                    format_bytes(budget),
                    fitted_text(best, &current)
                );
            }
            None => {
                let _ = writeln!(
                    text,
                    "no setting of the effective batch {g} with a smaller predicted peak than {} fits {} (shorter segments, more ranks or a larger budget are left)",
                    describe_fit(&current),
                    format_bytes(budget)
                );
            }
        }
        let action = match (&fitted, refit) {
            (Some(best), true) => format!(
                "training.on_oom: refit: redoing step {} with {}",
                step + 1,
                describe_fit(&best.setting)
            ),
            (Some(_), false) => "stopping (training.on_oom: stop): resume with --resume auto and the overrides above, or set training.on_oom: refit".into(),
            (None, _) => "stopping: nothing smaller fits".into(),
        };
        let _ = writeln!(text, "{action}");
        if self.rank0() {
            // One write: the launcher forwards it whole.
            let _ = std::io::Write::write_all(&mut std::io::stderr(), text.as_bytes());
        }
        let ranks = |rs: &[usize]| {
            rs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(metrics) = metrics {
            let record = serde_json::json!({
                "kind": "out_of_memory",
                "step": step + 1,
                "budget": budget,
                "peak": measured,
                "predicted_peak": predicted.peak,
                "ranks": over,
                "cuda_ranks": cuda,
                "refit": fitted
                    .as_ref()
                    .filter(|_| refit)
                    .map(|b| b.setting.overrides(&current)),
                "diagnosis": text,
            });
            metrics
                .write(&record)
                .map_err(io(&self.cfg.training.output_dir))?;
        }
        match fitted {
            Some(best) if refit => self.apply_setting(&best.setting),
            _ => {
                // No rank exits before rank 0's diagnosis is out (launchers kill the rest on
                // the first non-zero exit).
                self.comm.barrier()?;
                let mut why = Vec::new();
                if !budget_over.is_empty() {
                    why.push(format!(
                        "went over training.memory_budget {} on rank(s) {} (peak {})",
                        format_bytes(window.budget.unwrap_or(0) as u64),
                        ranks(&budget_over),
                        format_bytes(
                            budget_over
                                .iter()
                                .map(|&r| parts[r].peak)
                                .max()
                                .unwrap_or(0)
                        )
                    ));
                }
                if let Some(first) = cuda.first().and_then(|&r| parts[r].cuda.as_ref()) {
                    why.push(format!(
                        "ran out of CUDA memory on rank(s) {} (rank {}: {first})",
                        ranks(&cuda),
                        cuda[0]
                    ));
                }
                Err(TrainError::OutOfMemory(format!(
                    "out of memory: optimizer step {} {}; stopped without a checkpoint of the failed step",
                    step + 1,
                    why.join("; ")
                )))
            }
        }
    }

    /// Runs on with `setting`'s micro-batch, accumulation and checkpointing (same effective
    /// batch, same ZeRO stage): the examples of every optimizer step stay the same (the
    /// sampler's index mapping), so only the rounding of the gradient sum changes.
    fn apply_setting(&mut self, setting: &Setting) -> Result<(), TrainError> {
        self.cfg = setting.apply(&self.cfg);
        self.engine.set_recompute(setting.checkpointing);
        let schedule = Schedule::from_config(&self.cfg, self.comm.world_size())?;
        debug_assert_eq!(schedule.global_batch(), self.schedule.global_batch());
        self.schedule = schedule;
        Ok(())
    }
}
