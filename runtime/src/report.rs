//! `moec report`: puts training runs side by side from their `metrics.jsonl` logs.
//!
//! A report is a folder: `report.md` (one table row per run, then the plots embedded) and every plot
//! twice, as PNG (for viewers that do not render SVG) and as SVG (for print and zoom):
//! - `loss`: training loss (lines) and validation loss (lines with markers) against step, all runs;
//! - `balance`: load CV² and Gini against step, all runs, each the mean over the run's MoE blocks
//!   (one line per run keeps runs comparable whatever their block count; the per-block picture is
//!   in the heatmaps);
//! - `util_<run>_block<b>`: per MoE block a heatmap, x = step, y = expert, colour = the expert's
//!   fraction of the routed assignments at that log step;
//! - `bias_<run>_block<b>` / `prices_<run>_block<b>`: the router state (loss-free balancing biases,
//!   auction prices) per expert against step, for runs whose log carries it;
//! - `router_logits_<run>_block<b>`: per MoE block each expert's router-logit band over steps (the
//!   5th–95th percentile filled, the median as a line; docs/language.md "Metrics",
//!   `router_logits`), with the plotted values in `router_logits_<run>_block<b>.csv`
//!   (`step,expert,mean,std,min,max,p5,p50,p95`, one row per log step and expert, numbers exactly
//!   as logged).
//!
//! Text in charts is drawn with a font compiled into the binary (Noto Sans, through plotters'
//! `ab_glyph` backend), not a system font, so reports render the same on a bare CI machine.
//!
//! The load columns of the table (CV², Gini, dropped %, experts used %) are the mean over the log
//! steps in the last 10% of the run (step ≥ last − (last − first) / 10; the last MoE line when none
//! falls there), each step's value first averaged over the MoE blocks: early routing is usually
//! unbalanced, and the end state is what a comparison of balancing methods is about.

use crate::metrics::{thousands, MetricsLog, MoeLayerMetrics, Record, RouterLogitStats};
use plotters::coord::ranged1d::SegmentValue;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("no run directories given")]
    NoRuns,
    #[error("run directory `{0}` does not exist")]
    MissingDir(PathBuf),
    #[error("`{0}` is not a directory; give the run directory that holds metrics.jsonl")]
    NotADir(PathBuf),
    #[error("no metrics log in `{dir}`: expected `{}` (written by `moec train`)", dir.join(MetricsLog::FILE_NAME).display())]
    NoMetrics { dir: PathBuf },
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a metrics record: {message}")]
    Malformed {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("`{0}` holds no records yet")]
    Empty(PathBuf),
    #[error("cannot write `{path}`: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot draw `{path}`: {message}")]
    Plot { path: PathBuf, message: String },
}

/// One training run: its log, and the names it is shown under.
#[derive(Debug, Clone)]
pub struct Run {
    /// Label in tables and legends: the directory's name, made unique among the runs of a report.
    pub name: String,
    pub dir: PathBuf,
    /// The `model NAME` of `DIR/spec.moe`, when the run directory holds its spec.
    pub model: Option<String>,
    pub records: Vec<Record>,
}

impl Run {
    /// Reads `dir/metrics.jsonl` (blank lines are skipped) and, if present, the model name from
    /// `dir/spec.moe`.
    pub fn load(dir: &Path) -> Result<Run, ReportError> {
        if !dir.exists() {
            return Err(ReportError::MissingDir(dir.to_path_buf()));
        }
        if !dir.is_dir() {
            return Err(ReportError::NotADir(dir.to_path_buf()));
        }
        let path = dir.join(MetricsLog::FILE_NAME);
        if !path.is_file() {
            return Err(ReportError::NoMetrics {
                dir: dir.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| ReportError::Read {
            path: path.clone(),
            source,
        })?;
        let mut records = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let record =
                serde_json::from_str::<Record>(line).map_err(|e| ReportError::Malformed {
                    path: path.clone(),
                    line: i + 1,
                    message: e.to_string(),
                })?;
            records.push(record);
        }
        if records.is_empty() {
            return Err(ReportError::Empty(path));
        }
        let model = std::fs::read_to_string(dir.join("spec.moe"))
            .ok()
            .and_then(|s| model_name(&s));
        Ok(Run {
            name: dir_name(dir),
            dir: dir.to_path_buf(),
            model,
            records,
        })
    }

    /// The MoE block indices the log mentions, in numeric order.
    pub fn blocks(&self) -> Vec<String> {
        let mut blocks: Vec<String> = self
            .records
            .iter()
            .filter_map(|r| r.moe.as_ref())
            .flat_map(|m| m.keys().cloned())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        blocks.sort_by_key(|b| (b.parse::<u64>().unwrap_or(u64::MAX), b.clone()));
        blocks
    }

    /// (step, that block's metrics) for every line that has the block.
    fn block_series(&self, block: &str) -> Vec<(u64, &MoeLayerMetrics)> {
        self.records
            .iter()
            .filter_map(|r| {
                r.moe
                    .as_ref()
                    .and_then(|m| m.get(block))
                    .map(|m| (r.step, m))
            })
            .collect()
    }
}

/// The last path component, so `runs/switch/` and `runs/switch` are both `switch`; `.` becomes the
/// current directory's name.
fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .or_else(|| {
            std::fs::canonicalize(dir)
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| dir.display().to_string())
}

/// The identifier after `model` in a `.moe` text (comments skipped); `None` when there is none.
fn model_name(source: &str) -> Option<String> {
    let mut words = source
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.split(|c: char| c.is_whitespace() || c == '{'));
    words.find(|w| *w == "model")?;
    words
        .find(|w| !w.is_empty())
        .filter(|w| w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(str::to_string)
}

/// Load balance over the end of a run (see the module docs for the window).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadSummary {
    pub cv2: f64,
    pub gini: f64,
    /// Percentage of routed assignments dropped.
    pub dropped: f64,
    /// Percentage of experts that received tokens.
    pub experts_used: f64,
    /// How many log steps the means are over.
    pub steps_averaged: usize,
}

