//! Replicator conformance: cases `R1`..`R10` of [`wspare_core::replicator`].
//!
//! Implement [`ReplicatorFixture`] for your backend and call [`run`]. The
//! cases assume that the source's content changes only through
//! [`ReplicatorEnv::write_source`], so that the digest read right before a
//! sync is the content of the generation it makes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use wspare_core::{
    DiskSpec, ErrorKind, Generation, GenerationInfo, Replicator, Result, SourceView,
};

use super::report::Report;
use super::runner::{call, ensure, expect_err, fail, run_cases, set_step, skip, Stop, Verdict};
use super::Options;

/// One fresh environment for one case: a replicator with an empty target
/// and a source VM's disks with known content. Dropping it cleans up.
#[async_trait]
pub trait ReplicatorEnv: Send + Sync {
    /// The backend under test.
    fn replicator(&self) -> Arc<dyn Replicator>;

    /// A view of the current source's disks as of now (a stopped VM's files,
    /// or a freeze). After `reverse` the source is the other side.
    async fn source_view(&self) -> Result<SourceView>;

    /// Changes the current source's content deterministically from `seed`,
    /// as a guest would (rewrites some blocks of every disk).
    async fn write_source(&self, seed: u64) -> Result<()>;

    /// Digest of the current source's content, all disks in order.
    async fn source_digest(&self) -> Result<String>;

    /// Digest of the content of `disks` (as returned by `promote` or
    /// `test_copy`), all disks in order. Fails if they no longer exist.
    async fn digest(&self, disks: &[DiskSpec]) -> Result<String>;

    /// Alters `disks` behind the replicator's back (R7's tampering, R9's
    /// writes to a test copy). R7 passes the disks `promote` returned: the
    /// fixture alters the stored generation they belong to.
    async fn tamper(&self, disks: &[DiskSpec]) -> Result<()>;

    /// Makes the next sync fail midway (a killed transfer, a full disk);
    /// `false` if the fixture cannot (R3 then relies on dropping the future).
    async fn break_next_sync(&self) -> Result<bool>;
}

/// Builds a fresh [`ReplicatorEnv`] per case.
#[async_trait]
pub trait ReplicatorFixture: Send + Sync {
    /// Title for the report.
    fn title(&self) -> String;
    /// A fresh environment.
    async fn build(&self) -> Result<Box<dyn ReplicatorEnv>>;
}

/// The cases, in the order they run, named as in the trait docs.
pub const CASES: &[&str] = &[
    "R1 empty",
    "R2 monotonic",
    "R3 complete or nothing",
    "R4 point in time",
    "R5 unknown generation",
    "R6 reverse",
    "R7 verify",
    "R8 stop",
    "R9 test copies",
    "R10 source view",
];

/// After how long R3 drops a sync in progress: the first that catches the
/// sync midway interrupts it; a sync that finishes first counts as a
/// normal cycle.
const INTERRUPT_AFTER: [Duration; 4] = [
    Duration::from_millis(1),
    Duration::from_millis(10),
    Duration::from_millis(100),
    Duration::from_millis(1000),
];

/// The label R9 uses for its test copy.
const TEST_COPY_LABEL: &str = "wspare-ct-r9";

/// Runs every replicator case against `fixture` with default [`Options`].
pub async fn run(fixture: &dyn ReplicatorFixture) -> Report {
    run_with(fixture, &Options::default()).await
}

/// Runs the selected replicator cases against `fixture`.
pub async fn run_with(fixture: &dyn ReplicatorFixture, opts: &Options) -> Report {
    let title = format!("replicator: {}", fixture.title());
    run_cases(title, CASES, opts, |i| run_case(fixture, i)).await
}

async fn run_case(fixture: &dyn ReplicatorFixture, i: usize) -> Verdict {
    let env = call("fixture build()", fixture.build()).await?;
    let env = &*env;
    let r = env.replicator();
    let r = &*r;
    match i {
        0 => r1_empty(r).await,
        1 => r2_monotonic(env, r).await,
        2 => r3_complete_or_nothing(env, r).await,
        3 => r4_point_in_time(env, r).await,
        4 => r5_unknown_generation(env, r).await,
        5 => r6_reverse(env, r).await,
        6 => r7_verify(env, r).await,
        7 => r8_stop(env, r).await,
        8 => r9_test_copies(env, r).await,
        9 => r10_source_view(env, r).await,
        _ => unreachable!("no replicator case {i}"),
    }
}

