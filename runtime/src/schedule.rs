//! Learning-rate schedules of the `train` block (`schedule = constant | cosine(...) | linear(...)`).
//!
//! Conventions (docs/language.md states them for users):
//! - `step` is the 0-based index of the optimizer step about to be taken; a run has steps
//!   `0..total_steps`. Steps past the end keep the value of the last step.
//! - Warmup is linear and never gives a zero learning rate: step `s < W` uses `base · (s + 1) / W`, so
//!   step 0 already learns (`base / W`) and step `W - 1` reaches `base` (as nanoGPT/llm.c do). A zero
//!   rate at step 0 would spend a whole step computing gradients that are thrown away.
//! - `cosine(warmup = W, min_lr = m)`: `m` is an absolute learning rate (Megatron's `min_lr`, HF's
//!   `cosine_with_min_lr`), not a fraction of `base`. After warmup the rate follows half a cosine from
//!   `base` at step `W` down to exactly `m` at the last step `total_steps - 1`.
//! - `linear(warmup = W)`: after warmup the rate falls linearly from `base` at step `W` and would reach
//!   0 at step `total_steps` (one past the end), so the last step still learns
//!   (`base / (total_steps - W)`), as HF's `get_linear_schedule_with_warmup` does.

use moec_compiler::spec::Schedule;
use std::f64::consts::PI;

/// The learning rate for optimizer step `step` (0-based) of a run of `total_steps` steps.
pub fn lr_at(schedule: &Schedule, base_lr: f64, step: usize, total_steps: usize) -> f64 {
    let last = total_steps.saturating_sub(1);
    let step = step.min(last);
    match *schedule {
        Schedule::Constant => base_lr,
        Schedule::Cosine { warmup, min_lr } => {
            if step < warmup {
                return warmup_lr(base_lr, step, warmup);
            }
            // Steps W..=last map to progress 0..=1; with no room to decay (last == W) the one
            // post-warmup step is the last step and gets `min_lr`.
            let span = last.saturating_sub(warmup);
            let progress = if span == 0 {
                1.0
            } else {
                (step - warmup) as f64 / span as f64
            };
            min_lr + (base_lr - min_lr) * 0.5 * (1.0 + (PI * progress).cos())
        }
        Schedule::Linear { warmup } => {
            if step < warmup {
                return warmup_lr(base_lr, step, warmup);
            }
            let span = total_steps.saturating_sub(warmup).max(1);
            base_lr * (total_steps - step) as f64 / span as f64
        }
    }
}

fn warmup_lr(base_lr: f64, step: usize, warmup: usize) -> f64 {
    base_lr * (step + 1) as f64 / warmup as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: f64 = 1e-15;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= TOL * b.abs().max(1.0), "{a} vs {b}");
    }

    #[test]
    fn constant_is_base_everywhere() {
        for step in [0, 5, 99, 1000] {
            close(lr_at(&Schedule::Constant, 3e-4, step, 100), 3e-4);
        }
    }

    #[test]
    fn cosine_hand_values() {
        // base 1.0, W = 10, min 0.1, 111 steps: decay over steps 10..=110 (span 100).
        let s = Schedule::Cosine {
            warmup: 10,
            min_lr: 0.1,
        };
        close(lr_at(&s, 1.0, 0, 111), 0.1); // 1/10
        close(lr_at(&s, 1.0, 4, 111), 0.5); // 5/10
        close(lr_at(&s, 1.0, 9, 111), 1.0); // 10/10
        close(lr_at(&s, 1.0, 10, 111), 1.0); // cos(0)
        close(lr_at(&s, 1.0, 60, 111), 0.55); // cos(pi/2) = 0: 0.1 + 0.9 * 0.5
                                              // progress 0.25: 0.1 + 0.9 * 0.5 * (1 + sqrt(2)/2)
        close(lr_at(&s, 1.0, 35, 111), 0.1 + 0.45 * (1.0 + 0.5f64.sqrt()));
        close(lr_at(&s, 1.0, 110, 111), 0.1); // last step: exactly min_lr
        close(lr_at(&s, 1.0, 500, 111), 0.1); // past the end: stays at min_lr
    }

    #[test]
    fn cosine_without_warmup_starts_at_base() {
        let s = Schedule::Cosine {
            warmup: 0,
            min_lr: 0.0,
        };
        close(lr_at(&s, 2.0, 0, 3), 2.0);
        close(lr_at(&s, 2.0, 1, 3), 1.0);
        close(lr_at(&s, 2.0, 2, 3), 0.0);
        // A one-step run: that step is the last one.
        close(lr_at(&s, 2.0, 0, 1), 0.0);
    }

    #[test]
    fn linear_hand_values() {
        // base 1.0, W = 4, 14 steps: decay over steps 4..14 with span 10.
        let s = Schedule::Linear { warmup: 4 };
        close(lr_at(&s, 1.0, 0, 14), 0.25);
        close(lr_at(&s, 1.0, 3, 14), 1.0);
        close(lr_at(&s, 1.0, 4, 14), 1.0);
        close(lr_at(&s, 1.0, 9, 14), 0.5);
        close(lr_at(&s, 1.0, 13, 14), 0.1); // last step still learns
        close(lr_at(&s, 1.0, 20, 14), 0.1);
    }

    #[test]
    fn warmup_longer_than_the_run_never_divides_by_zero() {
        let s = Schedule::Linear { warmup: 50 };
        close(lr_at(&s, 1.0, 9, 10), 0.2);
        let s = Schedule::Cosine {
            warmup: 50,
            min_lr: 0.0,
        };
        close(lr_at(&s, 1.0, 0, 10), 0.02);
        assert_eq!(lr_at(&Schedule::Constant, 1.0, 0, 0), 1.0);
    }
}
