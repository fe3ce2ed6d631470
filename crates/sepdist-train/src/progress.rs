//! The progress line of the originating guide, and the metrics file.
//!
//! On a terminal: one bar per epoch,
//! `Epoch 3: 42%|████| 42/100 [00:10<00:14, loss=0.2345, lr=3.0e-04, mem=1.2/1.5GB, 4.1 samples/s]`.
//! Elsewhere (batch logs): a plain line every `log_every` steps with the same fields.

use crate::memory::MemorySnapshot;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// `1.2/1.5GB`, or `312/540MB` below a gigabyte.
pub fn format_memory(allocated: usize, reserved: usize) -> String {
    const GB: f64 = (1u64 << 30) as f64;
    const MB: f64 = (1u64 << 20) as f64;
    let (a, r) = (allocated as f64, reserved as f64);
    if a.max(r) >= GB {
        format!("{:.1}/{:.1}GB", a / GB, r / GB)
    } else {
        format!("{:.0}/{:.0}MB", a / MB, r / MB)
    }
}

/// `3.0e-04`: one decimal and a two-digit exponent, as Python prints it.
pub fn scientific(x: f64) -> String {
    let text = format!("{x:.1e}");
    match text.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ("-", d),
                None => ("+", exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => text,
    }
}

/// What one optimizer step reports.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    pub epoch: u64,
    /// 1-based position of the step within its epoch.
    pub step_in_epoch: u64,
    pub steps_per_epoch: u64,
    pub loss: f64,
    pub lr: f64,
    pub memory: MemorySnapshot,
    pub samples_per_s: f64,
}

impl StepReport {
    /// The fields shared by the bar and the plain line.
    pub fn fields(&self) -> String {
        format!(
            "loss={:.4}, lr={}, mem={}, {:.1} samples/s",
            self.loss,
            scientific(self.lr),
            format_memory(self.memory.allocated, self.memory.reserved),
            self.samples_per_s
        )
    }
}

pub struct Progress {
    terminal: bool,
    log_every: u64,
    bar: Option<(u64, ProgressBar)>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("terminal", &self.terminal)
            .field("log_every", &self.log_every)
            .finish()
    }
}

impl Progress {
    /// `terminal`: draw bars on stderr (else plain lines every `log_every` steps).
    pub fn new(terminal: bool, log_every: u64) -> Self {
        Self {
            terminal,
            log_every: log_every.max(1),
            bar: None,
        }
    }

    /// Progress as stderr allows: bars on a terminal, plain lines otherwise.
    pub fn for_stderr(log_every: u64) -> Self {
        use std::io::IsTerminal;
        Self::new(std::io::stderr().is_terminal(), log_every)
    }

    pub fn update(&mut self, r: &StepReport) {
        if !self.terminal {
            if r.step_in_epoch % self.log_every == 0 || r.step_in_epoch == r.steps_per_epoch {
                eprintln!(
                    "epoch {} step {}/{}: {}",
                    r.epoch,
                    r.step_in_epoch,
                    r.steps_per_epoch,
                    r.fields()
                );
            }
            return;
        }
        if self.bar.as_ref().is_none_or(|(e, _)| *e != r.epoch) {
            self.finish();
            let bar = ProgressBar::with_draw_target(
                Some(r.steps_per_epoch),
                ProgressDrawTarget::stderr(),
            );
            let style = ProgressStyle::with_template(
                "{prefix}: {percent:>3}%|{bar:20}| {pos}/{len} [{elapsed}<{eta}, {msg}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("█▉▊▋▌▍▎▏ ");
            bar.set_style(style);
            bar.set_prefix(format!("Epoch {}", r.epoch));
            self.bar = Some((r.epoch, bar));
        }
        if let Some((_, bar)) = &self.bar {
            bar.set_message(r.fields());
            bar.set_position(r.step_in_epoch);
        }
    }

    /// A line printed above the bar (or plainly).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some((_, bar)) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Leaves the current bar on screen and starts a new line.
    pub fn finish(&mut self) {
        if let Some((_, bar)) = self.bar.take() {
            bar.abandon();
        }
    }
}

/// Appends one JSON object per line to `output_dir/metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsWriter {
    pub fn append(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes and flushes one record, so a killed run keeps every completed step.
    pub fn write<T: Serialize>(&mut self, record: &T) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_like_the_guide() {
        let r = StepReport {
            epoch: 3,
            step_in_epoch: 42,
            steps_per_epoch: 100,
            loss: 0.23454,
            lr: 3.0e-4,
            memory: MemorySnapshot {
                allocated: 1_288_490_189,
                peak_allocated: 0,
                reserved: 1_610_612_736,
                peak_reserved: 0,
            },
            samples_per_s: 4.12,
        };
        assert_eq!(
            r.fields(),
            "loss=0.2345, lr=3.0e-04, mem=1.2/1.5GB, 4.1 samples/s"
        );
        assert_eq!(format_memory(300 << 20, 540 << 20), "300/540MB");
        assert_eq!(scientific(1.0e-3), "1.0e-03");
        assert_eq!(scientific(12.0), "1.2e+01");
    }

    #[test]
    fn metrics_are_appended_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/metrics.jsonl");
        let mut w = MetricsWriter::append(&path).unwrap();
        w.write(&serde_json::json!({"step": 1, "loss": 0.5}))
            .unwrap();
        drop(w);
        let mut w = MetricsWriter::append(&path).unwrap();
        w.write(&serde_json::json!({"step": 2, "loss": 0.25}))
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, [1, 2]);
    }
}
