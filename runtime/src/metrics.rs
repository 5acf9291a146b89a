//! The training log: one JSON object per line in `DIR/metrics.jsonl`, plus the console line.
//!
//! The JSON-lines log is a stable interface (docs/language.md, "Metrics"): users script against it, so field names
//! never change and fields are only ever added. Every line carries `step`, `loss`, `lr` and
//! `tokens_per_s`; `aux`, `val_loss`, `val_ppl`, `val_acc` and `moe` appear only when they have a
//! value (an eval step adds `val_*` to that step's line). `moe` maps the block index (as a string,
//! JSON keys are strings) to that layer's [`MoeLayerMetrics`]. A non-finite number (a diverged loss)
//! is written as `null`, which every JSON reader accepts (and [`Record`] reads back as NaN). A
//! layer's optional `bias` / `prices` arrays carry per-expert router state (plotted by `moec report`).
//!
//! The utilisation formulas are pinned by docs/language.md ("Metrics"); the functions below
//! are exactly those, and the unit tests check them on hand-computed cases.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Per-MoE-layer utilisation at one log step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeLayerMetrics {
    /// Routed (token, expert) assignments each expert received in the batch.
    pub tokens_per_expert: Vec<u64>,
    /// `tokens_per_expert[e] / Σ tokens_per_expert`.
    pub fraction: Vec<f64>,
    /// CV² of `fraction` (population variance over mean² + 1e-10).
    #[serde(deserialize_with = "nan_if_null")]
    pub cv2: f64,
    /// Gini coefficient of `fraction` (0 = perfectly even, (E-1)/E = one expert takes all).
    #[serde(deserialize_with = "nan_if_null")]
    pub gini: f64,
    /// Entropy of `fraction` over ln E (1 = perfectly even).
    #[serde(deserialize_with = "nan_if_null")]
    pub entropy: f64,
    /// Percentage of experts that received at least one token.
    #[serde(deserialize_with = "nan_if_null")]
    pub experts_used: f64,
    /// The busiest expert's load over the mean load.
    #[serde(deserialize_with = "nan_if_null")]
    pub max_over_mean: f64,
    /// Percentage of routed assignments dropped by a capacity limit (0 when dropless).
    #[serde(deserialize_with = "nan_if_null")]
    pub dropped: f64,
    /// Router z: mean over tokens of logsumexp(router logits)², whether or not `z(c)` is a loss term.
    #[serde(deserialize_with = "nan_if_null")]
    pub router_z: f64,
    /// This layer's balancing loss (the sum of its terms; 0 with `balance = none`).
    #[serde(deserialize_with = "nan_if_null")]
    pub aux: f64,
    /// Per-expert selection bias b_e of `balance = bias(rate = g)` after this step (router state), for
    /// plotting how loss-free balancing steers. Absent for routers without a bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<Vec<f64>>,
    /// Per-expert persistent prices p_e of `gate = auction(...)` after this step (router state).
    /// Absent for other routers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prices: Option<Vec<f64>>,
    /// Per-expert statistics of the router logits over the step's tokens (docs/language.md
    /// "Metrics", `router_logits`). Absent when the plan has no `moe.N.router_logits` output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_logits: Option<RouterLogitStats>,
}

/// The router-logit statistics (docs/language.md "Metrics") of one MoE block at one log step: for
/// each expert e (index e of every vector), over the T tokens of the step's last micro-step, the
/// mean, the population standard deviation (divide by T), the minimum and maximum, and the 5th,
/// 50th and 95th percentiles with numpy's default linear interpolation (rank q/100·(T − 1) between
/// the sorted values). The logits are the router's clean `x·Wg` (no noise or bias; the expert-level
/// gate of a hierarchy). A non-finite logit makes its expert's statistics NaN (`null` in the log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterLogitStats {
    #[serde(deserialize_with = "nan_vec_if_null")]
    pub mean: Vec<f64>,
    #[serde(deserialize_with = "nan_vec_if_null")]
    pub std: Vec<f64>,
    #[serde(deserialize_with = "nan_vec_if_null")]
    pub min: Vec<f64>,
    #[serde(deserialize_with = "nan_vec_if_null")]
    pub max: Vec<f64>,
    #[serde(deserialize_with = "nan_vec_if_null")]
    pub p5: Vec<f64>,
    #[serde(deserialize_with = "nan_vec_if_null")]
    pub p50: Vec<f64>,
    #[serde(deserialize_with = "nan_vec_if_null")]
    pub p95: Vec<f64>,
}