/// One row of the report's table.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The last logged step.
    pub steps: u64,
    pub final_loss: f64,
    pub final_val_loss: Option<f64>,
    pub final_val_ppl: Option<f64>,
    pub final_val_acc: Option<f64>,
    /// Lowest finite validation loss.
    pub best_val_loss: Option<f64>,
    /// `None` for dense runs.
    pub load: Option<LoadSummary>,
    /// Median over log lines (the first steps include pipeline creation; the median ignores them).
    pub tokens_per_s: Option<f64>,
}

/// The table row of one run. `run.records` must not be empty ([`Run::load`] guarantees it).
pub fn summarize(run: &Run) -> Summary {
    let records = &run.records;
    let last = records.last().map(|r| r.step).unwrap_or(0);
    let first = records.first().map(|r| r.step).unwrap_or(0);
    let last_val = records
        .iter()
        .rev()
        .find(|r| r.val_loss.is_some() || r.val_acc.is_some());
    let best_val_loss = records
        .iter()
        .filter_map(|r| r.val_loss)
        .filter(|v| v.is_finite())
        .min_by(f64::total_cmp);
    let moe_lines: Vec<(u64, &BTreeMap<String, MoeLayerMetrics>)> = records
        .iter()
        .filter_map(|r| {
            r.moe
                .as_ref()
                .filter(|m| !m.is_empty())
                .map(|m| (r.step, m))
        })
        .collect();
    let cutoff = last as f64 - (last - first.min(last)) as f64 / 10.0;
    let mut window: Vec<&BTreeMap<String, MoeLayerMetrics>> = moe_lines
        .iter()
        .filter(|(s, _)| *s as f64 >= cutoff)
        .map(|(_, m)| *m)
        .collect();
    if window.is_empty() {
        window.extend(moe_lines.last().map(|(_, m)| *m));
    }
    let load = (!window.is_empty()).then(|| {
        let mean_over =
            |f: fn(&MoeLayerMetrics) -> f64| mean(window.iter().map(|m| mean(m.values().map(f))));
        LoadSummary {
            cv2: mean_over(|m| m.cv2),
            gini: mean_over(|m| m.gini),
            dropped: mean_over(|m| m.dropped),
            experts_used: mean_over(|m| m.experts_used),
            steps_averaged: window.len(),
        }
    });
    Summary {
        steps: last,
        final_loss: records.last().map(|r| r.loss).unwrap_or(f64::NAN),
        final_val_loss: last_val.and_then(|r| r.val_loss),
        final_val_ppl: last_val.and_then(|r| r.val_ppl.or(r.val_loss.map(f64::exp))),
        final_val_acc: last_val.and_then(|r| r.val_acc),
        best_val_loss,
        load,
        tokens_per_s: median(
            records
                .iter()
                .map(|r| r.tokens_per_s)
                .filter(|t| t.is_finite() && *t > 0.0)
                .collect(),
        ),
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

/// The middle value (the mean of the two middle ones for an even count); `None` when empty.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// What [`write_report`] wrote.
#[derive(Debug, Clone)]
pub struct Report {
    pub markdown: PathBuf,
    /// Every plot file, PNG and SVG, and the router-logit CSV files.
    pub plots: Vec<PathBuf>,
    /// The table alone (as in `report.md`), for printing.
    pub table: String,
}

/// Loads every run directory (all of them, so the first error stops before anything is written).
pub fn load_runs(dirs: &[PathBuf]) -> Result<Vec<Run>, ReportError> {
    if dirs.is_empty() {
        return Err(ReportError::NoRuns);
    }
    let mut runs = dirs
        .iter()
        .map(|d| Run::load(d))
        .collect::<Result<Vec<_>, _>>()?;
    // Two runs with the same directory name (a/run, b/run) are told apart by their path as given.
    let names: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
    for run in &mut runs {
        if names.iter().filter(|n| **n == run.name).count() > 1 {
            run.name = run.dir.display().to_string();
        }
    }
    Ok(runs)
}

/// Writes `report.md` and all plots into `out` (created if needed).
pub fn write_report(runs: &[Run], out: &Path) -> Result<Report, ReportError> {
    if runs.is_empty() {
        return Err(ReportError::NoRuns);
    }
    std::fs::create_dir_all(out).map_err(|source| ReportError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let summaries: Vec<Summary> = runs.iter().map(summarize).collect();
    let mut md = String::from("# Training report\n\n");
    let table = table(runs, &summaries);
    md.push_str(&table);
    md.push_str(
        "\nLoad CV², Gini, dropped % and experts used %: mean over the log steps in the last 10% of each run \
         (step ≥ last − (last − first)/10), each step first averaged over the run's MoE blocks; tokens/s is the \
         median over log lines; — where a run has no such value (dense model, no eval).\n",
    );
    let mut sections = Sections {
        runs,
        moe_runs: (0..runs.len())
            .filter(|&i| !runs[i].blocks().is_empty())
            .collect(),
        stems: unique_stems(runs),
        colors: (0..runs.len()).map(run_color).collect(),
        out,
        plots: Vec::new(),
    };
    md.push_str(&sections.loss()?);
    if !sections.moe_runs.is_empty() {
        md.push_str(&sections.balance()?);
        md.push_str(&sections.utilisation()?);
        let state_md = sections.router_state()?;
        md.push_str(&sections.router_logits()?);
        if !state_md.is_empty() {
            md.push_str("\n## Router state\n\nPer-expert router state logged with the metrics (loss-free balancing biases, auction prices).\n");
            md.push_str(&state_md);
        }
    }

    let markdown = out.join("report.md");
    std::fs::write(&markdown, md).map_err(|source| ReportError::Write {
        path: markdown.clone(),
        source,
    })?;
    Ok(Report {
        markdown,
        plots: sections.plots,
        table,
    })
}

/// What the report's chart sections draw from and into; each section returns its markdown.
struct Sections<'a> {
    runs: &'a [Run],
    /// The runs with MoE blocks, by index.
    moe_runs: Vec<usize>,
    /// Each run's file name stem ([`unique_stems`]).
    stems: Vec<String>,
    colors: Vec<RGBColor>,
    out: &'a Path,
    /// Every file written so far.
    plots: Vec<PathBuf>,
}

impl<'a> Sections<'a> {
    /// Each MoE run's blocks: the run's index, the run and the block.
    fn moe_blocks(&self) -> Vec<(usize, &'a Run, String)> {
        let runs = self.runs;
        self.moe_runs
            .iter()
            .flat_map(|&i| runs[i].blocks().into_iter().map(move |b| (i, &runs[i], b)))
            .collect()
    }

    /// The training and validation loss chart of every run.
    fn loss(&mut self) -> Result<String, ReportError> {
        let loss = LineFigure {
            caption: "Loss".into(),
            y_desc: "loss".into(),
            lines: self
                .runs
                .iter()
                .zip(&self.colors)
                .flat_map(|(run, &color)| {
                    let train = Line {
                        label: Some(format!("{} train", run.name)),
                        color,
                        points: run
                            .records
                            .iter()
                            .map(|r| (r.step as f64, r.loss))
                            .collect(),
                        markers: false,
                    };
                    let val: Vec<(f64, f64)> = run
                        .records
                        .iter()
                        .filter_map(|r| r.val_loss.map(|v| (r.step as f64, v)))
                        .collect();
                    let val = (!val.is_empty()).then(|| Line {
                        label: Some(format!("{} val", run.name)),
                        color,
                        points: val,
                        markers: true,
                    });
                    std::iter::once(train).chain(val)
                })
                .collect(),
        };
        self.plots
            .extend(render(&loss, (1000, 600), self.out, "loss")?);
        let mut md = String::from(
            "\n## Loss\n\nTraining loss (lines) and validation loss (lines with markers) against step.\n\n",
        );
        md.push_str(&embed("loss", "loss"));
        Ok(md)
    }

    /// The CV² and Gini charts of the MoE runs.
    fn balance(&mut self) -> Result<String, ReportError> {
        let per_step = |run: &Run, f: fn(&MoeLayerMetrics) -> f64| -> Vec<(f64, f64)> {
            run.records
                .iter()
                .filter_map(|r| {
                    r.moe
                        .as_ref()
                        .filter(|m| !m.is_empty())
                        .map(|m| (r.step as f64, mean(m.values().map(f))))
                })
                .collect()
        };
        let lines = |f: fn(&MoeLayerMetrics) -> f64| -> Vec<Line> {
            self.moe_runs
                .iter()
                .map(|&i| Line {
                    label: Some(self.runs[i].name.clone()),
                    color: self.colors[i],
                    points: per_step(&self.runs[i], f),
                    markers: false,
                })
                .collect()
        };
        let balance = Panels(vec![
            LineFigure {
                caption: "Load CV² (mean over MoE blocks)".into(),
                y_desc: "CV²".into(),
                lines: lines(|m| m.cv2),
            },
            LineFigure {
                caption: "Gini (mean over MoE blocks)".into(),
                y_desc: "Gini".into(),
                lines: lines(|m| m.gini),
            },
        ]);
        self.plots
            .extend(render(&balance, (1400, 560), self.out, "balance")?);
        let mut md = String::from("\n## Load balance\n\nCV² and Gini of the experts' load fractions against step, each averaged over the run's MoE blocks (0 = perfectly even).\n\n");
        md.push_str(&embed("balance", "load balance"));
        Ok(md)
    }

    /// The expert-load heatmap of every MoE block, under a heading per run.
    fn utilisation(&mut self) -> Result<String, ReportError> {
        let mut md = String::from("\n## Expert utilisation\n\nPer MoE block: each expert's fraction of the routed assignments (colour) at each log step; an even split is 1/experts.\n");
        let mut last_run = None;
        for (i, run, block) in self.moe_blocks() {
            if last_run != Some(i) {
                md.push_str(&format!("\n### {}\n", md_escape(&run.name)));
                last_run = Some(i);
            }
            let series = run.block_series(&block);
            let heat = Heatmap::new(
                format!("{}: expert load, MoE block {block}", run.name),
                &series.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
                series.iter().map(|(_, m)| m.fraction.clone()).collect(),
                MAX_HEATMAP_COLUMNS,
            );
            let stem = format!("util_{}_block{}", self.stems[i], sanitize(&block));
            self.plots
                .extend(render(&heat, (1000, 560), self.out, &stem)?);
            md.push_str(&format!("\n#### Block {block}\n\n"));
            md.push_str(&embed(
                &stem,
                &format!("{} block {block} utilisation", run.name),
            ));
        }
        Ok(md)
    }

    /// The per-expert bias and price charts of every block whose log carries them, without a
    /// heading ("" when no block has router state).
    fn router_state(&mut self) -> Result<String, ReportError> {
        let mut md = String::new();
        for (i, run, block) in self.moe_blocks() {
            let series = run.block_series(&block);
            for (kind, what, get) in [
                (
                    "bias",
                    "selection bias",
                    (|m: &MoeLayerMetrics| m.bias.clone())
                        as fn(&MoeLayerMetrics) -> Option<Vec<f64>>,
                ),
                ("prices", "auction price", |m| m.prices.clone()),
            ] {
                let values: Vec<(u64, Vec<f64>)> = series
                    .iter()
                    .filter_map(|(s, m)| get(m).map(|v| (*s, v)))
                    .collect();
                if values.is_empty() {
                    continue;
                }
                let experts = values.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
                let figure = LineFigure {
                    caption: format!("{}: {what} per expert, MoE block {block}", run.name),
                    y_desc: kind.into(),
                    lines: per_expert(&values, experts, |s, v, e| Some((s, *v.get(e)?)))
                        .into_iter()
                        .map(|(label, color, points)| Line {
                            label,
                            color,
                            points,
                            markers: false,
                        })
                        .collect(),
                };
                md.push_str(&block_chart(
                    &figure,
                    self.out,
                    &format!("{kind}_{}_block{}", self.stems[i], sanitize(&block)),
                    &format!("{}, block {block}: {what}", md_escape(&run.name)),
                    &format!("{} block {block} {kind}", run.name),
                    &mut self.plots,
                )?);
            }
        }
        Ok(md)
    }

    /// The router-logit band charts and their CSV files of every block whose log carries
    /// `router_logits` ("" when none does).
    fn router_logits(&mut self) -> Result<String, ReportError> {
        let mut md = String::new();
        for (i, run, block) in self.moe_blocks() {
            let series: Vec<(u64, &RouterLogitStats)> = run
                .block_series(&block)
                .into_iter()
                .filter_map(|(step, m)| m.router_logits.as_ref().map(|r| (step, r)))
                .collect();
            if series.is_empty() {
                continue;
            }
            let stem = format!("router_logits_{}_block{}", self.stems[i], sanitize(&block));
            let csv = self.out.join(format!("{stem}.csv"));
            std::fs::write(&csv, router_logit_csv(&series)).map_err(|source| {
                ReportError::Write {
                    path: csv.clone(),
                    source,
                }
            })?;
            self.plots.push(csv);
            let experts = series.iter().map(|(_, r)| r.p50.len()).max().unwrap_or(0);
            let figure = Bands {
                caption: format!("{}: router logits per expert, MoE block {block}", run.name),
                bands: per_expert(&series, experts, |step, r, e| {
                    Some((step, *r.p5.get(e)?, *r.p50.get(e)?, *r.p95.get(e)?))
                })
                .into_iter()
                .map(|(label, color, points)| Band {
                    label,
                    color,
                    points,
                })
                .collect(),
            };
            md.push_str(&block_chart(
                &figure,
                self.out,
                &stem,
                &format!("{}, block {block}", md_escape(&run.name)),
                &format!("{} block {block} router logits", run.name),
                &mut self.plots,
            )?);
        }
        if md.is_empty() {
            return Ok(md);
        }
        Ok(format!(
            "\n## Router logits\n\nPer MoE block: each expert's router logits over the step's tokens, 5th–95th percentile (band) and median (line), against step; the values are in the `.csv` beside each plot.\n{md}"
        ))
    }
}

/// One styled series per expert of a per-expert chart (router state, router-logit bands): expert
/// e's points are `point(step, values, e)` over the logged steps (skipped where `None`), its colour
/// viridis, its legend label `expert e` up to 16 experts (beyond that the legend covers the chart).
fn per_expert<T, P>(
    series: &[(u64, T)],
    experts: usize,
    point: impl Fn(f64, &T, usize) -> Option<P>,
) -> Vec<(Option<String>, RGBColor, Vec<P>)> {
    (0..experts)
        .map(|e| {
            (
                (experts <= 16).then(|| format!("expert {e}")),
                ViridisRGB::get_color_normalized(e as f64, 0.0, (experts.max(2) - 1) as f64),
                series
                    .iter()
                    .filter_map(|(step, v)| point(*step as f64, v, e))
                    .collect(),
            )
        })
        .collect()
}

/// Draws a per-block chart into `out/<stem>.{png,svg}` (added to `plots`) and returns its report
/// entry: a `###` heading and the embedded image.
fn block_chart<F: Figure>(
    figure: &F,
    out: &Path,
    stem: &str,
    heading: &str,
    alt: &str,
    plots: &mut Vec<PathBuf>,
) -> Result<String, ReportError> {
    plots.extend(render(figure, (1000, 560), out, stem)?);
    Ok(format!("\n### {heading}\n\n{}", embed(stem, alt)))
}

/// The plotted router-logit statistics as CSV: `step,expert,mean,std,min,max,p5,p50,p95`, numbers in
/// Rust's shortest round-trip form (reading them back gives the logged f64 exactly).
pub fn router_logit_csv(series: &[(u64, &RouterLogitStats)]) -> String {
    let mut csv = String::from("step,expert,mean,std,min,max,p5,p50,p95\n");
    for (step, r) in series {
        for e in 0..r.p50.len() {
            let cols = [&r.mean, &r.std, &r.min, &r.max, &r.p5, &r.p50, &r.p95];
            let values: Vec<String> = cols
                .iter()
                .map(|c| c.get(e).map_or("NaN".into(), |v| format!("{v:?}")))
                .collect();
            let _ = writeln!(csv, "{step},{e},{}", values.join(","));
        }
    }
    csv
}

/// The Markdown comparison table (columns for model and val accuracy only when some run has them).
pub fn table(runs: &[Run], summaries: &[Summary]) -> String {
    let with_model = runs.iter().any(|r| r.model.is_some());
    let with_acc = summaries.iter().any(|s| s.final_val_acc.is_some());
    let mut header = vec!["run"];
    if with_model {
        header.push("model");
    }
    header.extend([
        "steps",
        "final train loss",
        "final val loss",
        "final val ppl",
    ]);
    if with_acc {
        header.push("final val acc");
    }
    header.extend([
        "best val loss",
        "load CV²",
        "Gini",
        "dropped %",
        "experts used %",
        "tokens/s (median)",
    ]);
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(
        out,
        "|{}",
        header
            .iter()
            .enumerate()
            .map(|(i, _)| if i == 0 || (with_model && i == 1) {
                "---|"
            } else {
                "---:|"
            })
            .collect::<String>()
    );
    for (run, s) in runs.iter().zip(summaries) {
        let mut row = vec![md_escape(&run.name)];
        if with_model {
            row.push(
                run.model
                    .as_deref()
                    .map(md_escape)
                    .unwrap_or_else(|| DASH.into()),
            );
        }
        row.extend([
            s.steps.to_string(),
            fixed(Some(s.final_loss), 4),
            fixed(s.final_val_loss, 4),
            fixed(s.final_val_ppl, 2),
        ]);
        if with_acc {
            row.push(
                s.final_val_acc
                    .map(|a| format!("{:.2}%", 100.0 * a))
                    .unwrap_or_else(|| DASH.into()),
            );
        }
        let load = s.load.as_ref();
        row.extend([
            fixed(s.best_val_loss, 4),
            fixed(load.map(|l| l.cv2), 4),
            fixed(load.map(|l| l.gini), 4),
            fixed(load.map(|l| l.dropped), 2),
            fixed(load.map(|l| l.experts_used), 1),
            s.tokens_per_s.map(thousands).unwrap_or_else(|| DASH.into()),
        ]);
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

const DASH: &str = "—";

/// `{:.N}`, `—` when absent; a non-finite value (a diverged loss) prints as `NaN`/`inf`.
fn fixed(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(v) => format!("{v:.decimals$}"),
        None => DASH.into(),
    }
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|")
}

fn embed(stem: &str, alt: &str) -> String {
    format!(
        "![{}]({stem}.png)\n\n[SVG]({stem}.svg)\n",
        alt.replace(['[', ']'], "")
    )
}

/// A file-name-safe form of a run or block name.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "run".into()
    } else {
        s
    }
}

/// File stems for the runs: sanitised names, with the run's position appended where two collide.
fn unique_stems(runs: &[Run]) -> Vec<String> {
    let stems: Vec<String> = runs.iter().map(|r| sanitize(&r.name)).collect();
    stems
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if stems.iter().filter(|t| *t == s).count() > 1 {
                format!("{s}_{i}")
            } else {
                s.clone()
            }
        })
        .collect()
}

