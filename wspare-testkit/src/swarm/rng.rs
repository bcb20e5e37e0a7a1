//! The simulator's only source of randomness: ChaCha8 seeded from the
//! seed, with the few draws the simulator needs.

use std::time::Duration;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A seeded random stream. Two streams of one seed with different `stream`
/// numbers are independent, so the fault plan and the run's draws (loss,
/// jitter) do not shift each other when one of them changes.
pub(crate) struct Rng(ChaCha8Rng);

impl Rng {
    pub(crate) fn new(seed: u64, stream: u64) -> Rng {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        r.set_stream(stream);
        Rng(r)
    }

    pub(crate) fn u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift: unbiased enough for a simulator, and branch-free.
        ((u128::from(self.u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// A duration uniform in `lo..=hi`, in milliseconds.
    pub(crate) fn millis(&mut self, lo: Duration, hi: Duration) -> Duration {
        Duration::from_millis(self.range(lo.as_millis() as u64, hi.as_millis() as u64))
    }

    /// Time to the next event of a Poisson process with `per_hour` events
    /// an hour; `None` if the rate is zero.
    pub(crate) fn exp_gap(&mut self, per_hour: f64) -> Option<Duration> {
        if per_hour <= 0.0 {
            return None;
        }
        let u = self.unit().max(1e-12);
        Some(Duration::from_secs_f64(-u.ln() * 3600.0 / per_hour))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_independent() {
        let a: Vec<u64> = (0..4).map(|_| Rng::new(7, 0).u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]), "same seed, same draw");
        let mut x = Rng::new(7, 0);
        let mut y = Rng::new(7, 1);
        assert_ne!(x.u64(), y.u64());
        let mut r = Rng::new(1, 0);
        for _ in 0..1000 {
            let v = r.range(3, 5);
            assert!((3..=5).contains(&v));
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
        }
        assert_eq!(r.exp_gap(0.0), None);
    }
}