impl RouterLogitStats {
    /// The statistics of `logits` (`[T, experts]`, row-major, as the plan's output).
    pub fn from_logits(logits: &[f32], experts: usize) -> RouterLogitStats {
        let experts = experts.max(1);
        let tokens = logits.len() / experts;
        let mut out = RouterLogitStats {
            mean: Vec::with_capacity(experts),
            std: Vec::with_capacity(experts),
            min: Vec::with_capacity(experts),
            max: Vec::with_capacity(experts),
            p5: Vec::with_capacity(experts),
            p50: Vec::with_capacity(experts),
            p95: Vec::with_capacity(experts),
        };
        for e in 0..experts {
            let mut x: Vec<f64> = (0..tokens)
                .map(|t| logits[t * experts + e] as f64)
                .collect();
            let finite = x.iter().all(|v| v.is_finite()) && tokens > 0;
            let n = tokens.max(1) as f64;
            let mean = x.iter().sum::<f64>() / n;
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            x.sort_by(f64::total_cmp);
            let nan_unless = |v: f64| if finite { v } else { f64::NAN };
            out.mean.push(nan_unless(mean));
            out.std.push(nan_unless(var.sqrt()));
            out.min.push(nan_unless(x.first().copied().unwrap_or(0.0)));
            out.max.push(nan_unless(x.last().copied().unwrap_or(0.0)));
            out.p5.push(nan_unless(percentile(&x, 5.0)));
            out.p50.push(nan_unless(percentile(&x, 50.0)));
            out.p95.push(nan_unless(percentile(&x, 95.0)));
        }
        out
    }
}

/// The q-th percentile of ascending `sorted` with linear interpolation (numpy's default); 0 when
/// empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return 0.0;
    };
    let rank = q / 100.0 * last as f64;
    let lo = rank.floor() as usize;
    let hi = (lo + 1).min(last);
    sorted[lo] + (rank - lo as f64) * (sorted[hi] - sorted[lo])
}

/// [`nan_if_null`] for a vector.
fn nan_vec_if_null<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<f64>, D::Error> {
    Ok(Vec::<Option<f64>>::deserialize(deserializer)?
        .into_iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect())
}

impl MoeLayerMetrics {
    /// All derived metrics from the per-expert counts; `dropped` is a percentage (see
    /// [`dropped_percent`]), `router_z` and `aux` are passed through.
    pub fn from_counts(
        tokens_per_expert: &[u64],
        dropped: f64,
        router_z: f64,
        aux: f64,
    ) -> MoeLayerMetrics {
        let fraction = fractions(tokens_per_expert);
        MoeLayerMetrics {
            cv2: cv2(&fraction),
            gini: gini(&fraction),
            entropy: normalized_entropy(&fraction),
            experts_used: experts_used(tokens_per_expert),
            max_over_mean: max_over_mean(tokens_per_expert),
            tokens_per_expert: tokens_per_expert.to_vec(),
            fraction,
            dropped,
            router_z,
            aux,
            bias: None,
            prices: None,
            router_logits: None,
        }
    }
}

/// Reads a number written by [`to_json_line`], where a non-finite value became `null`, back as NaN,
/// so a diverged run's log still parses (its loss is NaN, not a malformed line).
fn nan_if_null<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

/// Each expert's share of all assignments; all zeros when no token was routed (nothing to share).
pub fn fractions(counts: &[u64]) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return vec![0.0; counts.len()];
    }
    counts.iter().map(|&c| c as f64 / total as f64).collect()
}

/// CV² = var / (mean² + 1e-10), population variance (divide by E). 0 for an empty slice.
pub fn cv2(x: &[f64]) -> f64 {
    if x.is_empty() {
        return 0.0;
    }
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    var / (mean * mean + 1e-10)
}

