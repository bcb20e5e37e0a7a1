//! The heartbeat failure detector: phi accrual (Hayashibara et al., "The φ
//! Accrual Failure Detector", 2004) with hysteresis.
//!
//! Sans-IO: heartbeats and `now` come in; it never reads a clock. Phi is
//! computed with the logistic approximation of the normal CDF that Akka and
//! Cassandra use, so the instant at which phi will cross the threshold has a
//! closed form (one cubic), and [`Detector::deadline`] is O(1): the machine
//! can offer it as its `poll_timeout` without polling.
//!
//! Hysteresis: once suspected, a node is trusted again only after
//! `recovery-heartbeats` heartbeats in a row, so a flapping link does not
//! flap the pair.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time::Instant;

/// Detector settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// Phi at which the peer is suspected (8 means a 1-in-10^8 chance that
    /// the heartbeat is merely late, by the model).
    pub threshold: f64,
    /// Inter-arrival times kept.
    pub window: usize,
    /// Floor of the standard deviation, so a perfectly regular sender does not
    /// make the detector hair-triggered.
    #[serde(with = "humantime_serde")]
    pub min_std_dev: Duration,
    /// Pause tolerated on top of the mean interval (GC, a busy host).
    #[serde(with = "humantime_serde")]
    pub acceptable_pause: Duration,
    /// Expected heartbeat interval before any was measured.
    #[serde(with = "humantime_serde")]
    pub expected_interval: Duration,
    /// Suspect the peer if no heartbeat arrived this long after start.
    #[serde(with = "humantime_serde")]
    pub initial_timeout: Duration,
    /// Heartbeats in a row that clear a suspicion.
    pub recovery_heartbeats: u32,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            threshold: 8.0,
            window: 100,
            min_std_dev: Duration::from_millis(100),
            acceptable_pause: Duration::from_secs(2),
            expected_interval: Duration::from_secs(1),
            initial_timeout: Duration::from_secs(15),
            recovery_heartbeats: 3,
        }
    }
}

impl DetectorConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.threshold.is_finite() && self.threshold >= 1.0 && self.threshold <= 30.0) {
            return Err(format!("threshold = {} is outside 1..=30", self.threshold));
        }
        if self.window < 2 || self.window > 10_000 {
            return Err(format!("window = {} is outside 2..=10000", self.window));
        }
        if self.expected_interval.is_zero() {
            return Err("expected-interval must be greater than zero".into());
        }
        if self.initial_timeout.is_zero() {
            return Err("initial-timeout must be greater than zero".into());
        }
        if self.recovery_heartbeats == 0 {
            return Err("recovery-heartbeats must be at least 1".into());
        }
        Ok(())
    }
}

/// A phi-accrual detector for one peer.
#[derive(Clone, Debug)]
pub struct Detector {
    cfg: DetectorConfig,
    /// Inter-arrival times in milliseconds.
    intervals: VecDeque<f64>,
    sum: f64,
    sum_sq: f64,
    last: Option<Instant>,
    suspected: bool,
    streak: u32,
    /// When phi crosses the threshold if no heartbeat arrives.
    deadline: Instant,
    /// ln(p / (1 - p)) for p = 10^-threshold, precomputed.
    log_odds: f64,
}

// Coefficients of the logistic approximation of the normal CDF.
const A: f64 = 1.5976;
const B: f64 = 0.070566;

impl Detector {
    /// A detector that starts counting at `now`.
    pub fn new(cfg: DetectorConfig, now: Instant) -> Self {
        let p = 10f64.powf(-cfg.threshold);
        let log_odds = (p / (1.0 - p)).ln();
        let deadline = now + cfg.initial_timeout;
        Detector {
            intervals: VecDeque::with_capacity(cfg.window),
            cfg,
            sum: 0.0,
            sum_sq: 0.0,
            last: None,
            suspected: false,
            streak: 0,
            deadline,
            log_odds,
        }
    }