/// Distinct colours for runs (Tableau 10: readable on white, unlike palettes with yellow).
fn run_color(i: usize) -> RGBColor {
    const COLORS: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = COLORS[i % COLORS.len()];
    RGBColor(r, g, b)
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// A chart of values over training steps with the report's caption, margins and light mesh, the
/// mesh already drawn: line figures and router-logit bands look alike.
fn step_chart<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    caption: &str,
    y_desc: &str,
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
) -> Result<
    ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    Box<dyn std::error::Error>,
>
where
    DB::ErrorType: 'static,
{
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 24))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_desc)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .light_line_style(RGBColor(235, 235, 235))
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .draw()?;
    Ok(chart)
}

/// How lines are drawn. plotters' bitmap backend turns a thick polyline into one polygon with
/// unlimited miter joins, so a noisy curve's sharp turns shoot spikes across the whole image; there
/// each segment is drawn on its own (no joins). SVG viewers join properly: one polyline per line.
#[derive(Clone, Copy, PartialEq)]
enum Joins {
    Polyline,
    Segments,
}

/// A chart that can be drawn on any plotters backend (so each is written as PNG and as SVG).
trait Figure {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>, joins: Joins) -> DrawResult
    where
        DB::ErrorType: 'static;
}

/// The font every chart uses: registered once, from bytes compiled into the binary.
const FONT: &str = "sans-serif";