/// A generation and the source digest it must hold.
#[derive(Clone, Debug)]
struct Point {
    info: GenerationInfo,
    digest: String,
}

impl Point {
    fn g(&self) -> Generation {
        self.info.generation
    }
}

async fn view(env: &dyn ReplicatorEnv) -> Result<SourceView, Stop> {
    call("fixture source_view()", env.source_view()).await
}

async fn source_digest(env: &dyn ReplicatorEnv) -> Result<String, Stop> {
    call("fixture source_digest()", env.source_digest()).await
}

async fn write(env: &dyn ReplicatorEnv, seed: u64) -> Verdict {
    call(
        format!("fixture write_source({seed})"),
        env.write_source(seed),
    )
    .await
}

async fn digest(env: &dyn ReplicatorEnv, disks: &[DiskSpec], what: &str) -> Result<String, Stop> {
    call(format!("fixture digest() of {what}"), env.digest(disks)).await
}

/// One successful cycle (`initial_sync` if `initial`), with the source
/// digest it must hold; checks R2's "larger than every earlier one".
async fn cycle(
    env: &dyn ReplicatorEnv,
    r: &dyn Replicator,
    initial: bool,
    highest: &mut Option<Generation>,
) -> Result<Point, Stop> {
    let v = view(env).await?;
    let digest = source_digest(env).await?;
    let (what, info) = if initial {
        (
            "initial_sync()",
            call("initial_sync()", r.initial_sync(&v)).await?,
        )
    } else {
        ("sync()", call("sync()", r.sync(&v)).await?)
    };
    larger(highest, what, &info)?;
    Ok(Point { info, digest })
}

/// R2: the generation `what` returned is larger than every earlier one
/// (`highest`), and becomes the highest.
fn larger(highest: &mut Option<Generation>, what: &str, info: &GenerationInfo) -> Verdict {
    if let Some(h) = *highest {
        ensure!(
            info.generation > h,
            "{what} returned generation {}, not larger than the earlier {h}",
            info.generation
        );
    }
    *highest = Some(info.generation);
    Ok(())
}

/// Fails unless `status().newest` is `want`; `after` says what happened.
async fn expect_newest(r: &dyn Replicator, want: Option<Generation>, after: &str) -> Verdict {
    let st = call("status()", r.status()).await?;
    let got = st.newest.map(|g| g.generation);
    ensure!(
        got == want,
        "after {after}, status().newest is {}, expected {}",
        show(got),
        show(want)
    );
    Ok(())
}

fn show(g: Option<Generation>) -> String {
    g.map_or_else(|| "None".to_string(), |g| g.to_string())
}

/// Promotes `p` and checks it holds `p`'s content; `after` says what happened before.
async fn expect_intact(
    env: &dyn ReplicatorEnv,
    r: &dyn Replicator,
    p: &Point,
    after: &str,
) -> Result<Vec<DiskSpec>, Stop> {
    let g = p.g();
    let promoted = call(format!("promote({g}) {after}"), r.promote(g)).await?;
    ensure!(
        promoted.generation.generation == g,
        "promote({g}) {after} returned generation {}",
        promoted.generation.generation
    );
    let d = digest(env, &promoted.disks, &format!("the disks of {g}")).await?;
    ensure!(
        d == p.digest,
        "{after}, generation {g} holds content with digest {d}, expected {} (the source's content at {g})",
        p.digest
    );
    Ok(promoted.disks)
}

fn view_targets(v: &SourceView) -> Option<Vec<String>> {
    v.disks()
        .map(|(disks, _)| disks.into_iter().map(|d| d.target).collect())
}

