//! Jittered exponential backoff between retries.
//!
//! Delays start at `initial` and double up to `max`. Each delay is drawn uniformly from the
//! upper half of the current step (`[step/2, step]`), so clients that failed together (every
//! client of a leader that just died) do not retry in lock-step, while the expected delay still
//! grows geometrically.

use std::time::Duration;

use rand::Rng;

/// Backoff settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffConfig {
    /// The first step.
    pub initial: Duration,
    /// The largest step.
    pub max: Duration,
}

impl Default for BackoffConfig {
    /// 20 ms doubling to 500 ms: a leader election takes a few hundred milliseconds, so a
    /// retry lands soon after a new leader is ready.
    fn default() -> Self {
        BackoffConfig { initial: Duration::from_millis(20), max: Duration::from_millis(500) }
    }
}

/// The state of one retry sequence.
#[derive(Clone, Debug)]
pub struct Backoff {
    config: BackoffConfig,
    step: Duration,
}

impl Backoff {
    /// A fresh sequence.
    pub fn new(config: BackoffConfig) -> Self {
        let initial = config.initial.max(Duration::from_millis(1));
        Backoff { config: BackoffConfig { initial, max: config.max.max(initial) }, step: initial }
    }

    /// The next delay; the step doubles after each call, up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(self.config.max);
        let lo = step / 2;
        let jitter = rand::rng().random_range(0..=(step - lo).as_micros() as u64);
        lo + Duration::from_micros(jitter)
    }

    /// Starts over from the initial step (after a success).
    pub fn reset(&mut self) {
        self.step = self.config.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_within_jitter_bounds_and_cap() {
        let cfg =
            BackoffConfig { initial: Duration::from_millis(20), max: Duration::from_millis(500) };
        for _ in 0..50 {
            let mut b = Backoff::new(cfg);
            let mut step = cfg.initial;
            for _ in 0..12 {
                let d = b.next_delay();
                assert!(d >= step / 2 && d <= step, "{d:?} outside [{:?}, {step:?}]", step / 2);
                step = (step * 2).min(cfg.max);
            }
            // Capped: every later delay is within [max/2, max].
            let d = b.next_delay();
            assert!(d >= cfg.max / 2 && d <= cfg.max);
        }
    }

    #[test]
    fn reset_starts_over() {
        let cfg = BackoffConfig::default();
        let mut b = Backoff::new(cfg);
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= cfg.initial);
    }

    #[test]
    fn degenerate_settings_do_not_panic() {
        let mut b = Backoff::new(BackoffConfig { initial: Duration::ZERO, max: Duration::ZERO });
        assert!(b.next_delay() <= Duration::from_millis(1));
    }
}