fn register_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT, FontStyle::Normal, ttf_noto_sans::REGULAR)
                .map_err(|_| "the built-in font (Noto Sans) did not load".to_string())
        })
        .clone()
}

/// Draws `figure` into `out/stem.png` and `out/stem.svg`.
fn render<F: Figure>(
    figure: &F,
    size: (u32, u32),
    out: &Path,
    stem: &str,
) -> Result<Vec<PathBuf>, ReportError> {
    let png = out.join(format!("{stem}.png"));
    let svg = out.join(format!("{stem}.svg"));
    let failed = |path: &Path| {
        let path = path.to_path_buf();
        move |e: Box<dyn std::error::Error>| ReportError::Plot {
            path,
            message: e.to_string(),
        }
    };
    register_font().map_err(|message| ReportError::Plot {
        path: png.clone(),
        message,
    })?;
    {
        let area = BitMapBackend::new(&png, size).into_drawing_area();
        draw_on(figure, &area, Joins::Segments).map_err(failed(&png))?;
    }
    {
        let area = SVGBackend::new(&svg, size).into_drawing_area();
        draw_on(figure, &area, Joins::Polyline).map_err(failed(&svg))?;
    }
    Ok(vec![png, svg])
}

fn draw_on<F: Figure, DB: DrawingBackend>(
    figure: &F,
    area: &DrawingArea<DB, Shift>,
    joins: Joins,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE)?;
    figure.draw(area, joins)?;
    area.present()?;
    Ok(())
}

