//! `sepdist plot`: figures of a run's `metrics.jsonl` against the optimizer step, as PNG and
//! SVG: `loss` (train total and parts, validation), `lr`, `memory` (allocated and reserved,
//! current and peak) and `sdr` (validation `usdr_*`). A figure without data is skipped.
//!
//! Text is drawn with an embedded DejaVu Sans through plotters' `ab_glyph` backend, so plots
//! render the same on machines without fonts or fontconfig (CI, compute nodes).

use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::{Map, Value};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Figure size in pixels (PNG) and user units (SVG).
const SIZE: (u32, u32) = (1200, 700);
/// Series longer than this are averaged in buckets: a 100k-step run would otherwise give
/// multi-megabyte SVGs without a visible difference.
const MAX_POINTS: usize = 2000;
/// The font family name the embedded font is registered under (plotters' default family).
const FONT: &str = "sans-serif";

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}:{line}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: cannot create the output folder: {source}", path.display())]
    Output { path: PathBuf, source: io::Error },
    #[error("{}: cannot draw the figure: {message}", path.display())]
    Draw { path: PathBuf, message: String },
    #[error("{}: nothing to plot (no train or validation records)", path.display())]
    Empty { path: PathBuf },
    #[error("the embedded plot font could not be loaded")]
    Font,
}

/// One line of `metrics.jsonl` that plotting uses.
#[derive(Debug, Clone)]
pub struct Record {
    /// `train` or `validation` (other kinds are read and ignored).
    pub kind: String,
    pub step: f64,
    pub fields: Map<String, Value>,
}

/// What [`plot_run`] did: the files it wrote and the figures it skipped, with why.
#[derive(Debug, Default)]
pub struct PlotReport {
    pub written: Vec<PathBuf>,
    pub skipped: Vec<(String, String)>,
}

/// Reads a metrics file. Blank lines are allowed; a line that is not a JSON object with a
/// string `kind`, or a `train`/`validation` record without a numeric `step`, is an error
/// naming the line (1-based).
pub fn read_metrics(path: &Path) -> Result<Vec<Record>, PlotError> {
    let text = fs::read_to_string(path).map_err(|source| PlotError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parse_error = |message: String| PlotError::Parse {
            path: path.to_path_buf(),
            line: index + 1,
            message,
        };
        let fields = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(parse_error("not a JSON object".to_string())),
            Err(e) => return Err(parse_error(format!("invalid JSON: {e}"))),
        };
        let kind = match fields.get("kind") {
            Some(Value::String(kind)) => kind.clone(),
            _ => return Err(parse_error("no string \"kind\"".to_string())),
        };
        if kind != "train" && kind != "validation" {
            // Kinds added later (events, evaluations) are not an error for old plotters.
            continue;
        }
        let step = match fields.get("step").and_then(Value::as_f64) {
            Some(step) => step,
            None => {
                return Err(parse_error(format!(
                    "{kind} record without a numeric \"step\""
                )));
            }
        };
        records.push(Record { kind, step, fields });
    }
    Ok(records)
}

/// Reads `run_dir/metrics.jsonl` and writes `loss`, `lr`, `memory` and `sdr` as `.png` and
/// `.svg` into `out_dir` (created if needed). A file without any train or validation record
/// is an error rather than an empty set of figures.
pub fn plot_run(run_dir: &Path, out_dir: &Path) -> Result<PlotReport, PlotError> {
    let path = run_dir.join("metrics.jsonl");
    let records = read_metrics(&path)?;
    if records.is_empty() {
        return Err(PlotError::Empty { path });
    }
    plot_records(&records, out_dir)
}