async fn r1_empty(r: &dyn Replicator) -> Verdict {
    let st = call("status()", r.status()).await?;
    ensure!(
        st.newest.is_none(),
        "before the first sync, status().newest is {:?}, expected None",
        st.newest
    );
    ensure!(
        st.generations.is_empty(),
        "before the first sync, status().generations is {:?}, expected none",
        st.generations
    );
    for g in [Generation(0), Generation(1)] {
        expect_err(
            format!("promote({g})"),
            "before the first sync",
            &[ErrorKind::NotFound],
            r.promote(g),
        )
        .await?;
    }
    Ok(())
}

async fn r2_monotonic(env: &dyn ReplicatorEnv, r: &dyn Replicator) -> Verdict {
    let caps = r.capabilities();
    let mut highest = None;
    let p = cycle(env, r, true, &mut highest).await?;
    expect_newest(
        r,
        Some(p.g()),
        &format!("initial_sync() returned {}", p.g()),
    )
    .await?;
    for seed in 1..=3 {
        write(env, seed).await?;
        let p = cycle(env, r, false, &mut highest).await?;
        expect_newest(r, Some(p.g()), &format!("sync() returned {}", p.g())).await?;
        let st = call("status()", r.status()).await?;
        let gens: Vec<Generation> = st.generations.iter().map(|g| g.generation).collect();
        ensure!(
            gens.windows(2).all(|w| w[0] < w[1]),
            "status().generations is not oldest first without repeats: {gens:?}"
        );
        ensure!(
            gens.last() == Some(&p.g()),
            "after sync() returned {}, status().generations ends with {}: {gens:?}",
            p.g(),
            show(gens.last().copied())
        );
        ensure!(
            caps.recovery_points == 0 || gens.len() <= caps.recovery_points as usize,
            "status().generations holds {} generations, more than recovery_points = {}",
            gens.len(),
            caps.recovery_points
        );
    }
    Ok(())
}

enum Raced<T> {
    Done(T),
    Dropped,
}

/// Polls `fut` until it finishes or `after` passes; then drops it.
async fn race<T>(fut: impl std::future::Future<Output = T>, after: Duration) -> Raced<T> {
    tokio::select! {
        biased;
        r = fut => Raced::Done(r),
        _ = tokio::time::sleep(after) => Raced::Dropped,
    }
}

async fn r3_complete_or_nothing(env: &dyn ReplicatorEnv, r: &dyn Replicator) -> Verdict {
    let mut highest = None;
    let mut last = cycle(env, r, true, &mut highest).await?;
    let mut interrupted = 0;
    for (i, after) in INTERRUPT_AFTER.into_iter().enumerate() {
        write(env, 100 + i as u64).await?;
        let v = view(env).await?;
        let d = source_digest(env).await?;
        set_step(&format!("sync() to be dropped after {after:?}"));
        match race(r.sync(&v), after).await {
            Raced::Done(Ok(info)) => {
                // Finished before the drop: a normal cycle (R2 holds).
                larger(&mut highest, "sync()", &info)?;
                last = Point { info, digest: d };
                expect_newest(r, Some(last.g()), &format!("sync() returned {}", last.g())).await?;
            }
            Raced::Done(Err(e)) => {
                let what = format!("a sync() that failed on its own ({e})");
                expect_newest(r, Some(last.g()), &what).await?;
                expect_intact(env, r, &last, &format!("after {what}")).await?;
            }
            Raced::Dropped => {
                interrupted += 1;
                let what = format!("a sync() was interrupted (its future dropped after {after:?})");
                expect_newest(r, Some(last.g()), &what).await?;
                expect_intact(env, r, &last, &format!("after {what}")).await?;
                break;
            }
        }
    }
    let broken = call("fixture break_next_sync()", env.break_next_sync()).await?;
    if broken {
        write(env, 200).await?;
        let v = view(env).await?;
        set_step("sync() that the fixture broke midway (break_next_sync)");
        match r.sync(&v).await {
            Ok(info) => fail!(
                "sync() returned {} although the fixture broke it midway (break_next_sync)",
                info.generation
            ),
            Err(e) => {
                let what = format!("a sync() failed midway ({e})");
                expect_newest(r, Some(last.g()), &what).await?;
                expect_intact(env, r, &last, &format!("after {what}")).await?;
            }
        }
    }
    if interrupted == 0 && !broken {
        skip!(
            "no sync could be interrupted: every sync finished within {:?} and the fixture cannot break one \
             (break_next_sync returned false)",
            INTERRUPT_AFTER[INTERRUPT_AFTER.len() - 1]
        );
    }
    write(env, 300).await?;
    let next = cycle(env, r, false, &mut highest)
        .await
        .map_err(|s| s.context("the sync after an interrupted or failed one"))?;
    expect_newest(
        r,
        Some(next.g()),
        &format!("the next sync() returned {}", next.g()),
    )
    .await?;
    expect_intact(env, r, &next, "after the next sync").await?;
    Ok(())
}