/// One series of a line chart; NaN points break the line.
struct Line {
    label: Option<String>,
    color: RGBColor,
    points: Vec<(f64, f64)>,
    markers: bool,
}

struct LineFigure {
    caption: String,
    y_desc: String,
    lines: Vec<Line>,
}

/// Figures side by side, equal widths.
struct Panels(Vec<LineFigure>);

impl Figure for Panels {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>, joins: Joins) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        for (panel, figure) in area.split_evenly((1, self.0.len())).iter().zip(&self.0) {
            figure.draw(panel, joins)?;
        }
        Ok(())
    }
}

/// `lo..hi` padded by 5% (at least ±0.5 around a single value), from the finite values only.
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo {
        0.05 * (hi - lo)
    } else {
        0.5_f64.max(0.05 * lo.abs())
    };
    (lo - pad, hi + pad)
}

/// At most this many points per drawn line: a long run's log is averaged in groups of consecutive
/// points (more than a chart's pixel width cannot show; keeps PNG drawing fast and the SVG small).
const MAX_LINE_POINTS: usize = 1500;

/// `points` averaged in equal groups of consecutive points so at most `max` remain (a group holding
/// a NaN stays NaN, so a diverged stretch still shows as a gap).
fn thin(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    let group = points.len().div_ceil(max.max(1)).max(1);
    if group == 1 {
        return points.to_vec();
    }
    points
        .chunks(group)
        .map(|c| (mean(c.iter().map(|p| p.0)), mean(c.iter().map(|p| p.1))))
        .collect()
}

