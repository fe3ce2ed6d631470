//! `sepdist plan`: per-rank memory and relative step time predicted from a config, for the
//! configured setting and its alternatives; `--fit` picks the fastest setting that fits.

use clap::Args;
use sepdist_config::load_file;
use sepdist_train::plan::text::{breakdown, describe_fit, note, set_args};
use sepdist_train::plan::{
    DeviceKind, DeviceSpec, Fit, Planner, Prediction, Setting, cpu_threads, format_bytes,
    parse_bytes, precision_name,
};
use std::fmt::Write as _;
use std::path::PathBuf;

/// Exit code of `sepdist plan --fit` when no setting fits the budget.
pub const EXIT_NO_FIT: u8 = 3;

#[derive(Debug, Args)]
#[command(after_long_help = "\
Memory is predicted per rank without allocating anything: buffers of known size (parameters \
as Vars plus the flat fp32 master copy, the flat gradient, AdamW moments over this rank's \
shard, batches, communication buffers of the ZeRO stage) plus the activations, found by \
replaying the micro-batch's tensors op by op with the rules by which candle allocates, keeps \
and frees them (keep or recompute per block).

Relative step time: model FLOPs of the step × (3 + r)/3 at the device's peak, r the forward \
FLOPs recomputed by activation checkpointing as a fraction of the forward, plus the bytes \
each rank sends (ring all-reduce 2(W-1)/W·4n, reduce-scatter and all-gather (W-1)/W·4n each; \
ZeRO-3 gathers every piece once, recomputed blocks twice, and reduce-scatters every piece \
once per micro-batch) at the device's link \
bandwidth, not overlapped. Among equal times the larger micro-batch is preferred.

Exit codes: 0, or with --fit 0 when a setting fits and 3 when none does (the message says how \
much is missing and which setting gets closest); 2 for usage or configuration errors.")]
pub struct PlanArgs {
    /// YAML config file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Override a config key, e.g. --set training.batch_size=2.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Ranks (one device each).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub world_size: usize,
    /// Memory per rank, e.g. 97GB, 24GB, 80GiB (default: the device's capacity).
    #[arg(long, value_name = "SIZE")]
    pub budget: Option<String>,
    /// Device: h200 (141 GB), rtx-pro-6000 (97.9 GB, the originating guide's card) or cpu
    /// (MemAvailable of this machine).
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub device: String,
    /// Choose the fastest predicted setting that fits the budget, keeping the effective batch
    /// (micro-batch × accumulation × world size); prints it as --set overrides.
    #[arg(long)]
    pub fit: bool,
    /// Effective batch to keep with --fit (default: the config's batch_size ×
    /// gradient_accumulation_steps × world size).
    #[arg(long, value_name = "N")]
    pub effective_batch: Option<usize>,
    /// With --fit: write the fitted config (YAML) to FILE.
    #[arg(long, value_name = "FILE", requires = "fit")]
    pub write: Option<PathBuf>,
}

pub fn run(args: PlanArgs) -> Result<u8, crate::Failure> {
    let usage = |m: String| crate::Failure {
        code: crate::EXIT_USAGE,
        error: anyhow::anyhow!(m),
    };
    let config = load_file(&args.config, &args.overrides)?;
    let kind = DeviceKind::parse(&args.device).map_err(usage)?;
    let device = DeviceSpec::new(kind, cpu_threads());
    let budget = match &args.budget {
        Some(b) => parse_bytes(b).map_err(|e| usage(format!("--budget: {e}")))?,
        None => device.capacity,
    };
    let planner = Planner::new(&config, args.world_size, device)
        .map_err(|e| usage(format!("{}: {e}", args.config.display())))?;
    let mut out = header(&planner, &args, budget);
    if args.fit {
        let base = planner.configured();
        let effective = args
            .effective_batch
            .unwrap_or_else(|| base.micro_batch * base.accumulation * planner.world);
        let fit = planner
            .fit(effective, budget)
            .map_err(|e| usage(e.to_string()))?;
        let code = fit_text(&planner, &fit, effective, budget, &args, &mut out)?;
        print!("{out}");
        return Ok(code);
    }
    let configured = planner.predict(&planner.configured());
    breakdown(&planner, &configured, budget, &mut out);
    alternatives(&planner, &configured, budget, &mut out);
    print!("{out}");
    Ok(0)
}

fn flops(x: f64) -> String {
    for (scale, unit) in [
        (1e15, "PFLOP"),
        (1e12, "TFLOP"),
        (1e9, "GFLOP"),
        (1e6, "MFLOP"),
    ] {
        if x >= scale {
            return format!("{:.2} {unit}", x / scale);
        }
    }
    format!("{x:.0} FLOP")
}

fn header(p: &Planner, args: &PlanArgs, budget: u64) -> String {
    let c = &p.cfg;
    let m = &c.model;
    let base = p.predict(&p.configured());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "plan: {} on {} × {} ({}); budget {} per rank (1 GB = 10^9 bytes)",
        args.config.display(),
        p.world,
        p.device.kind.name(),
        p.device.capacity_note,
        format_bytes(budget)
    );
    let _ = writeln!(
        out,
        "model: {} parameters ({} in fp32); {} layers of (time, band) transformers, width {}, {} heads, FFN {:?}; {} sources",
        crate::config_cmd::thousands(base.params),
        format_bytes(base.params * 4),
        m.n_layers,
        m.emb_dim,
        m.n_heads,
        m.ffn_hidden_dim,
        c.dataset.sources.len()
    );
    let g = base.setting.micro_batch * base.setting.accumulation * p.world;
    let _ = writeln!(
        out,
        "FLOPs: {} forward per sample ({} forward+backward); {} per optimizer step (effective batch {g} = {} × {} × {})",
        flops(base.flops_per_sample),
        flops(3.0 * base.flops_per_sample),
        flops(base.flops_per_step),
        base.setting.micro_batch,
        base.setting.accumulation,
        p.world
    );
    let _ = writeln!(
        out,
        "shapes: {} samples ({:.2} s) = {} frames × {} bands; one [B, T, K, D] activation of the micro-batch ({}) = {}",
        c.dataset.segment_length,
        c.dataset.segment_length as f64 / f64::from(c.dataset.sample_rate.max(1)),
        m.frames(c.dataset.segment_length),
        m.bands.widths().len(),
        base.setting.micro_batch,
        format_bytes(base.unit)
    );
    out
}

