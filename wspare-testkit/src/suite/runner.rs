//! Running cases: a fresh environment each, a timeout, panics caught, the
//! step a case was at when it hung, and helpers that turn a backend's answer
//! into a failure message.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use wspare_core::{Error, ErrorKind, Result};

use super::report::{CaseOutcome, CaseResult, Report};
use super::Options;

/// Why a case stopped early.
#[derive(Debug)]
pub(crate) enum Stop {
    /// The invariant was violated (message without the case name).
    Fail(String),
    /// The case does not apply.
    Skip(String),
}

impl Stop {
    /// Prefixes a failure's message with `context`; a skip stays as it is.
    pub(crate) fn context(self, context: &str) -> Stop {
        match self {
            Stop::Fail(m) => Stop::Fail(format!("{context}: {m}")),
            skip => skip,
        }
    }
}

/// What a case body returns.
pub(crate) type Verdict = std::result::Result<(), Stop>;

/// Fails the current case with a formatted message.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::suite::runner::Stop::Fail(format!($($arg)*)))
    };
}

/// Skips the current case with a formatted reason.
macro_rules! skip {
    ($($arg:tt)*) => {
        return Err($crate::suite::runner::Stop::Skip(format!($($arg)*)))
    };
}

/// Fails the current case unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            fail!($($arg)*);
        }
    };
}

pub(crate) use {ensure, fail, skip};

tokio::task_local! {
    static STEP: Arc<Mutex<String>>;
}

/// Records what the case is doing now, for the message if it hangs.
pub(crate) fn set_step(step: &str) {
    let _ = STEP.try_with(|s| {
        if let Ok(mut s) = s.lock() {
            s.clear();
            s.push_str(step);
        }
    });
}

/// Awaits a backend or fixture call that must succeed; its error fails the
/// case as "`what` failed: error".
pub(crate) async fn call<T>(
    what: impl Into<String>,
    fut: impl Future<Output = Result<T>>,
) -> Result<T, Stop> {
    let what = what.into();
    set_step(&what);
    fut.await
        .map_err(|e| Stop::Fail(format!("{what} failed: {e}")))
}

/// Awaits a call that must fail with one of `kinds`; `why` says why
/// ("of a VM that is not defined"). Returns the error.
pub(crate) async fn expect_err<T: fmt::Debug>(
    what: impl Into<String>,
    why: &str,
    kinds: &[ErrorKind],
    fut: impl Future<Output = Result<T>>,
) -> Result<Error, Stop> {
    let mut what = what.into();
    set_step(&what);
    if !why.is_empty() {
        what = format!("{what} {why}");
    }
    match fut.await {
        Ok(v) => Err(Stop::Fail(format!(
            "{what} returned Ok({v:?}), expected {} error",
            kinds_text(kinds)
        ))),
        Err(e) if kinds.contains(&e.kind()) => Ok(e),
        Err(e) => Err(Stop::Fail(format!(
            "{what} failed with kind {}, expected {} (error: {e})",
            e.kind(),
            kinds_text(kinds)
        ))),
    }
}

fn kinds_text(kinds: &[ErrorKind]) -> String {
    let names: Vec<String> = kinds.iter().map(|k| format!("{k:?}")).collect();
    match names.len() {
        0 => "an".to_string(),
        1 => format!("a {}", names[0]),
        _ => format!(
            "a {} or {}",
            names[..names.len() - 1].join(", "),
            names[names.len() - 1]
        ),
    }
}

/// Time on the suite's clock (tokio's, so paused runtimes are instant).
pub(crate) fn now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// Sleeps on the suite's clock.
pub(crate) async fn pause(what: &str, d: Duration) {
    set_step(&format!("{what} (waiting {d:?})"));
    tokio::time::sleep(d).await;
}

/// Runs `cases` one after the other, each guarded by the options' timeout
/// and against panics, and collects the report. `run` gets the index of
/// the case to run.
pub(crate) async fn run_cases<'a, F, Fut>(
    title: String,
    names: &[&'static str],
    opts: &Options,
    run: F,
) -> Report
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Verdict> + Send + 'a,
{
    let mut report = Report {
        title,
        cases: Vec::new(),
    };
    for (i, &name) in names.iter().enumerate() {
        if !opts.selects(name) {
            continue;
        }
        tracing::debug!(case = name, "conformance case starting");
        let started = now();
        let outcome = guarded(name, opts.case_timeout, run(i)).await;
        let elapsed = now().saturating_duration_since(started);
        tracing::debug!(case = name, ?outcome, "conformance case done");
        report.cases.push(CaseResult {
            name,
            outcome,
            elapsed,
        });
    }
    report
}