async fn r4_point_in_time(env: &dyn ReplicatorEnv, r: &dyn Replicator) -> Verdict {
    let caps = r.capabilities();
    let mut highest = None;
    let targets = view_targets(&view(env).await?);
    let p1 = cycle(env, r, true, &mut highest).await?;
    let disks = expect_intact(env, r, &p1, "after initial_sync()").await?;
    if let Some(t) = targets {
        let got: Vec<&String> = disks.iter().map(|d| &d.target).collect();
        ensure!(
            got.len() == t.len() && got.iter().zip(&t).all(|(a, b)| *a == b),
            "promote({}) returned disks {got:?}, expected every source disk in order: {t:?}",
            p1.g()
        );
    }
    write(env, 4).await?;
    let p2 = cycle(env, r, false, &mut highest).await?;
    expect_intact(env, r, &p2, "after sync()").await?;
    if caps.recovery_points >= 2 {
        let st = call("status()", r.status()).await?;
        ensure!(
            st.generations.iter().any(|g| g.generation == p1.g()),
            "with recovery_points = {}, status().generations no longer holds {} after one more sync: {:?}",
            caps.recovery_points,
            p1.g(),
            st.generations
        );
        expect_intact(env, r, &p1, &format!("after the newer {} was made", p2.g())).await?;
    }
    Ok(())
}

async fn r5_unknown_generation(env: &dyn ReplicatorEnv, r: &dyn Replicator) -> Verdict {
    let mut highest = None;
    let p = cycle(env, r, true, &mut highest).await?;
    let bogus = Generation(p.g().0 + 1000);
    let why = "of a generation the replicator does not hold";
    expect_err(
        format!("promote({bogus})"),
        why,
        &[ErrorKind::NotFound],
        r.promote(bogus),
    )
    .await?;
    let v = view(env).await?;
    let kinds = if r.capabilities().verify {
        &[ErrorKind::NotFound][..]
    } else {
        &[ErrorKind::NotFound, ErrorKind::Unsupported][..]
    };
    expect_err(format!("verify({bogus})"), why, kinds, r.verify(bogus, &v)).await?;
    Ok(())
}

async fn r6_reverse(env: &dyn ReplicatorEnv, r: &dyn Replicator) -> Verdict {
    if !r.capabilities().reversible {
        skip!("backend lacks capability reversible");
    }
    let mut highest = None;
    let p1 = cycle(env, r, true, &mut highest).await?;
    let before = call("status()", r.status()).await?;
    call("reverse()", r.reverse()).await?;
    let after = call("status() after reverse()", r.status()).await?;
    ensure!(
        after.source == before.target && after.target == before.source,
        "after reverse(), status() shows {} -> {}, expected {} -> {}",
        after.source,
        after.target,
        before.target,
        before.source
    );
    write(env, 6).await?;
    let p2 = cycle(env, r, false, &mut highest)
        .await
        .map_err(|s| s.context(&format!("after reverse() from {}", p1.g())))?;
    expect_newest(
        r,
        Some(p2.g()),
        &format!("the reversed sync() returned {}", p2.g()),
    )
    .await?;
    expect_intact(env, r, &p2, "after the reversed sync").await?;
    Ok(())
}