fn table_row(
    out: &mut String,
    p: &Planner,
    label: &str,
    pr: &Prediction,
    base_s: f64,
    budget: u64,
) {
    let s = &pr.setting;
    let _ = writeln!(
        out,
        "  {:<38} {:>9}  {:<4} {:>4}  {:>6.1} s  {:<4}  {:>10}  {:<4}  {:>5.2}",
        format!("{label}{}", note(pr)),
        format!("{}×{}", s.micro_batch, s.accumulation),
        if s.checkpointing { "on" } else { "off" },
        s.zero_stage,
        s.segment_length as f64 / f64::from(p.cfg.dataset.sample_rate.max(1)),
        precision_name(s.precision),
        format_bytes(pr.peak),
        if pr.peak <= budget { "yes" } else { "no" },
        pr.step_s() / base_s
    );
}

fn alternatives(p: &Planner, configured: &Prediction, budget: u64, out: &mut String) {
    let _ = writeln!(
        out,
        "\nalternatives (same effective batch; peak per rank; time relative to the configured setting, see --help):"
    );
    let _ = writeln!(
        out,
        "  {:<38} {:>9}  {:<4} {:>4}  {:>8}  {:<4}  {:>10}  {:<4}  {:>5}",
        "setting", "micro×acc", "ckpt", "ZeRO", "segment", "prec", "peak/rank", "fits", "time"
    );
    let base_s = configured.step_s().max(1e-30);
    let mut any_design = !configured.implemented;
    for (label, setting) in p.alternatives() {
        let pr = if setting == configured.setting {
            configured.clone()
        } else {
            p.predict(&setting)
        };
        any_design |= !pr.implemented;
        table_row(out, p, &label, &pr, base_s, budget);
    }
    if any_design {
        let _ = writeln!(
            out,
            "  * bf16 predicted from its design (fused bf16 kernels); this build runs bf16 through composed ops and needs several times more (4-6x measured on the CPU)"
        );
    }
    let _ = writeln!(
        out,
        "  (shorter segments and bf16 change what is trained; `sepdist plan --fit` varies only micro-batch, accumulation, checkpointing and ZeRO stage)"
    );
}