/// Runs one case body: a timeout, panics caught, the name prefixed to a
/// failure message.
pub(crate) async fn guarded(
    name: &str,
    timeout: Duration,
    body: impl Future<Output = Verdict> + Send,
) -> CaseOutcome {
    let step = Arc::new(Mutex::new(String::from("building the environment")));
    let fut = STEP.scope(step.clone(), CatchUnwind(Box::pin(body)));
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(Ok(()))) => CaseOutcome::Passed,
        Ok(Ok(Err(Stop::Skip(reason)))) => CaseOutcome::Skipped(reason),
        Ok(Ok(Err(Stop::Fail(msg)))) => CaseOutcome::Failed(format!("{name}: {msg}")),
        Ok(Err(panic)) => CaseOutcome::Failed(format!(
            "{name}: the case panicked: {}",
            panic_text(&*panic)
        )),
        Err(_) => {
            let step = step.lock().map(|s| s.clone()).unwrap_or_default();
            CaseOutcome::Failed(format!(
                "{name}: did not finish within {timeout:?} (a call hangs?); last step: {step}"
            ))
        }
    }
}

fn panic_text(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a non-text panic payload)".to_string()
    }
}

/// Catches a panic raised while polling the inner future.
struct CatchUnwind<'a>(Pin<Box<dyn Future<Output = Verdict> + Send + 'a>>);

impl Future for CatchUnwind<'_> {
    type Output = std::result::Result<Verdict, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(p) => Poll::Ready(Err(p)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn slow_then_hang() -> Verdict {
        set_step("start(vm)");
        std::future::pending::<()>().await;
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_case_fails_with_its_last_step() {
        let out = guarded(
            "H4 idempotent start",
            Duration::from_secs(5),
            slow_then_hang(),
        )
        .await;
        assert_eq!(
            out,
            CaseOutcome::Failed(
                "H4 idempotent start: did not finish within 5s (a call hangs?); last step: start(vm)".into()
            )
        );
    }

    #[tokio::test]
    async fn a_panicking_case_fails_with_the_panic_text() {
        let out = guarded("R1 empty", Duration::from_secs(5), async {
            if true {
                panic!("backend bug: index out of range");
            }
            Ok(())
        })
        .await;
        assert_eq!(
            out,
            CaseOutcome::Failed(
                "R1 empty: the case panicked: backend bug: index out of range".into()
            )
        );
    }

    #[tokio::test]
    async fn failures_get_the_case_name_and_skips_keep_their_reason() {
        let out = guarded("F3 no false receipt", Duration::from_secs(5), async {
            fail!("got {}", 1)
        })
        .await;
        assert_eq!(
            out,
            CaseOutcome::Failed("F3 no false receipt: got 1".into())
        );
        let out = guarded("H8 freeze", Duration::from_secs(5), async {
            skip!("backend lacks capability freeze")
        })
        .await;
        assert_eq!(
            out,
            CaseOutcome::Skipped("backend lacks capability freeze".into())
        );
        let out = guarded("H8 freeze", Duration::from_secs(5), async { Ok(()) }).await;
        assert_eq!(out, CaseOutcome::Passed);
    }

    #[tokio::test]
    async fn expect_err_names_the_wrong_answer() {
        let e = expect_err(
            "start(web)",
            "of a missing VM",
            &[ErrorKind::NotFound],
            async { Ok::<_, Error>(()) },
        )
        .await
        .unwrap_err();
        let Stop::Fail(m) = e else { panic!("{e:?}") };
        assert_eq!(
            m,
            "start(web) of a missing VM returned Ok(()), expected a NotFound error"
        );
        let e = expect_err(
            "fence(a)",
            "",
            &[ErrorKind::Unreachable, ErrorKind::Timeout],
            async { Err::<(), _>(Error::new(ErrorKind::Conflict, "busy")) },
        )
        .await
        .unwrap_err();
        let Stop::Fail(m) = e else { panic!("{e:?}") };
        assert_eq!(
            m,
            "fence(a) failed with kind conflict, expected a Unreachable or Timeout (error: busy (conflict))"
        );
        let ok = expect_err("x", "y", &[ErrorKind::Conflict], async {
            Err::<(), _>(Error::new(ErrorKind::Conflict, "busy"))
        })
        .await
        .unwrap();
        assert_eq!(ok.kind(), ErrorKind::Conflict);
    }
}