async fn r7_verify(env: &dyn ReplicatorEnv, r: &dyn Replicator) -> Verdict {
    if !r.capabilities().verify {
        skip!("backend lacks capability verify");
    }
    let mut highest = None;
    let p = cycle(env, r, true, &mut highest).await?;
    let v = view(env).await?;
    let g = p.g();
    call(
        format!("verify({g}) of an intact generation"),
        r.verify(g, &v),
    )
    .await?;
    let promoted = call(format!("promote({g})"), r.promote(g)).await?;
    call("fixture tamper()", env.tamper(&promoted.disks)).await?;
    expect_err(
        format!("verify({g})"),
        "after its copy was altered",
        &[ErrorKind::Conflict],
        r.verify(g, &v),
    )
    .await?;
    Ok(())
}

async fn r8_stop(env: &dyn ReplicatorEnv, r: &dyn Replicator) -> Verdict {
    let mut highest = None;
    let p1 = cycle(env, r, true, &mut highest).await?;
    write(env, 8).await?;
    let p2 = cycle(env, r, false, &mut highest).await?;
    let st = call("status()", r.status()).await?;
    call("stop()", r.stop()).await?;
    for p in [&p1, &p2] {
        if st.generations.iter().any(|g| g.generation == p.g()) {
            expect_intact(env, r, p, "after stop()").await?;
        } else if p.g() == p2.g() {
            fail!(
                "status().generations before stop() lacks the newest generation {}: {:?}",
                p.g(),
                st.generations
            );
        }
    }
    Ok(())
}

async fn r9_test_copies(env: &dyn ReplicatorEnv, r: &dyn Replicator) -> Verdict {
    if !r.capabilities().test_copies {
        skip!("backend lacks capability test_copies");
    }
    let mut highest = None;
    let p = cycle(env, r, true, &mut highest).await?;
    let g = p.g();
    let label = TEST_COPY_LABEL;
    let copy = call(format!("test_copy({g}, {label})"), r.test_copy(g, label)).await?;
    let d = digest(env, &copy, "the test copy").await?;
    ensure!(
        d == p.digest,
        "test_copy({g}) holds content with digest {d}, expected {} (the content of {g})",
        p.digest
    );
    let replica = expect_intact(env, r, &p, "before writing the test copy").await?;
    if let Some(shared) = copy
        .iter()
        .find(|c| replica.iter().any(|d| d.path == c.path))
    {
        fail!(
            "test_copy({g}) returned {}, a disk of the replica itself, not a separate copy",
            shared.path.display()
        );
    }
    call("fixture tamper() of the test copy", env.tamper(&copy)).await?;
    expect_intact(env, r, &p, "after the test copy was written").await?;
    write(env, 9).await?;
    let p2 = cycle(env, r, false, &mut highest).await?;
    expect_intact(env, r, &p2, "after a sync while a written test copy exists").await?;
    call(
        format!("discard_test_copy({label})"),
        r.discard_test_copy(label),
    )
    .await?;
    set_step("fixture digest() of the discarded test copy");
    if let Ok(d) = env.digest(&copy).await {
        fail!(
            "after discard_test_copy({label}) returned Ok, its disks still exist (digest {d}): {:?}",
            copy.iter().map(|c| c.path.display().to_string()).collect::<Vec<_>>()
        );
    }
    call(
        format!("discard_test_copy({label}) of a copy already discarded"),
        r.discard_test_copy(label),
    )
    .await?;
    Ok(())
}

async fn r10_source_view(env: &dyn ReplicatorEnv, r: &dyn Replicator) -> Verdict {
    if !r.capabilities().needs_source_view {
        skip!("backend keeps consistency itself (capability needs_source_view is false)");
    }
    let mut highest = None;
    let p = cycle(env, r, true, &mut highest).await?;
    write(env, 10).await?;
    expect_err(
        "sync(Continuous)",
        "by a replicator that needs a source view",
        &[ErrorKind::InvalidInput],
        r.sync(&SourceView::Continuous),
    )
    .await?;
    expect_newest(r, Some(p.g()), "the refused sync(Continuous)").await
}