fn fit_text(
    p: &Planner,
    fit: &Fit,
    effective: usize,
    budget: u64,
    args: &PlanArgs,
    out: &mut String,
) -> Result<u8, crate::Failure> {
    let base = p.configured();
    // Reference: the same effective batch in one micro-batch per rank, no recompute, ZeRO 0.
    let reference = Setting {
        micro_batch: effective / p.world,
        accumulation: 1,
        checkpointing: false,
        zero_stage: 0,
        ..base.clone()
    };
    let reference = p.predict(&reference);
    let base_s = reference.step_s().max(1e-30);
    let _ = writeln!(
        out,
        "effective batch {effective}: {} per optimizer step; relative step times below are against the same batch without recompute at ZeRO 0",
        flops(reference.flops_per_step)
    );
    match fit {
        Fit::Fits(best) => {
            let _ = writeln!(
                out,
                "\nfit: effective batch {effective} on {} rank(s): {}{}: predicted peak {} per rank (budget {}), relative step time {:.2}",
                p.world,
                describe_fit(&best.setting),
                note(best),
                format_bytes(best.peak),
                format_bytes(budget),
                best.step_s() / base_s
            );
            if !best.implemented {
                let _ = writeln!(
                    out,
                    "  (* bf16 is predicted from its design; this build's bf16 needs several times more)"
                );
            }
            let line = set_args(&best.setting.overrides(&base));
            let _ = writeln!(out, "  {line}");
            breakdown(p, best, budget, out);
            if let Some(path) = &args.write {
                let fitted = best.setting.apply(&p.cfg);
                let text = format!(
                    "# Fitted by `sepdist plan --fit` for {} × {} with {} per rank (effective batch {effective}):\n# {line}\n{}",
                    p.world,
                    p.device.kind.name(),
                    format_bytes(budget),
                    fitted.to_yaml()
                );
                std::fs::write(path, text)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
                let _ = writeln!(out, "wrote {}", path.display());
            }
            Ok(0)
        }
        Fit::Short(closest) => {
            let _ = writeln!(
                out,
                "\nnothing fits {} per rank with an effective batch of {effective} on {} rank(s): the closest, {}{}, needs {} ({} more)",
                format_bytes(budget),
                p.world,
                describe_fit(&closest.setting),
                note(closest),
                format_bytes(closest.peak),
                format_bytes(closest.peak - budget)
            );
            let _ = writeln!(out, "  {}", set_args(&closest.setting.overrides(&base)));
            if !closest.implemented {
                let _ = writeln!(
                    out,
                    "  (* bf16 is predicted from its design; this build's bf16 needs several times more)"
                );
            }
            // Changes outside the search, applied to the closest setting.
            let sr = p.cfg.dataset.sample_rate.max(1) as usize;
            let mut others: Vec<(String, Setting)> = Vec::new();
            for secs in [10usize, 5] {
                let seg = secs * sr;
                if seg < closest.setting.segment_length && seg >= p.cfg.model.n_fft {
                    others.push((
                        format!("--set dataset.segment_length={seg} ({secs} s)"),
                        Setting {
                            segment_length: seg,
                            ..closest.setting.clone()
                        },
                    ));
                }
            }
            if p.device.kind.is_gpu()
                && closest.setting.precision != sepdist_config::Precision::Bf16
            {
                others.push((
                    "--set training.precision=bf16".into(),
                    Setting {
                        precision: sepdist_config::Precision::Bf16,
                        ..closest.setting.clone()
                    },
                ));
            }
            if !others.is_empty() {
                let _ = writeln!(
                    out,
                    "  changes outside the search (they change the data or the arithmetic), on top of it:"
                );
                for (label, s) in others {
                    let pr = p.predict(&s);
                    let _ = writeln!(
                        out,
                        "    {label}: {}{}{}",
                        format_bytes(pr.peak),
                        if pr.peak <= budget { " (fits)" } else { "" },
                        if pr.implemented {
                            ""
                        } else {
                            " (* predicted from its design; this build's bf16 needs several times more)"
                        }
                    );
                }
            }
            if p.world < 8 {
                let _ = writeln!(
                    out,
                    "  more ranks also help (ZeRO shards the optimizer state, gradients and parameters over them)"
                );
            }
            breakdown(p, closest, budget, out);
            Ok(EXIT_NO_FIT)
        }
    }
}
