//! Time for the simulated world: a [`Clock`] the sim backends read and
//! sleep on, never the wall clock.
//!
//! - [`TokioClock`] follows tokio's clock: under a paused runtime
//!   (`#[tokio::test(start_paused = true)]`) time only moves when every task
//!   waits, so runs are instant and repeatable.
//! - [`ManualClock`] moves only when the simulator calls
//!   [`ManualClock::advance`]; sleepers wake in deadline order. For a
//!   discrete-event loop that polls futures itself.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use wspare_core::UnixMillis;

use super::world::ms;

/// A boxed sleep.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Where the simulated world takes its time from.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now, in simulated wall-clock milliseconds.
    fn now(&self) -> UnixMillis;
    /// A future that completes once `d` of this clock's time has passed.
    fn sleep(&self, d: Duration) -> Sleep;
}

/// The default start of simulated time: 2023-11-14T22:13:20Z.
pub const DEFAULT_EPOCH: UnixMillis = UnixMillis(1_700_000_000_000);

/// Simulated time = `base` + tokio time elapsed since the clock was made.
/// Make it inside the runtime whose clock it should follow.
#[derive(Debug)]
pub struct TokioClock {
    base: UnixMillis,
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock that reads `base` now.
    pub fn new(base: UnixMillis) -> Self {
        TokioClock {
            base,
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::new(DEFAULT_EPOCH)
    }
}

impl Clock for TokioClock {
    fn now(&self) -> UnixMillis {
        let ms = tokio::time::Instant::now()
            .saturating_duration_since(self.origin)
            .as_millis();
        UnixMillis(self.base.0 + u64::try_from(ms).unwrap_or(u64::MAX - self.base.0))
    }

    fn sleep(&self, d: Duration) -> Sleep {
        Box::pin(tokio::time::sleep(d))
    }
}

/// A clock that moves only when told. Cheap to clone; clones share the time.
#[derive(Clone, Debug)]
pub struct ManualClock {
    inner: Arc<Mutex<ManualState>>,
}

#[derive(Debug)]
struct ManualState {
    now: u64,
    next_id: u64,
    /// Sleepers by (deadline, id): woken in deadline order, ties in order of
    /// registration.
    timers: BTreeMap<(u64, u64), Waker>,
}

impl ManualClock {
    /// A clock that reads `start`.
    pub fn new(start: UnixMillis) -> Self {
        ManualClock {
            inner: Arc::new(Mutex::new(ManualState {
                now: start.0,
                next_id: 0,
                timers: BTreeMap::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ManualState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves time forward by `d` and wakes every sleeper due by then.
    pub fn advance(&self, d: Duration) {
        let to = {
            let s = self.lock();
            s.now.saturating_add(ms(d))
        };
        self.advance_to(UnixMillis(to));
    }

    /// Moves time forward to `t` (never back) and wakes every sleeper due.
    pub fn advance_to(&self, t: UnixMillis) {
        let due: Vec<Waker> = {
            let mut s = self.lock();
            s.now = s.now.max(t.0);
            let now = s.now;
            let later = s.timers.split_off(&(now + 1, 0));
            std::mem::replace(&mut s.timers, later)
                .into_values()
                .collect()
        };
        for w in due {
            w.wake();
        }
    }

    /// The earliest deadline a sleeper waits for, if any: where a
    /// discrete-event loop jumps next.
    pub fn next_deadline(&self) -> Option<UnixMillis> {
        self.lock()
            .timers
            .keys()
            .next()
            .map(|&(t, _)| UnixMillis(t))
    }

    /// How many sleepers wait.
    pub fn sleepers(&self) -> usize {
        self.lock().timers.len()
    }

    /// Runs `fut` to completion on this thread without a runtime, jumping
    /// the clock to the next sleeper's deadline whenever it waits: a
    /// one-future discrete-event loop. `None` if it waits with no sleeper
    /// left, that is, it would hang (a [`Fault`](super::Fault) that hangs a
    /// call, say); the future is dropped then.
    pub fn block_on<F: Future>(&self, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return Some(v);
            }
            self.advance_to(self.next_deadline()?);
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixMillis {
        UnixMillis(self.lock().now)
    }

    fn sleep(&self, d: Duration) -> Sleep {
        let (deadline, id) = {
            let mut s = self.lock();
            let id = s.next_id;
            s.next_id += 1;
            (s.now.saturating_add(ms(d)), id)
        };
        Box::pin(ManualSleep {
            clock: self.clone(),
            deadline,
            id,
        })
    }
}

struct ManualSleep {
    clock: ManualClock,
    deadline: u64,
    id: u64,
}

impl Future for ManualSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.clock.lock();
        if s.now >= self.deadline {
            s.timers.remove(&(self.deadline, self.id));
            Poll::Ready(())
        } else {
            s.timers
                .insert((self.deadline, self.id), cx.waker().clone());
            Poll::Pending
        }
    }
}

impl Drop for ManualSleep {
    fn drop(&mut self) {
        self.clock.lock().timers.remove(&(self.deadline, self.id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn manual_clock_wakes_sleepers_in_deadline_order_only_when_advanced() {
        let c = ManualClock::new(UnixMillis(1000));
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut a = c.sleep(Duration::from_millis(50));
        let mut b = c.sleep(Duration::from_millis(10));
        assert!(a.as_mut().poll(&mut cx).is_pending());
        assert!(b.as_mut().poll(&mut cx).is_pending());
        assert_eq!(c.next_deadline(), Some(UnixMillis(1010)));
        c.advance(Duration::from_millis(9));
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        c.advance(Duration::from_millis(1));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(b.as_mut().poll(&mut cx).is_ready());
        assert!(a.as_mut().poll(&mut cx).is_pending());
        assert_eq!(c.now(), UnixMillis(1010));
        c.advance_to(UnixMillis(500));
        assert_eq!(c.now(), UnixMillis(1010), "time never goes back");
        drop(a);
        assert_eq!(c.sleepers(), 0, "a dropped sleeper leaves no timer");
    }

    #[test]
    fn block_on_jumps_to_deadlines_and_reports_a_hang() {
        let c = ManualClock::new(UnixMillis(0));
        let c2 = c.clone();
        let out = c.block_on(async move {
            c2.sleep(Duration::from_secs(5)).await;
            c2.sleep(Duration::from_millis(250)).await;
            c2.now()
        });
        assert_eq!(out, Some(UnixMillis(5250)));
        assert_eq!(c.block_on(std::future::pending::<()>()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let c = TokioClock::new(UnixMillis(5));
        assert_eq!(c.now(), UnixMillis(5));
        c.sleep(Duration::from_secs(3)).await;
        assert_eq!(c.now(), UnixMillis(3005));
    }
}