/// Gini of x_1..x_E sorted ascending: G = Σ_i (2i − E − 1) x_i / (E · Σ x_i), i from 1.
/// 0 when Σ x = 0 (no load is perfectly unequal nor equal; 0 keeps plots continuous).
pub fn gini(x: &[f64]) -> f64 {
    let total: f64 = x.iter().sum();
    if x.is_empty() || total == 0.0 {
        return 0.0;
    }
    let mut sorted = x.to_vec();
    sorted.sort_by(f64::total_cmp);
    let e = sorted.len() as f64;
    let weighted: f64 = sorted
        .iter()
        .enumerate()
        .map(|(i, v)| (2.0 * (i + 1) as f64 - e - 1.0) * v)
        .sum();
    weighted / (e * total)
}

/// H(fraction) / ln E with 0 · ln 0 = 0. With one expert the routing is trivially even: 1. With no
/// routed tokens (all fractions 0): 0.
pub fn normalized_entropy(fraction: &[f64]) -> f64 {
    if fraction.iter().all(|&f| f == 0.0) {
        return 0.0;
    }
    if fraction.len() <= 1 {
        return 1.0;
    }
    // Σ f·ln(1/f) rather than −Σ f·ln f: a one-hot gives +0, not −0 (which would print as "-0.000").
    let h: f64 = fraction
        .iter()
        .filter(|&&f| f > 0.0)
        .map(|&f| f * (1.0 / f).ln())
        .sum();
    h / (fraction.len() as f64).ln()
}

/// Percentage of experts with at least one token.
pub fn experts_used(counts: &[u64]) -> f64 {
    if counts.is_empty() {
        return 0.0;
    }
    100.0 * counts.iter().filter(|&&c| c > 0).count() as f64 / counts.len() as f64
}

/// max_e load_e / mean_e load_e; 0 when nothing was routed.
pub fn max_over_mean(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let mean = total as f64 / counts.len() as f64;
    *counts.iter().max().unwrap_or(&0) as f64 / mean
}

/// Dropped assignments as a percentage of all `T · k` routed assignments.
pub fn dropped_percent(dropped: u64, assignments: u64) -> f64 {
    if assignments == 0 {
        return 0.0;
    }
    100.0 * dropped as f64 / assignments as f64
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub step: u64,
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub lr: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub tokens_per_s: f64,
    /// Total balancing loss over MoE layers (included in `loss`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aux: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_ppl: Option<f64>,
    /// Validation accuracy in [0, 1] (classifiers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_acc: Option<f64>,
    /// Block index → that MoE layer's utilisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<BTreeMap<String, MoeLayerMetrics>>,
    /// `precision = f16`: the dynamic loss scale the next step uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// `precision = f16`: steps skipped so far because a scaled gradient overflowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<u64>,
}

impl Record {
    /// A training line with only the always-present fields set.
    pub fn new(step: u64, loss: f64, lr: f64, tokens_per_s: f64) -> Record {
        Record {
            step,
            loss,
            lr,
            tokens_per_s,
            aux: None,
            val_loss: None,
            val_ppl: None,
            val_acc: None,
            moe: None,
            loss_scale: None,
            skipped: None,
        }
    }

