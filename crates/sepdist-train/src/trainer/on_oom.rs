//! What the trainer does when a step went over the memory budget on some rank (the step's
//! scalar all-reduce carried the flag, so every rank is here for the same step and nothing of
//! the step was applied): diagnose, then stop or refit (`training.on_oom`).

use super::{TrainError, Trainer, io};
use crate::memory::{Phase, Window};
use crate::oom::{fitted_after_failure, fitted_text, planner_for};
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
    /// Heap peak of the failed step's window (0 on a rank that stayed within the budget).
    peak: u64,
    text: String,
}

impl Trainer<'_> {
    /// Optimizer step `step` (0-based) was discarded for going over the memory budget. Every
    /// rank shares its measured figures; rank 0 prints them, the plan's prediction and the
    /// fitted setting. With `training.on_oom: refit` and a smaller setting that fits, the
    /// setting is applied and `Ok` returned (the caller redoes the step from the same state);
    /// otherwise every rank returns [`TrainError::OutOfMemory`] and nothing is saved, so the
    /// last checkpoint stays the newest.
    pub(super) fn out_of_memory(
        &mut self,
        step: u64,
        window: &Window,
        metrics: Option<&mut MetricsWriter>,
    ) -> Result<(), TrainError> {
        let figures = self.meter.discard_step();
        let planner = planner_for(&self.cfg, self.comm.world_size(), self.engine.device())?;
        let current = planner.configured();
        let predicted = planner.predict(&current);
        let budget = window.budget.unwrap_or(0) as u64;
        let sr = self.cfg.dataset.sample_rate;
        let mine = if window.over_budget() {
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
            let mut text = format!(
                "rank {}: optimizer step {} went over training.memory_budget {}: heap peak {} ({} over); first over the budget in the {}, highest in the {}\n",
                self.comm.rank(),
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
                "  optimizer step {} measured (this rank's heap) next to the plan of {}:",
                step + 1,
                current.describe(sr)
            );
            text.push_str(&crate::memory::report_step(
                &self.meter,
                &title,
                &figures,
                &self.known_buffers(step),
                Some(&predicted),
            ));
            text
        } else {
            String::new()
        };
        let part = RankFailure {
            peak: if window.over_budget() {
                window.peak as u64
            } else {
                0
            },
            text: mine,
        };
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
        let measured = parts.iter().map(|p| p.peak).max().unwrap_or(0);
        let refit = self.cfg.training.on_oom == OnOom::Refit;
        let fitted = fitted_after_failure(&planner, budget, measured, refit)?;
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
                // The plan was low: its figures are scaled by what was measured.
                let corrected = if measured > predicted.peak {
                    format!(
                        ", the plan scaled by the measured {} / predicted {}",
                        format_bytes(measured),
                        format_bytes(predicted.peak)
                    )
                } else {
                    String::new()
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
        if let Some(metrics) = metrics {
            let record = serde_json::json!({
                "kind": "out_of_memory",
                "step": step + 1,
                "budget": budget,
                "peak": measured,
                "predicted_peak": predicted.peak,
                "ranks": over,
                "refit": fitted
                    .as_ref()
                    .filter(|_| refit)
                    .map(|b| b.setting.overrides(&current)),
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
                Err(TrainError::OutOfMemory(format!(
                    "out of memory: optimizer step {} went over training.memory_budget {} on rank(s) {} (peak {}); stopped without a checkpoint of the failed step",
                    step + 1,
                    format_bytes(budget),
                    over.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    format_bytes(measured)
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
