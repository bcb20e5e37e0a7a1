//! The read-back every fencer shares: after asking for a power change, read
//! the power state until it is what was asked or a deadline passes. A
//! receipt is built only from a reading of off.

use std::future::Future;
use std::time::Duration;

use serde::Deserialize;
use wspare_core::{FenceReceipt, NodeId, PowerState, UnixMillis};

use crate::error::{FenceError, Op};

/// Deadlines and pacing of one device.
///
/// A `fence` call takes at most `command_timeout` (the power-off) plus
/// `confirm_timeout` plus one more `command_timeout` (a reading started
/// just before the deadline), then fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Timing {
    /// Deadline of one tool run or HTTP request.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// How long the power is read back after a power change before the
    /// fencer gives up.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Pause between two readings.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for Timing {
    /// 20 s per command, 30 s of read-back, a reading every second.
    fn default() -> Self {
        Timing {
            command_timeout: Duration::from_secs(20),
            confirm_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// Whether a status error ends the read-back at once (retrying cannot help).
fn is_final(e: &FenceError) -> bool {
    matches!(
        e,
        FenceError::CredentialsRefused(_)
            | FenceError::ToolMissing(_)
            | FenceError::Misconfigured(_)
            | FenceError::Unsupported(_)
            | FenceError::UnknownNode { .. }
            | FenceError::Config { .. }
    )
}

/// After a power-off request ended with `request`, reads the power with
/// `status` until it reads off or `timing.confirm_timeout` passes; the
/// receipt is built from that reading, by `device`.
///
/// If `request` is an error that proves nothing was done (refused
/// credentials, no answer, unreachable), it is returned at once without a
/// reading. Otherwise (accepted, or an answer lost, or a refusal that may
/// hide a completed action) the power is read back: only the reading counts.
pub(crate) async fn confirm_off<F, Fut>(
    device: &str,
    node: &NodeId,
    timing: &Timing,
    request: Result<(), FenceError>,
    status: F,
) -> Result<FenceReceipt, FenceError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<PowerState, FenceError>>,
{
    let at = read_back(device, node, Op::PowerOff, timing, request, status).await?;
    Ok(
        FenceReceipt::from_power_reading(node.clone(), device, PowerState::Off, at)
            .expect("a reading of off always makes a receipt"),
    )
}

/// [`confirm_off`] for a power-on: reads back until on, no receipt.
pub(crate) async fn confirm_on<F, Fut>(
    device: &str,
    node: &NodeId,
    timing: &Timing,
    request: Result<(), FenceError>,
    status: F,
) -> Result<(), FenceError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<PowerState, FenceError>>,
{
    read_back(device, node, Op::PowerOn, timing, request, status)
        .await
        .map(|_| ())
}

/// The read-back of [`confirm_off`] and [`confirm_on`]: returns the time of
/// the reading that matched `op`'s wanted state.
async fn read_back<F, Fut>(
    device: &str,
    node: &NodeId,
    op: Op,
    timing: &Timing,
    request: Result<(), FenceError>,
    mut status: F,
) -> Result<UnixMillis, FenceError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<PowerState, FenceError>>,
{
    let wanted = if op == Op::PowerOff {
        PowerState::Off
    } else {
        PowerState::On
    };
    let op_result = match request {
        Ok(()) => "was accepted".to_string(),
        Err(e) if !e.may_have_acted() => return Err(e),
        Err(e) => {
            tracing::warn!(device, %node, %op, error = %e, "request failed; reading the power back anyway");
            format!("failed ({e})")
        }
    };
    let start = tokio::time::Instant::now();
    let deadline = start + timing.confirm_timeout;
    let mut readings = 0u32;
    let mut last;
    loop {
        match status().await {
            Ok(s) if s == wanted => {
                tracing::info!(device, %node, %op, state = %s, readings = readings + 1, "power read back");
                return Ok(UnixMillis::now());
            }
            Ok(s) => {
                readings += 1;
                last = s.to_string();
            }
            Err(e) if is_final(&e) => return Err(e),
            Err(e) => {
                readings += 1;
                last = format!("error: {e}");
            }
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(timing.poll_interval.min(deadline - now)).await;
    }
    Err(FenceError::NotConfirmed {
        device: device.to_string(),
        node: node.clone(),
        op,
        wanted,
        op_result,
        last,
        readings,
        waited: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Exchange;
    use std::sync::atomic::{AtomicU32, Ordering};
    use wspare_core::{BackendError, ErrorKind};

    fn node() -> NodeId {
        NodeId::new("node-a").unwrap()
    }

    fn x() -> Exchange {
        Exchange {
            device: "d".into(),
            node: node(),
            op: Op::PowerOff,
            asked: "power off".into(),
            reply: "r".into(),
        }
    }

    fn timing() -> Timing {
        Timing {
            command_timeout: Duration::from_secs(5),
            confirm_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn returns_on_the_first_off_reading() {
        let n = AtomicU32::new(0);
        let r = confirm_off("d", &node(), &timing(), Ok(()), || async {
            Ok(if n.fetch_add(1, Ordering::SeqCst) < 2 {
                PowerState::On
            } else {
                PowerState::Off
            })
        })
        .await;
        assert!(r.is_ok());
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn stuck_on_times_out_without_receipt() {
        let t0 = tokio::time::Instant::now();
        let n = AtomicU32::new(0);
        let e = confirm_off("d", &node(), &timing(), Ok(()), || async {
            n.fetch_add(1, Ordering::SeqCst);
            Ok(PowerState::On)
        })
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        // Readings at 0..=10 s.
        assert_eq!(n.load(Ordering::SeqCst), 11);
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
        let msg = e.to_string();
        assert!(
            msg.contains("power off of node node-a was accepted"),
            "{msg}"
        );
        assert!(msg.contains("(11 readings, last: on); no receipt"), "{msg}");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_that_did_nothing_return_without_reading() {
        for e in [
            FenceError::CredentialsRefused(x()),
            FenceError::NoAnswer(x()),
            FenceError::Unreachable(x()),
        ] {
            let kind = e.kind();
            let r = confirm_off("d", &node(), &timing(), Err(e), || async {
                panic!("must not read")
            })
            .await;
            assert_eq!(r.unwrap_err().kind(), kind);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_answer_is_followed_by_reading_back() {
        let r = confirm_off(
            "d",
            &node(),
            &timing(),
            Err(FenceError::AnswerLost(x())),
            || async { Ok(PowerState::Off) },
        )
        .await;
        assert!(r.is_ok());
        let e = confirm_off(
            "d",
            &node(),
            &timing(),
            Err(FenceError::Refused(x())),
            || async { Ok(PowerState::Unknown) },
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("power off of node node-a failed (device reported failure: d:"),
            "{e}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refused_credentials_while_reading_stop_at_once() {
        let n = AtomicU32::new(0);
        let e = confirm_off("d", &node(), &timing(), Ok(()), || async {
            n.fetch_add(1, Ordering::SeqCst);
            Err(FenceError::CredentialsRefused(x()))
        })
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert_eq!(n.load(Ordering::SeqCst), 1, "no retry storm");
    }

    #[tokio::test(start_paused = true)]
    async fn transient_status_errors_are_retried_until_the_deadline() {
        let e = confirm_on("d", &node(), &timing(), Ok(()), || async {
            Err(FenceError::NoAnswer(x()))
        })
        .await
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("did not read back on within 10.0s"), "{msg}");
        assert!(msg.contains("last: error: no answer"), "{msg}");
        assert!(!msg.contains("no receipt"), "{msg}");
    }
}