    /// Adds the validation loss and its perplexity exp(val_loss).
    pub fn with_val_loss(mut self, val_loss: f64) -> Record {
        self.val_loss = Some(val_loss);
        self.val_ppl = Some(val_loss.exp());
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot open the metrics log `{path}`: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write to the metrics log `{path}`: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Appends [`Record`]s to `DIR/metrics.jsonl`, one flushed line each, so a crashed or interrupted run
/// keeps every line it logged and `tail -f` shows progress live.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// File name inside the run directory.
    pub const FILE_NAME: &'static str = "metrics.jsonl";

    /// Starts a fresh log (truncates an existing one); creates `dir` if needed.
    pub fn create(dir: &Path) -> Result<MetricsLog, MetricsError> {
        Self::open_with(dir, false)
    }

    /// Continues an existing log (for `--resume`); creates it if absent.
    pub fn append(dir: &Path) -> Result<MetricsLog, MetricsError> {
        Self::open_with(dir, true)
    }

    fn open_with(dir: &Path, append: bool) -> Result<MetricsLog, MetricsError> {
        let path = dir.join(Self::FILE_NAME);
        std::fs::create_dir_all(dir).map_err(|source| MetricsError::Open {
            path: path.clone(),
            source,
        })?;
        let mut options = OpenOptions::new();
        options.create(true);
        if append {
            options.append(true);
        } else {
            options.write(true).truncate(true);
        }
        let file = options.open(&path).map_err(|source| MetricsError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(MetricsLog { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one record as one line (a single `write_all` of the whole line) and flushes it.
    pub fn write(&mut self, record: &Record) -> Result<(), MetricsError> {
        let mut line = to_json_line(record);
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|source| MetricsError::Write {
                path: self.path.clone(),
                source,
            })
    }
}

/// The JSON text of one record (no newline). Serialising this plain struct cannot fail: every map key
/// is a string and non-finite floats become `null`.
pub fn to_json_line(record: &Record) -> String {
    serde_json::to_string(record)
        .unwrap_or_else(|e| format!("{{\"step\":{},\"error\":\"{e}\"}}", record.step))
}

/// The console line, e.g. `step 100 | loss 3.2415 | aux 0.0234 | lr 3.00e-04 | 2,950 tok/s`, with
/// `| val_loss 3.1000 | val_ppl 22.20` (and `val_acc`) appended on eval steps.
pub fn console_line(record: &Record) -> String {
    let mut parts = vec![
        format!("step {}", record.step),
        format!("loss {:.4}", record.loss),
    ];
    if let Some(aux) = record.aux {
        parts.push(format!("aux {aux:.4}"));
    }
    parts.push(format!("lr {}", sci(record.lr)));
    if let (Some(scale), Some(skipped)) = (record.loss_scale, record.skipped) {
        parts.push(format!("scale {} | skipped {skipped}", sci(scale)));
    }
    parts.push(format!("{} tok/s", thousands(record.tokens_per_s)));
    if let Some(v) = record.val_loss {
        parts.push(format!("val_loss {v:.4}"));
    }
    if let Some(v) = record.val_ppl {
        parts.push(format!("val_ppl {v:.2}"));
    }
    if let Some(v) = record.val_acc {
        parts.push(format!("val_acc {:.2}%", 100.0 * v));
    }
    parts.join(" | ")
}

/// The per-layer utilisation summary printed under an eval step's log line, one line per MoE block:
/// `  block 1 | cv2 0.0123 | gini 0.051 | entropy 0.998 | used 100% | max/mean 1.21 | dropped 0.0% | z 4.21`.
pub fn moe_summary_lines(record: &Record) -> Vec<String> {
    let Some(moe) = &record.moe else {
        return Vec::new();
    };
    let mut blocks: Vec<(&String, &MoeLayerMetrics)> = moe.iter().collect();
    blocks.sort_by_key(|(block, _)| block.parse::<u64>().unwrap_or(u64::MAX));
    blocks
        .into_iter()
        .map(|(block, m)| {
            format!(
                "  block {block} | cv2 {:.4} | gini {:.3} | entropy {:.3} | used {:.0}% | max/mean {:.2} | dropped {:.1}% | z {:.2}",
                m.cv2, m.gini, m.entropy, m.experts_used, m.max_over_mean, m.dropped, m.router_z
            )
        })
        .collect()
}

/// `3e-4` → `3.00e-04`: C-style scientific notation (two mantissa decimals, signed two-digit exponent),
/// which Rust's `{:e}` does not produce.
pub fn sci(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let s = format!("{x:.2e}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// Rounds to an integer and groups digits by thousands: `2950.4` → `2,950`.
pub fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let n = x.round();
    let digits = format!("{}", n.abs() as u64);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0.0 {
        out.insert(0, '-');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: f64 = 1e-12;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= TOL, "{a} vs {b}");
    }

    #[test]
    fn router_logit_statistics_by_hand() {
        // 5 tokens × 2 experts; expert 0 sees 1..5, expert 1 sees 10, 0, 0, 0, NaN.
        let logits = [1.0, 10.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.0, 5.0, f32::NAN];
        let s = RouterLogitStats::from_logits(&logits, 2);
        close(s.mean[0], 3.0);
        close(s.std[0], 2f64.sqrt());
        close(s.min[0], 1.0);
        close(s.max[0], 5.0);
        // numpy.percentile([1..5], 5) = 1 + 0.05·4·(2 − 1) = 1.2; 95 → 4.8.
        close(s.p5[0], 1.2);
        close(s.p50[0], 3.0);
        close(s.p95[0], 4.8);
        assert!(s.mean[1].is_nan() && s.p50[1].is_nan());
        // NaN is logged as null and read back as NaN.
        let line = serde_json::to_string(&s).unwrap();
        let back: RouterLogitStats = serde_json::from_str(&line).unwrap();
        assert_eq!(back.p95[0], s.p95[0]);
        assert!(back.max[1].is_nan());
    }

    #[test]
    fn balanced_counts() {
        let m = MoeLayerMetrics::from_counts(&[5, 5, 5, 5], 0.0, 1.5, 0.01);
        assert_eq!(m.fraction, vec![0.25; 4]);
        close(m.cv2, 0.0);
        close(m.gini, 0.0);
        close(m.entropy, 1.0);
        close(m.experts_used, 100.0);
        close(m.max_over_mean, 1.0);
        close(m.router_z, 1.5);
        close(m.aux, 0.01);
    }

    #[test]
    fn one_expert_takes_all() {
        // fractions [0,0,0,1]: mean 1/4, var = (3·(1/16) + (9/16)) / 4 = 3/16, CV² = 3 (minus the
        // 1e-10 guard's effect, ~5e-9 relative).
        let m = MoeLayerMetrics::from_counts(&[0, 0, 0, 8], 0.0, 0.0, 0.0);
        assert!((m.cv2 - 3.0).abs() < 1e-8, "{}", m.cv2);
        // Gini: only i = 4 term: (8 - 4 - 1)·1 / (4·1) = 3/4 = (E-1)/E.
        close(m.gini, 0.75);
        close(m.entropy, 0.0);
        close(m.experts_used, 25.0);
        close(m.max_over_mean, 4.0);
    }

    #[test]
    fn uneven_hand_computed() {
        // counts [1, 2, 3, 6] → fractions [1/12, 2/12, 3/12, 6/12].
        let m = MoeLayerMetrics::from_counts(&[6, 1, 3, 2], 0.0, 0.0, 0.0);
        let f: [f64; 4] = [1.0 / 12.0, 2.0 / 12.0, 3.0 / 12.0, 6.0 / 12.0];
        // mean 1/4; deviations (−2, −1, 0, 3)/12 → var = (4+1+0+9)/144/4 = 14/576; CV² = (14/576)/(1/16).
        assert!((m.cv2 - 14.0 / 36.0).abs() < 1e-8, "{}", m.cv2);
        // Gini: (−3·1 − 1·2 + 1·3 + 3·6) / (4 · 12) = 16/48 = 1/3.
        close(m.gini, 1.0 / 3.0);
        let h: f64 = f.iter().map(|p| -p * p.ln()).sum();
        close(m.entropy, h / 4f64.ln());
        close(m.max_over_mean, 2.0);
        close(m.experts_used, 100.0);
    }

    #[test]
    fn empty_routing_is_all_zero() {
        let m = MoeLayerMetrics::from_counts(&[0, 0], 0.0, 0.0, 0.0);
        assert_eq!(m.fraction, vec![0.0, 0.0]);
        close(m.cv2, 0.0);
        close(m.gini, 0.0);
        close(m.entropy, 0.0);
        close(m.experts_used, 0.0);
        close(m.max_over_mean, 0.0);
        close(normalized_entropy(&[1.0]), 1.0);
    }

    #[test]
    fn dropped_is_a_percentage() {
        close(dropped_percent(3, 12), 25.0);
        close(dropped_percent(0, 0), 0.0);
    }

    #[test]
    fn console_format() {
        let mut r = Record::new(100, 3.24151, 3e-4, 2950.4);
        r.aux = Some(0.0234);
        assert_eq!(
            console_line(&r),
            "step 100 | loss 3.2415 | aux 0.0234 | lr 3.00e-04 | 2,950 tok/s"
        );
        let r = Record::new(7, 2.0, 1.0, 1234567.0).with_val_loss(1.0);
        assert_eq!(
            console_line(&r),
            "step 7 | loss 2.0000 | lr 1.00e+00 | 1,234,567 tok/s | val_loss 1.0000 | val_ppl 2.72"
        );
        assert_eq!(sci(1.5e-12), "1.50e-12");
        assert_eq!(sci(12345.0), "1.23e+04");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(-12345.0), "-12,345");
    }

    #[test]
    fn moe_summary_one_line_per_block_in_block_order() {
        let mut r = Record::new(100, 3.0, 1e-3, 100.0).with_val_loss(2.0);
        let mut moe = BTreeMap::new();
        moe.insert(
            "10".to_string(),
            MoeLayerMetrics::from_counts(&[2, 2, 2, 2], 0.0, 1.0, 0.01),
        );
        moe.insert(
            "2".to_string(),
            MoeLayerMetrics::from_counts(&[0, 0, 0, 8], 0.0, 4.2, 0.0),
        );
        r.moe = Some(moe);
        assert_eq!(
            moe_summary_lines(&r),
            [
                "  block 2 | cv2 3.0000 | gini 0.750 | entropy 0.000 | used 25% | max/mean 4.00 | dropped 0.0% | z 4.20",
                "  block 10 | cv2 0.0000 | gini 0.000 | entropy 1.000 | used 100% | max/mean 1.00 | dropped 0.0% | z 1.00",
            ]
        );
        assert!(moe_summary_lines(&Record::new(1, 1.0, 1.0, 1.0)).is_empty());
    }

    #[test]
    fn json_line_fields() {
        let mut r = Record::new(10, 2.5, 1e-3, 100.0);
        let mut moe = BTreeMap::new();
        moe.insert(
            "1".to_string(),
            MoeLayerMetrics::from_counts(&[1, 3], 0.0, 0.5, 0.02),
        );
        r.moe = Some(moe);
        let v: serde_json::Value = serde_json::from_str(&to_json_line(&r)).unwrap();
        assert_eq!(v["step"], 10);
        assert_eq!(v["loss"], 2.5);
        assert!(v.get("val_loss").is_none());
        assert_eq!(
            v["moe"]["1"]["tokens_per_expert"],
            serde_json::json!([1, 3])
        );
        assert_eq!(v["moe"]["1"]["fraction"], serde_json::json!([0.25, 0.75]));
        for key in [
            "cv2",
            "gini",
            "entropy",
            "experts_used",
            "max_over_mean",
            "dropped",
            "router_z",
            "aux",
        ] {
            assert!(v["moe"]["1"].get(key).is_some(), "missing {key}");
        }
        // A diverged loss still writes a valid line.
        let nan = to_json_line(&Record::new(11, f64::NAN, 1e-3, 1.0));
        let v: serde_json::Value = serde_json::from_str(&nan).unwrap();
        assert!(v["loss"].is_null());
        // ... and reads back as NaN.
        let back: Record = serde_json::from_str(&nan).unwrap();
        assert!(back.loss.is_nan());
        // Router state is optional both ways: absent when None, and lines without it still parse.
        assert!(v.get("moe").is_none());
        let mut layer = MoeLayerMetrics::from_counts(&[1, 3], 0.0, 0.5, 0.02);
        let plain: MoeLayerMetrics =
            serde_json::from_str(&serde_json::to_string(&layer).unwrap()).unwrap();
        assert_eq!(plain, layer);
        assert!(!serde_json::to_string(&layer).unwrap().contains("bias"));
        layer.bias = Some(vec![0.5, -0.5]);
        let with_bias: serde_json::Value = serde_json::to_value(&layer).unwrap();
        assert_eq!(with_bias["bias"], serde_json::json!([0.5, -0.5]));
    }

    #[test]
    fn log_appends_flushed_lines() {
        let dir = std::env::temp_dir().join(format!("moec-metrics-test-{}", std::process::id()));
        let mut log = MetricsLog::create(&dir).unwrap();
        log.write(&Record::new(1, 1.0, 1.0, 1.0)).unwrap();
        log.write(&Record::new(2, 0.5, 1.0, 1.0).with_val_loss(0.25))
            .unwrap();
        drop(log);
        let mut log = MetricsLog::append(&dir).unwrap();
        log.write(&Record::new(3, 0.25, 1.0, 1.0)).unwrap();
        let text = std::fs::read_to_string(dir.join(MetricsLog::FILE_NAME)).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<Record>(l).unwrap().step)
            .collect();
        assert_eq!(steps, vec![1, 2, 3]);
        MetricsLog::create(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join(MetricsLog::FILE_NAME)).unwrap(),
            ""
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