/// Maximal runs of finite points.
fn segments(points: &[(f64, f64)]) -> Vec<Vec<(f64, f64)>> {
    points
        .split(|(x, y)| !(x.is_finite() && y.is_finite()))
        .filter(|s| !s.is_empty())
        .map(<[_]>::to_vec)
        .collect()
}

impl Figure for LineFigure {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>, joins: Joins) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        let all = || self.lines.iter().flat_map(|l| l.points.iter());
        // Steps span exactly first..last (no padding: step 0 and the last step are the natural ends).
        let (x0, x1) = all()
            .map(|p| p.0)
            .filter(|x| x.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
                (lo.min(x), hi.max(x))
            });
        let (x0, x1) = if !x0.is_finite() {
            (0.0, 1.0)
        } else if x1 > x0 {
            (x0, x1)
        } else {
            (x0 - 0.5, x0 + 0.5)
        };
        let y = padded_range(all().map(|p| p.1));
        let mut chart = step_chart(area, &self.caption, &self.y_desc, (x0, x1), y)?;
        let mut labelled = false;
        for line in &self.lines {
            let color = line.color;
            for (k, segment) in segments(&thin(&line.points, MAX_LINE_POINTS))
                .into_iter()
                .enumerate()
            {
                let style = color.stroke_width(2);
                // A lone point (between NaNs, or a single eval) gets a marker so it is visible.
                if line.markers || segment.len() == 1 {
                    chart
                        .draw_series(segment.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
                }
                let drawn = match joins {
                    Joins::Polyline => chart.draw_series(LineSeries::new(segment, style))?,
                    Joins::Segments => chart.draw_series(
                        segment
                            .windows(2)
                            .map(|w| PathElement::new(vec![w[0], w[1]], style)),
                    )?,
                };
                if let (0, Some(label)) = (k, &line.label) {
                    labelled = true;
                    let markers = line.markers;
                    drawn.label(label.as_str()).legend(move |(x, y)| {
                        EmptyElement::at((x, y))
                            + PathElement::new(vec![(0, 0), (22, 0)], color.stroke_width(2))
                            + Circle::new((11, 0), if markers { 4 } else { 0 }, color.filled())
                    });
                }
            }
        }
        if labelled {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font((FONT, 15))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(160, 160, 160))
                .draw()?;
        }
        Ok(())
    }
}