/// Writes the figures of already-read records (see [`plot_run`]).
pub fn plot_records(records: &[Record], out_dir: &Path) -> Result<PlotReport, PlotError> {
    register_font()?;
    fs::create_dir_all(out_dir).map_err(|source| PlotError::Output {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let mut report = PlotReport::default();
    for figure in figures(records) {
        if figure.series.iter().all(|s| s.points.is_empty()) {
            report
                .skipped
                .push((figure.name.to_string(), figure.missing.to_string()));
            continue;
        }
        let png = out_dir.join(format!("{}.png", figure.name));
        let drawn = draw(BitMapBackend::new(&png, SIZE).into_drawing_area(), &figure);
        drawn.map_err(|message| PlotError::Draw {
            path: png.clone(),
            message,
        })?;
        report.written.push(png);
        let svg = out_dir.join(format!("{}.svg", figure.name));
        let drawn = draw(SVGBackend::new(&svg, SIZE).into_drawing_area(), &figure);
        drawn.map_err(|message| PlotError::Draw {
            path: svg.clone(),
            message,
        })?;
        report.written.push(svg);
    }
    Ok(report)
}

fn register_font() -> Result<(), PlotError> {
    // plotters keeps fonts in a process-wide table; registering once is enough.
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    if ok { Ok(()) } else { Err(PlotError::Font) }
}

struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    /// Sparse series (validation) get dots so single points stay visible.
    markers: bool,
    color: RGBColor,
}

struct Figure {
    name: &'static str,
    title: &'static str,
    y_desc: &'static str,
    missing: &'static str,
    series: Vec<Series>,
    y_format: fn(&f64) -> String,
}

// Colour-blind-safe palette (Okabe & Ito), train in blues/greens, validation in warm tones.
const BLUE: RGBColor = RGBColor(0, 114, 178);
const SKY: RGBColor = RGBColor(86, 180, 233);
const GREEN: RGBColor = RGBColor(0, 158, 115);
const VERMILION: RGBColor = RGBColor(213, 94, 0);
const ORANGE: RGBColor = RGBColor(230, 159, 0);
const PURPLE: RGBColor = RGBColor(204, 121, 167);
const BLACK: RGBColor = RGBColor(0, 0, 0);
const PALETTE: [RGBColor; 7] = [BLUE, VERMILION, GREEN, ORANGE, PURPLE, SKY, BLACK];

fn series(records: &[Record], kind: &str, key: &str) -> Vec<(f64, f64)> {
    let points = records
        .iter()
        .filter(|r| r.kind == kind)
        .filter_map(|r| {
            // NaN losses of skipped steps are written as null: leave a gap, not a zero.
            let v = r.fields.get(key)?.as_f64()?;
            v.is_finite().then_some((r.step, v))
        })
        .collect();
    thin(points)
}

/// Averages consecutive points in equal buckets down to at most [`MAX_POINTS`].
fn thin(points: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    if points.len() <= MAX_POINTS {
        return points;
    }
    let bucket = points.len().div_ceil(MAX_POINTS);
    points
        .chunks(bucket)
        .map(|c| {
            let n = c.len() as f64;
            let (sx, sy) = c.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
            (sx / n, sy / n)
        })
        .collect()
}

fn figures(records: &[Record]) -> Vec<Figure> {
    let line = |label: &str, kind: &str, key: &str, color: RGBColor| Series {
        label: label.to_string(),
        points: series(records, kind, key),
        markers: kind == "validation",
        color,
    };
    let gib = |points: Vec<(f64, f64)>| -> Vec<(f64, f64)> {
        const GIB: f64 = (1u64 << 30) as f64;
        points.into_iter().map(|(x, y)| (x, y / GIB)).collect()
    };
    let memory_line = |label: &str, key: &str, color: RGBColor| Series {
        points: gib(series(records, "train", key)),
        ..line(label, "train", key, color)
    };

    // Per-source uSDR keys in the order the records list them, the mean last.
    let mut sdr_keys: Vec<String> = Vec::new();
    for r in records.iter().filter(|r| r.kind == "validation") {
        for key in r.fields.keys() {
            if key.starts_with("usdr_") && key != "usdr_mean" && !sdr_keys.contains(key) {
                sdr_keys.push(key.clone());
            }
        }
    }
    let mut sdr: Vec<Series> = sdr_keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let source = key.trim_start_matches("usdr_");
            line(source, "validation", key, PALETTE[i % (PALETTE.len() - 1)])
        })
        .collect();
    sdr.push(line("mean", "validation", "usdr_mean", BLACK));

    vec![
        Figure {
            name: "loss",
            title: "Loss",
            y_desc: "loss",
            missing: "no loss values",
            series: vec![
                line("train", "train", "loss", BLUE),
                line("train waveform L1", "train", "loss_waveform", SKY),
                line("train multi-STFT", "train", "loss_multi_stft", GREEN),
                line("validation", "validation", "loss", VERMILION),
                line(
                    "validation waveform L1",
                    "validation",
                    "loss_waveform",
                    ORANGE,
                ),
                line(
                    "validation multi-STFT",
                    "validation",
                    "loss_multi_stft",
                    PURPLE,
                ),
            ],
            y_format: |v| format!("{v:.3}"),
        },
        Figure {
            name: "lr",
            title: "Learning rate",
            y_desc: "learning rate",
            missing: "no \"lr\" values",
            series: vec![line("lr", "train", "lr", BLUE)],
            y_format: |v| format!("{v:.1e}"),
        },
        Figure {
            name: "memory",
            title: "Memory",
            y_desc: "memory (GiB)",
            missing: "no \"mem_*\" values",
            series: vec![
                memory_line("allocated", "mem_allocated", BLUE),
                memory_line("peak allocated", "mem_peak_allocated", SKY),
                memory_line("reserved", "mem_reserved", VERMILION),
                memory_line("peak reserved", "mem_peak_reserved", ORANGE),
            ],
            y_format: |v| format!("{v:.2}"),
        },
        Figure {
            name: "sdr",
            title: "Validation uSDR",
            y_desc: "uSDR (dB)",
            missing: "no validation \"usdr_*\" values",
            series: sdr,
            y_format: |v| format!("{v:.1}"),
        },
    ]
}

/// A range around `lo..hi` with a margin, never empty (a single point or a flat line).
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.05
    } else {
        (lo.abs() * 0.1).max(1e-9)
    };
    (lo - pad)..(hi + pad)
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, fig: &Figure) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let points = || fig.series.iter().flat_map(|s| s.points.iter());
    let (x_lo, x_hi) = points().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y_lo, y_hi) = points().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    // Steps start at 0 or 1: a little room on the left only when there is a single step.
    let x_range = if x_hi > x_lo {
        x_lo..x_hi
    } else {
        padded(x_lo, x_hi)
    };

    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(fig.title, (FONT, 30))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(x_range, padded(y_lo, y_hi))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(fig.y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&fig.y_format)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 20))
        .light_line_style(RGBColor(242, 242, 242))
        .draw()
        .map_err(err)?;

    for s in fig.series.iter().filter(|s| !s.points.is_empty()) {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(s.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        if s.markers {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(err)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_keeps_short_series_and_averages_long_ones() {
        let short: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 1.0)).collect();
        assert_eq!(thin(short.clone()), short);
        let long: Vec<(f64, f64)> = (0..5000).map(|i| (i as f64, i as f64)).collect();
        let thinned = thin(long);
        assert!(thinned.len() <= MAX_POINTS, "{}", thinned.len());
        // Buckets of 3: the first averages steps 0, 1, 2.
        assert_eq!(thinned[0], (1.0, 1.0));
    }

    #[test]
    fn padded_range_is_never_empty() {
        let r = padded(2.0, 2.0);
        assert!(r.start < 2.0 && r.end > 2.0);
        let r = padded(0.0, 0.0);
        assert!(r.start < r.end);
    }
}
