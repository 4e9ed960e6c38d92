//! [`Backoff`]: the retry delay of the relay and consumer-kit alike.
//! Exponential with jitter: the `n`-th delay is `min × 2^(n-1)`, capped at
//! `max`, then scaled by a random factor in [0.5, 1] so that many clients
//! that failed together do not retry together.

use std::time::Duration;

/// The `n`-th delay (`n` ≥ 1; 0 counts as 1) between `min` and `max`.
pub fn nth(n: u32, min: Duration, max: Duration) -> Duration {
    let exp = min.saturating_mul(2u32.saturating_pow(n.saturating_sub(1).min(30)));
    exp.min(max).mul_f64(rand::random_range(0.5..=1.0))
}

/// Consecutive failures and the delay each calls for, see [`nth`].
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// No failure yet; delays from `min` up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            failures: 0,
        }
    }

    /// Counts one more failure and returns the delay before the next try.
    pub fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        nth(self.failures, self.min, self.max)
    }

    /// A success: the next failure waits the shortest delay again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_double_up_to_max_with_jitter_and_reset() {
        let mut b = Backoff::new(100 * MS, 800 * MS);
        let d: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        assert!(d[0] >= 50 * MS && d[0] <= 100 * MS, "{d:?}");
        assert!(d[2] >= 200 * MS && d[2] <= 400 * MS, "{d:?}");
        assert!(d[3] >= 400 * MS && d[3] <= 800 * MS, "{d:?}");
        assert!(d[5] >= 400 * MS && d[5] <= 800 * MS, "{d:?}");
        b.reset();
        assert!(b.next_delay() <= 100 * MS);
    }

    #[test]
    fn huge_counts_stay_at_max() {
        let d = nth(u32::MAX, 100 * MS, 1000 * MS);
        assert!(d >= 500 * MS && d <= 1000 * MS, "{d:?}");
        assert!(nth(0, 100 * MS, 1000 * MS) <= 100 * MS);
    }
}