/// One expert's router-logit band: (step, p5, p50, p95) per log step.
struct Band {
    label: Option<String>,
    color: RGBColor,
    points: Vec<(f64, f64, f64, f64)>,
}

/// Percentile bands over steps: each band's p5–p95 filled (translucent), its median as a line.
struct Bands {
    caption: String,
    bands: Vec<Band>,
}

impl Figure for Bands {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>, _joins: Joins) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        let all = || self.bands.iter().flat_map(|b| b.points.iter());
        let x = padded_range(all().map(|p| p.0));
        let y = padded_range(all().flat_map(|p| [p.1, p.3]));
        let mut chart = step_chart(area, &self.caption, "router logit", x, y)?;
        for band in &self.bands {
            let finite: Vec<_> = band
                .points
                .iter()
                .filter(|p| p.1.is_finite() && p.2.is_finite() && p.3.is_finite())
                .copied()
                .collect();
            let outline: Vec<(f64, f64)> = finite
                .iter()
                .map(|p| (p.0, p.3))
                .chain(finite.iter().rev().map(|p| (p.0, p.1)))
                .collect();
            chart.draw_series(std::iter::once(Polygon::new(
                outline,
                band.color.mix(0.18).filled(),
            )))?;
            let color = band.color;
            let median = chart.draw_series(LineSeries::new(
                finite.iter().map(|p| (p.0, p.2)),
                color.stroke_width(2),
            ))?;
            if let Some(label) = &band.label {
                median.label(label.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(2))
                });
            }
        }
        if self.bands.iter().any(|b| b.label.is_some()) {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font((FONT, 15))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(160, 160, 160))
                .draw()?;
        }
        Ok(())
    }
}

/// At most this many columns in a heatmap: a long run's log steps are averaged in groups, which
/// a 1000-pixel-wide chart cannot show anyway, and it keeps the SVG small (one rectangle per cell).
const MAX_HEATMAP_COLUMNS: usize = 250;

/// Expert load fractions over time: one column per log step (or group of steps), one row per expert.
struct Heatmap {
    caption: String,
    /// Each column's step span.
    cells: Vec<(f64, f64)>,
    /// Per column, per expert.
    fractions: Vec<Vec<f64>>,
}

impl Heatmap {
    /// Each log step's cell spans half-way to its neighbours (±0.5 when there is a single step);
    /// with more than `max_columns` steps, consecutive steps are merged into equal groups whose
    /// cell is the union of their cells and whose fractions are their mean.
    fn new(
        caption: String,
        steps: &[u64],
        fractions: Vec<Vec<f64>>,
        max_columns: usize,
    ) -> Heatmap {
        let s: Vec<f64> = steps.iter().map(|&s| s as f64).collect();
        let cells: Vec<(f64, f64)> = (0..s.len())
            .map(|i| {
                let left = if i > 0 {
                    (s[i] - s[i - 1]) / 2.0
                } else if s.len() > 1 {
                    (s[1] - s[0]) / 2.0
                } else {
                    0.5
                };
                let right = if i + 1 < s.len() {
                    (s[i + 1] - s[i]) / 2.0
                } else {
                    left
                };
                (s[i] - left, s[i] + right)
            })
            .collect();
        let group = cells.len().div_ceil(max_columns.max(1)).max(1);
        if group == 1 {
            return Heatmap {
                caption,
                cells,
                fractions,
            };
        }
        let experts = fractions.iter().map(Vec::len).max().unwrap_or(0);
        let merged = fractions
            .chunks(group)
            .map(|rows| {
                (0..experts)
                    .map(|e| mean(rows.iter().map(|r| r.get(e).copied().unwrap_or(f64::NAN))))
                    .collect()
            })
            .collect();
        let cells = cells
            .chunks(group)
            .map(|c| (c[0].0, c[c.len() - 1].1))
            .collect();
        Heatmap {
            caption,
            cells,
            fractions: merged,
        }
    }
}