    /// A heartbeat arrived at `now`. Returns true if it cleared a suspicion.
    pub fn heartbeat(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let ms = (now - last).as_secs_f64() * 1000.0;
            if self.intervals.len() == self.cfg.window {
                let old = self.intervals.pop_front().unwrap_or(0.0);
                self.sum -= old;
                self.sum_sq -= old * old;
            }
            self.intervals.push_back(ms);
            self.sum += ms;
            self.sum_sq += ms * ms;
        }
        self.last = Some(now);
        self.deadline = now + self.crossing_after();
        if self.suspected {
            self.streak += 1;
            if self.streak >= self.cfg.recovery_heartbeats {
                self.suspected = false;
                self.streak = 0;
                return true;
            }
        }
        false
    }

    /// Updates the suspicion at `now`. Returns true if the peer just became
    /// suspected.
    pub fn check(&mut self, now: Instant) -> bool {
        if !self.suspected && now >= self.deadline {
            self.suspected = true;
            self.streak = 0;
            return true;
        }
        false
    }

    /// Suspects the peer now, as a machine restored in the middle of
    /// acting on a suspicion must: `recovery-heartbeats` heartbeats in a row
    /// clear it again, exactly as after `check`.
    pub fn suspect(&mut self) {
        self.suspected = true;
        self.streak = 0;
    }

    /// Whether the peer is suspected (as of the last `check`).
    pub fn is_suspected(&self) -> bool {
        self.suspected
    }

    /// When the peer becomes suspected if no heartbeat arrives; `NEVER`
    /// while it is already suspected.
    pub fn deadline(&self) -> Instant {
        if self.suspected {
            Instant::NEVER
        } else {
            self.deadline
        }
    }

    /// Time since the last heartbeat; `None` before the first.
    pub fn silence(&self, now: Instant) -> Option<Duration> {
        self.last.map(|l| now - l)
    }

    /// Phi at `now`.
    pub fn phi(&self, now: Instant) -> f64 {
        let Some(last) = self.last else {
            return if now >= self.deadline {
                f64::INFINITY
            } else {
                0.0
            };
        };
        let (mean, sd) = self.mean_sd();
        let elapsed = (now - last).as_secs_f64() * 1000.0;
        let y = (elapsed - mean) / sd;
        let e = (-y * (A + B * y * y)).exp();
        let p = if elapsed > mean {
            e / (1.0 + e)
        } else {
            1.0 - 1.0 / (1.0 + e)
        };
        -p.max(f64::MIN_POSITIVE).log10()
    }

    /// Mean (plus the acceptable pause) and standard deviation, in ms.
    fn mean_sd(&self) -> (f64, f64) {
        let pause = self.cfg.acceptable_pause.as_secs_f64() * 1000.0;
        let min_sd = self.cfg.min_std_dev.as_secs_f64() * 1000.0;
        let n = self.intervals.len();
        let (mean, sd) = if n == 0 {
            let m = self.cfg.expected_interval.as_secs_f64() * 1000.0;
            (m, m / 4.0)
        } else {
            let mean = self.sum / n as f64;
            let var = (self.sum_sq / n as f64 - mean * mean).max(0.0);
            (mean, var.sqrt())
        };
        (mean + pause, sd.max(min_sd).max(1e-3))
    }

    /// Time after the last heartbeat at which phi reaches the threshold:
    /// solves b·y³ + a·y + ln(p/(1-p)) = 0 (one real root, by Cardano).
    fn crossing_after(&self) -> Duration {
        let (mean, sd) = self.mean_sd();
        let p = A / B;
        let q = self.log_odds / B;
        let disc = (q * q / 4.0 + p * p * p / 27.0).sqrt();
        let y = (-q / 2.0 + disc).cbrt() + (-q / 2.0 - disc).cbrt();
        let ms = (mean + y * sd).max(0.0);
        Duration::from_secs_f64(ms / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::from_origin(Duration::from_millis(ms))
    }

    fn cfg() -> DetectorConfig {
        DetectorConfig {
            acceptable_pause: Duration::ZERO,
            ..DetectorConfig::default()
        }
    }

    #[test]
    fn phi_grows_with_silence_and_deadline_matches_threshold() {
        let mut d = Detector::new(cfg(), at(0));
        for i in 0..50 {
            d.heartbeat(at(i * 1000));
        }
        let last = 49_000;
        assert!(d.phi(at(last + 500)) < 0.5);
        assert!(d.phi(at(last + 1200)) < d.phi(at(last + 1400)));
        let deadline = d.deadline();
        let phi_at = d.phi(deadline);
        assert!((phi_at - 8.0).abs() < 0.01, "phi at deadline = {phi_at}");
        let just_before = Instant::from_origin(deadline.since_origin() - Duration::from_millis(5));
        assert!(!d.check(just_before));
        assert!(d.check(deadline));
        assert!(d.is_suspected());
        assert_eq!(d.deadline(), Instant::NEVER);
    }

    #[test]
    fn regular_heartbeats_never_suspect() {
        let mut d = Detector::new(DetectorConfig::default(), at(0));
        for i in 0..1000u64 {
            let t = at(i * 1000 + (i * 37 % 200));
            d.heartbeat(t);
            assert!(!d.check(t + Duration::from_millis(900)), "suspected at {i}");
        }
    }

    #[test]
    fn jittery_links_get_a_longer_deadline() {
        let mut steady = Detector::new(cfg(), at(0));
        let mut jittery = Detector::new(cfg(), at(0));
        let mut t = 0;
        for i in 0..100u64 {
            steady.heartbeat(at(i * 1000));
            t += if i % 2 == 0 { 500 } else { 1500 };
            jittery.heartbeat(at(t));
        }
        let s = steady.deadline() - at(99_000);
        let j = jittery.deadline() - at(t);
        assert!(j > s * 2, "steady {s:?} jittery {j:?}");
    }

    #[test]
    fn hysteresis_needs_consecutive_heartbeats() {
        let mut d = Detector::new(DetectorConfig::default(), at(0));
        for i in 0..10 {
            d.heartbeat(at(i * 1000));
        }
        assert!(d.check(at(60_000)));
        assert!(!d.heartbeat(at(60_100)));
        assert!(!d.heartbeat(at(61_100)));
        assert!(d.is_suspected());
        assert!(d.heartbeat(at(62_100)));
        assert!(!d.is_suspected());
    }

    #[test]
    fn no_heartbeat_at_all_suspects_after_initial_timeout() {
        let mut d = Detector::new(DetectorConfig::default(), at(0));
        assert!(!d.check(at(14_999)));
        assert!(d.check(at(15_000)));
        assert!(d.phi(at(15_000)).is_infinite());
    }

    #[test]
    fn window_slides() {
        let c = DetectorConfig {
            window: 4,
            acceptable_pause: Duration::ZERO,
            ..DetectorConfig::default()
        };
        let mut d = Detector::new(c, at(0));
        let mut t = 0;
        for _ in 0..10 {
            t += 10_000;
            d.heartbeat(at(t));
        }
        let slow = d.deadline() - at(t);
        for _ in 0..4 {
            t += 1000;
            d.heartbeat(at(t));
        }
        let fast = d.deadline() - at(t);
        assert!(fast < slow / 5, "{fast:?} vs {slow:?}");
    }

    #[test]
    fn validate_names_fields() {
        let c = DetectorConfig {
            threshold: 0.5,
            ..DetectorConfig::default()
        };
        assert!(c.validate().unwrap_err().starts_with("threshold"));
        let c = DetectorConfig {
            window: 1,
            ..DetectorConfig::default()
        };
        assert!(c.validate().unwrap_err().starts_with("window"));
    }
}
