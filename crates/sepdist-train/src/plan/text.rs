//! Text of the planner's results shared by `sepdist plan` and the trainer's out-of-memory
//! messages: the per-rank breakdown of one setting and the `--set` line of a fitted one.

use super::{Planner, Prediction, Setting, format_bytes};
use std::fmt::Write as _;

/// `*` after a setting whose prediction is of its design, not of the path this build runs
/// (bf16).
pub fn note(p: &Prediction) -> &'static str {
    if p.implemented { "" } else { "*" }
}

/// Where the memory goes, for one setting.
pub fn breakdown(p: &Planner, pr: &Prediction, budget: u64, out: &mut String) {
    let sr = p.cfg.dataset.sample_rate;
    let _ = writeln!(
        out,
        "\nper rank, {}{}: predicted peak {} in the {} phase ({})",
        pr.setting.describe(sr),
        note(pr),
        format_bytes(pr.peak),
        pr.peak_phase,
        pr.peak_at
    );
    let row = |out: &mut String, name: &str, b: u64, what: String| {
        let _ = writeln!(out, "  {name:<24}{:>11}   {what}", format_bytes(b));
    };
    let stage = pr.setting.zero_stage;
    row(
        out,
        "parameters",
        pr.parameters,
        if p.device.kind.is_gpu() {
            if stage >= 3 {
                "none on the device (the master shard is in host memory; gathered pieces: in the activations and working set)".into()
            } else {
                "weights as Vars on the device (the flat fp32 master copy is in host memory)".into()
            }
        } else if stage >= 3 {
            "fp32 master shard (gathered pieces: in the activations and working set)".into()
        } else {
            "weights as Vars + the trainer's flat fp32 master copy".into()
        },
    );
    row(
        out,
        "gradients",
        pr.gradients,
        match stage {
            _ if p.device.kind.is_gpu() => "none on the device (host memory)".into(),
            3.. => "fp32 gradient shard (each piece's gradient reduce-scattered into it)".into(),
            2 if p.world > 1 => {
                "flat fp32 gradient (kept whole: the backward accumulates into it) + shard".into()
            }
            _ => "flat fp32 gradient".into(),
        },
    );
    row(
        out,
        "optimizer state",
        pr.optimizer,
        if p.device.kind.is_gpu() {
            "none on the device (AdamW's moments are in host memory)".into()
        } else {
            format!(
                "AdamW m and v, fp32, over {} the flat vector{}",
                if stage >= 1 && p.world > 1 {
                    format!("1/{} of", p.world)
                } else {
                    "all of".to_string()
                },
                if p.cfg.training.ema.is_some() {
                    ", and the EMA weights"
                } else {
                    ""
                }
            )
        },
    );
    row(
        out,
        "data buffers",
        pr.data,
        if p.device.kind.is_gpu() {
            "the micro-batch's mixture and stems tensors".into()
        } else {
            "the batch in use (vectors and tensors) and the prefetched ones".into()
        },
    );
    if pr.runtime > 0 {
        row(
            out,
            "runtime",
            pr.runtime,
            if p.device.kind.is_gpu() {
                "the loss' STFT bases (DFT matmuls), cached on the device".to_string()
            } else {
                format!(
                    "gemm's per-thread packing slabs (one L2 cache each, {} threads)",
                    p.device.threads
                )
            },
        );
    }
    let blocks: u64 = pr.kept_per_block.iter().map(|(_, b)| b).sum();
    let context = pr.activations.saturating_sub(blocks + pr.head_and_loss);
    row(
        out,
        "activations kept",
        pr.activations,
        format!(
            "at the backward's start ({})",
            if pr.setting.checkpointing {
                "checkpointing: only block inputs"
            } else {
                "every block's graph or saved tensors"
            }
        ),
    );
    let _ = writeln!(
        out,
        "  {:<24}{:>11}     · mixture STFT and RoPE tables",
        "",
        format_bytes(context)
    );
    let mut by_kind: Vec<(String, u64, usize)> = Vec::new();
    for (name, b) in &pr.kept_per_block {
        let kind = if name.ends_with(".time") {
            "time transformer"
        } else if name.ends_with(".band") {
            "band transformer"
        } else {
            name.as_str()
        };
        match by_kind.iter_mut().find(|(k, _, _)| k == kind) {
            Some(e) => {
                e.1 += b;
                e.2 += 1;
            }
            None => by_kind.push((kind.to_string(), *b, 1)),
        }
    }
    for (kind, b, count) in by_kind {
        let each = if count > 1 {
            format!(" ({count} × {})", format_bytes(b / count as u64))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  {:<24}{:>11}     · {kind}{each}",
            "",
            format_bytes(b)
        );
    }
    let _ = writeln!(
        out,
        "  {:<24}{:>11}     · head (mask estimators, iSTFT) and loss graphs",
        "",
        format_bytes(pr.head_and_loss)
    );
    row(
        out,
        "transient working set",
        pr.transient,
        "highest forward/backward working set above the kept activations".into(),
    );
    row(
        out,
        "communication buffers",
        pr.communication,
        if p.world == 1 {
            "one rank: none".into()
        } else {
            match stage {
                0 | 1 => format!(
                    "every bucket's send and receive copy is in flight at the backward's end (buckets of {} MB)",
                    p.cfg.distributed.bucket_size_mb
                ),
                2 => "reduce-scatter: a send copy of the gradient and the shard received".into(),
                _ => "none between phases: pieces are gathered and reduce-scattered inside the micro-batch".into(),
            }
        },
    );
    let verdict = if pr.peak <= budget {
        format!(
            "fits {} ({} spare)",
            format_bytes(budget),
            format_bytes(budget - pr.peak)
        )
    } else {
        format!(
            "does not fit {} (short by {})",
            format_bytes(budget),
            format_bytes(pr.peak - budget)
        )
    };
    let _ = writeln!(
        out,
        "  {:<24}{:>11}   {verdict}",
        "peak",
        format_bytes(pr.peak)
    );
    let _ = writeln!(
        out,
        "  phase peaks: forward {}, backward {}, communication {}, optimizer {}",
        format_bytes(pr.forward_peak),
        format_bytes(pr.backward_peak),
        format_bytes(pr.communication_peak),
        format_bytes(pr.optimizer_peak)
    );
}

/// `micro-batch 2 × accumulation 4, checkpointing on, ZeRO 1`.
pub fn describe_fit(s: &Setting) -> String {
    format!(
        "micro-batch {} × accumulation {}, checkpointing {}, ZeRO {}",
        s.micro_batch,
        s.accumulation,
        if s.checkpointing { "on" } else { "off" },
        s.zero_stage
    )
}

/// `--set a=1 --set b=2`, ready to paste; `(the configured setting)` when there is none.
pub fn set_args(overrides: &[String]) -> String {
    if overrides.is_empty() {
        return "(the configured setting)".into();
    }
    overrides
        .iter()
        .map(|s| format!("--set {s}"))
        .collect::<Vec<_>>()
        .join(" ")
}