impl Figure for Heatmap {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>, _joins: Joins) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        let experts = self
            .fractions
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(0)
            .max(1) as u32;
        let vmax = self
            .fractions
            .iter()
            .flatten()
            .copied()
            .filter(|f| f.is_finite())
            .fold(0.0, f64::max);
        let vmax = if vmax > 0.0 { vmax } else { 1.0 };
        let cells = &self.cells;
        let x0 = cells.first().map(|c| c.0).unwrap_or(0.0);
        let x1 = cells.last().map(|c| c.1).unwrap_or(1.0).max(x0 + 1.0);
        let (width, _) = area.dim_in_pixel();
        let (main, bar) = area.split_horizontally(width.saturating_sub(120));
        let (caption_size, margin, x_area) = (24, 12, 44);
        let mut chart = ChartBuilder::on(&main)
            .caption(&self.caption, (FONT, caption_size))
            .margin(margin)
            .x_label_area_size(x_area)
            .y_label_area_size(60)
            // Integer ranges are inclusive in plotters: 0..=E-1 gives one segment per expert.
            .build_cartesian_2d(x0..x1, (0..experts - 1).into_segmented())?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("step")
            .y_desc("expert")
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .y_labels(experts.min(16) as usize)
            .x_label_formatter(&|x| format!("{}", x.round() as i64))
            .draw()?;
        chart.draw_series(
            self.fractions
                .iter()
                .zip(cells)
                .flat_map(|(row, &(c0, c1))| {
                    row.iter().enumerate().map(move |(e, &f)| {
                        let color = if f.is_finite() {
                            ViridisRGB::get_color_normalized(f, 0.0, vmax)
                        } else {
                            RGBColor(200, 200, 200)
                        };
                        Rectangle::new(
                            [
                                (c0, SegmentValue::Exact(e as u32)),
                                (c1, SegmentValue::Exact(e as u32 + 1)),
                            ],
                            color.filled(),
                        )
                    })
                }),
        )?;
        // Colour bar, aligned with the plot area by the same caption, margin and label sizes; its six
        // labels get enough decimals to differ (64 experts: fractions around 0.016).
        let decimals = ((-(vmax / 5.0).log10()).ceil() as usize).clamp(2, 6);
        let mut scale = ChartBuilder::on(&bar)
            .caption("fraction", (FONT, caption_size))
            .margin(margin)
            .x_label_area_size(x_area)
            .y_label_area_size(52)
            .build_cartesian_2d(0.0..1.0, 0.0..vmax)?;
        scale
            .configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .label_style((FONT, 14))
            .y_labels(6)
            .y_label_formatter(&|v| format!("{v:.decimals$}"))
            .draw()?;
        const STEPS: usize = 64;
        scale.draw_series((0..STEPS).map(|i| {
            let (a, b) = (
                vmax * i as f64 / STEPS as f64,
                vmax * (i + 1) as f64 / STEPS as f64,
            );
            Rectangle::new(
                [(0.0, a), (1.0, b)],
                ViridisRGB::get_color_normalized((a + b) / 2.0, 0.0, vmax).filled(),
            )
        }))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_name_skips_comments() {
        assert_eq!(
            model_name("# model fake\nmodel tiny_moe {\n dim = 8 }"),
            Some("tiny_moe".into())
        );
        assert_eq!(model_name("model\n  lstm_lm{ }"), Some("lstm_lm".into()));
        assert_eq!(model_name("model \"quoted\" { }"), None);
        assert_eq!(model_name("train { }"), None);
    }

    #[test]
    fn ranges_and_cells() {
        assert_eq!(padded_range([1.0, 3.0, f64::NAN].into_iter()), (0.9, 3.1));
        assert_eq!(padded_range([2.0].into_iter()), (1.5, 2.5));
        assert_eq!(padded_range(std::iter::empty()), (0.0, 1.0));
        let heat = Heatmap::new(String::new(), &[10, 20, 40], vec![vec![0.5]; 3], 10);
        assert_eq!(heat.cells, vec![(5.0, 15.0), (15.0, 30.0), (30.0, 50.0)]);
        assert_eq!(
            Heatmap::new(String::new(), &[7], vec![vec![1.0]], 10).cells,
            vec![(6.5, 7.5)]
        );
        // 5 steps into at most 2 columns: groups of 3 and 2, fractions averaged per expert.
        let fractions = vec![
            vec![0.0, 1.0],
            vec![0.5, 0.5],
            vec![1.0, 0.0],
            vec![0.25, 0.75],
            vec![0.75, 0.25],
        ];
        let binned = Heatmap::new(String::new(), &[10, 20, 30, 40, 50], fractions, 2);
        assert_eq!(binned.cells, vec![(5.0, 35.0), (35.0, 55.0)]);
        assert_eq!(binned.fractions, vec![vec![0.5, 0.5], vec![0.5, 0.5]]);
        assert_eq!(
            segments(&[(0.0, 1.0), (1.0, f64::NAN), (2.0, 3.0), (3.0, 4.0)]),
            vec![vec![(0.0, 1.0)], vec![(2.0, 3.0), (3.0, 4.0)]]
        );
        // 5 points into at most 3: pairs averaged, the NaN pair stays a gap.
        let thinned = thin(
            &[
                (0.0, 1.0),
                (1.0, 3.0),
                (2.0, 5.0),
                (3.0, f64::NAN),
                (4.0, 2.0),
            ],
            3,
        );
        assert_eq!(thinned.len(), 3);
        assert_eq!(thinned[0], (0.5, 2.0));
        assert!(thinned[1].0 == 2.5 && thinned[1].1.is_nan());
        assert_eq!(thinned[2], (4.0, 2.0));
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![]), None);
    }

    /// Degenerate charts (one expert, one step, no finite point) still draw.
    #[test]
    fn degenerate_figures_draw() {
        let dir = std::env::temp_dir().join(format!("moec-report-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let heat = Heatmap::new("one".into(), &[3], vec![vec![1.0]], MAX_HEATMAP_COLUMNS);
        assert_eq!(render(&heat, (400, 300), &dir, "heat").unwrap().len(), 2);
        let lines = LineFigure {
            caption: "nan".into(),
            y_desc: "loss".into(),
            lines: vec![Line {
                label: Some("x".into()),
                color: run_color(0),
                points: vec![(1.0, f64::NAN)],
                markers: true,
            }],
        };
        assert_eq!(render(&lines, (400, 300), &dir, "lines").unwrap().len(), 2);
        let bands = Bands {
            caption: "one step".into(),
            bands: vec![Band {
                label: Some("expert 0".into()),
                color: run_color(0),
                points: vec![(1.0, -1.0, 0.0, 1.0), (2.0, f64::NAN, 0.0, 1.0)],
            }],
        };
        assert_eq!(render(&bands, (400, 300), &dir, "bands").unwrap().len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
