//! Fencer conformance: cases `F1`..`F8` of [`wspare_core::fencer`].
//!
//! Implement [`FencerFixture`] for your fencer and call [`run`]. The
//! ground truth ([`FencerEnv::true_power`]) is what makes the cases real: a
//! receipt is checked against the node's actual power, not against what
//! the fencer says.

use std::sync::Arc;

use async_trait::async_trait;
use wspare_core::{Error, ErrorKind, Evidence, Fencer, NodeId, PowerState, Result};

use super::report::Report;
use super::runner::{
    call, ensure, expect_err, fail, now, run_cases, set_step, skip, Stop, Verdict,
};
use super::Options;

/// Conditions a fixture may be asked to build, for the fault cases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FencerVariant {
    /// A working device and a node that is on.
    Normal,
    /// The device accepts power-off but keeps reporting on (F3).
    StuckOn,
    /// The device does not answer (F7).
    DeadDevice,
    /// The credentials are wrong (F8).
    WrongCredentials,
}

/// One fresh environment for one case. Dropping it cleans up (powers the
/// node back on or removes it).
#[async_trait]
pub trait FencerEnv: Send + Sync {
    /// The fencer under test.
    fn fencer(&self) -> Arc<dyn Fencer>;

    /// A node the fencer has a device for; it is on when the env is built.
    fn node(&self) -> NodeId;

    /// A node the fencer has no device for (F6).
    fn unknown_node(&self) -> NodeId;

    /// The node's power as the ground truth sees it (the libvirt domain
    /// behind a virtual BMC, the simulator's host), not through the fencer.
    async fn true_power(&self) -> Result<PowerState>;

    /// The secret the fencer was configured with, so the suite can check it
    /// never shows up in errors (F8).
    fn secret(&self) -> Option<String>;
}

/// Builds a fresh [`FencerEnv`] per case.
#[async_trait]
pub trait FencerFixture: Send + Sync {
    /// Title for the report.
    fn title(&self) -> String;
    /// A fresh environment of `variant`; `Ok(None)` if the fixture cannot
    /// build it (the case is skipped with that reason).
    async fn build(&self, variant: FencerVariant) -> Result<Option<Box<dyn FencerEnv>>>;
}

/// The cases, in the order they run, named as in the trait docs.
pub const CASES: &[&str] = &[
    "F1 receipt means off",
    "F2 idempotent",
    "F3 no false receipt",
    "F4 status reads only",
    "F5 unfence",
    "F6 unknown node",
    "F7 dead device",
    "F8 credentials",
];

/// How many times F4 reads the power status.
const STATUS_READS: usize = 3;

/// Runs every fencer case against `fixture` with default [`Options`].
pub async fn run(fixture: &dyn FencerFixture) -> Report {
    run_with(fixture, &Options::default()).await
}

/// Runs the selected fencer cases against `fixture`.
pub async fn run_with(fixture: &dyn FencerFixture, opts: &Options) -> Report {
    let title = format!("fencer: {}", fixture.title());
    run_cases(title, CASES, opts, |i| run_case(fixture, i)).await
}

async fn run_case(fixture: &dyn FencerFixture, i: usize) -> Verdict {
    match i {
        0 => f1_receipt_means_off(fixture).await,
        1 => f2_idempotent(fixture).await,
        2 => f3_no_false_receipt(fixture).await,
        3 => f4_status_reads_only(fixture).await,
        4 => f5_unfence(fixture).await,
        5 => f6_unknown_node(fixture).await,
        6 => f7_dead_device(fixture).await,
        7 => f8_credentials(fixture).await,
        _ => unreachable!("no fencer case {i}"),
    }
}

/// Builds an environment of `variant`; a variant the fixture cannot build
/// skips the case (but `Normal` is required).
async fn build(
    fixture: &dyn FencerFixture,
    variant: FencerVariant,
    skip_why: &str,
) -> Result<Box<dyn FencerEnv>, Stop> {
    let env = call(
        format!("fixture build({variant:?})"),
        fixture.build(variant),
    )
    .await?;
    match env {
        Some(env) => Ok(env),
        None if variant == FencerVariant::Normal => {
            fail!("the fixture cannot build the Normal variant (build returned None)")
        }
        None => skip!("the fixture cannot build {skip_why} (variant {variant:?})"),
    }
}

async fn normal(fixture: &dyn FencerFixture) -> Result<Box<dyn FencerEnv>, Stop> {
    let env = build(fixture, FencerVariant::Normal, "").await?;
    let p = truth(&*env).await?;
    ensure!(
        p == PowerState::On,
        "fixture precondition: node {} reads {p:?} by the ground truth before the case, expected On",
        env.node()
    );
    Ok(env)
}

async fn truth(env: &dyn FencerEnv) -> Result<PowerState, Stop> {
    call("fixture true_power()", env.true_power()).await
}

async fn status(f: &dyn Fencer, node: &NodeId) -> Result<PowerState, Stop> {
    call(format!("power_status({node})"), f.power_status(node)).await
}

/// Fences and checks the receipt against the ground truth at the moment it
/// arrives (F1). `what` says which fence this is.
async fn fence_checked(env: &dyn FencerEnv, f: &dyn Fencer, what: &str) -> Verdict {
    let node = env.node();
    let call_text = if what.is_empty() {
        format!("fence({node})")
    } else {
        format!("{what} fence({node})")
    };
    let receipt = call(call_text.clone(), f.fence(&node)).await?;
    let p = truth(env).await?;
    ensure!(
        p == PowerState::Off,
        "{call_text} returned a receipt ({receipt}) while the ground truth reads {p:?}, \
         expected Off: a receipt must come only after the power reads back off"
    );
    ensure!(
        receipt.target().node() == &node,
        "{call_text} returned a receipt for {}, expected one naming {node}",
        receipt.target()
    );
    ensure!(
        !matches!(receipt.evidence(), Evidence::OperatorConfirmed),
        "{call_text} returned an operator's confirmation ({receipt}), not evidence it read"
    );
    Ok(())
}

async fn f1_receipt_means_off(fixture: &dyn FencerFixture) -> Verdict {
    let env = normal(fixture).await?;
    let env = &*env;
    let f = env.fencer();
    fence_checked(env, &*f, "").await?;
    let node = env.node();
    let p = status(&*f, &node).await?;
    ensure!(
        p == PowerState::Off,
        "after fence({node}) returned a receipt, power_status({node}) answered {p:?}, expected Off"
    );
    Ok(())
}

async fn f2_idempotent(fixture: &dyn FencerFixture) -> Verdict {
    let env = normal(fixture).await?;
    let env = &*env;
    let f = env.fencer();
    fence_checked(env, &*f, "the first").await?;
    fence_checked(env, &*f, "a second").await
}

async fn f3_no_false_receipt(fixture: &dyn FencerFixture) -> Verdict {
    let env = build(
        fixture,
        FencerVariant::StuckOn,
        "a device that keeps reporting on after accepting power-off",
    )
    .await?;
    let f = env.fencer();
    let node = env.node();
    set_step(&format!("fence({node}) on a device stuck on"));
    match f.fence(&node).await {
        Ok(receipt) => {
            let p = truth(&*env).await?;
            fail!(
                "fence({node}) returned a receipt ({receipt}) although the device kept reporting on \
                 (ground truth: {p:?}); expected a Timeout error and no receipt"
            )
        }
        Err(e) if e.kind() == ErrorKind::Timeout => Ok(()),
        Err(e) => fail!(
            "fence({node}) on a device that keeps reporting on failed with kind {}, expected Timeout \
             (error: {e})",
            e.kind()
        ),
    }
}

async fn f4_status_reads_only(fixture: &dyn FencerFixture) -> Verdict {
    let env = normal(fixture).await?;
    let env = &*env;
    let f = env.fencer();
    let node = env.node();
    for want in [PowerState::On, PowerState::Off] {
        if want == PowerState::Off {
            fence_checked(env, &*f, "").await?;
        }
        for i in 1..=STATUS_READS {
            let p = status(&*f, &node).await?;
            ensure!(
                p == want,
                "power_status({node}) read #{i} answered {p:?} while the node is {want:?} by the ground truth"
            );
            let t = truth(env).await?;
            ensure!(
                t == want,
                "power_status({node}) read #{i} changed the node's power: the ground truth reads {t:?}, \
                 was {want:?}"
            );
        }
    }
    Ok(())
}

async fn f5_unfence(fixture: &dyn FencerFixture) -> Verdict {
    let env = normal(fixture).await?;
    let env = &*env;
    let f = env.fencer();
    if !f.capabilities().unfence {
        skip!("backend lacks capability unfence");
    }
    let node = env.node();
    fence_checked(env, &*f, "").await?;
    call(format!("unfence({node})"), f.unfence(&node)).await?;
    let p = status(&*f, &node).await?;
    ensure!(
        p == PowerState::On,
        "after unfence({node}) returned Ok, power_status({node}) answered {p:?}, expected On"
    );
    let t = truth(env).await?;
    ensure!(
        t == PowerState::On,
        "after unfence({node}) returned Ok, the ground truth reads {t:?}, expected On"
    );
    Ok(())
}

async fn f6_unknown_node(fixture: &dyn FencerFixture) -> Verdict {
    let env = normal(fixture).await?;
    let env = &*env;
    let f = env.fencer();
    let unknown = env.unknown_node();
    let why = "of a node the fencer has no device for";
    let nf = &[ErrorKind::NotFound][..];
    expect_err(format!("fence({unknown})"), why, nf, f.fence(&unknown)).await?;
    expect_err(
        format!("power_status({unknown})"),
        why,
        nf,
        f.power_status(&unknown),
    )
    .await?;
    let kinds = if f.capabilities().unfence {
        nf
    } else {
        &[ErrorKind::NotFound, ErrorKind::Unsupported][..]
    };
    expect_err(
        format!("unfence({unknown})"),
        why,
        kinds,
        f.unfence(&unknown),
    )
    .await?;
    let t = truth(env).await?;
    ensure!(
        t == PowerState::On,
        "fencing the unknown node {unknown} changed node {}: the ground truth reads {t:?}, expected On",
        env.node()
    );
    Ok(())
}

async fn f7_dead_device(fixture: &dyn FencerFixture) -> Verdict {
    let env = build(
        fixture,
        FencerVariant::DeadDevice,
        "a device that does not answer",
    )
    .await?;
    let f = env.fencer();
    let node = env.node();
    let kinds = &[ErrorKind::Unreachable, ErrorKind::Timeout][..];
    let why = "on a device that does not answer";
    let t0 = now();
    expect_err(format!("fence({node})"), why, kinds, f.fence(&node)).await?;
    let took = now().saturating_duration_since(t0);
    tracing::debug!(?took, "F7: fence on a dead device gave up");
    expect_err(
        format!("power_status({node})"),
        why,
        kinds,
        f.power_status(&node),
    )
    .await?;
    Ok(())
}

/// Checks that the secret shows in no rendering of `e`.
fn secret_hidden(secret: &str, what: &str, e: &Error) -> Verdict {
    let hide = |s: &str| s.replace(secret, "<SECRET>");
    for (form, text) in [
        ("Display", e.to_string()),
        ("Debug", format!("{e:?}")),
        ("failure message", e.to_failure().message),
    ] {
        ensure!(
            !text.contains(secret),
            "{what}'s error shows the configured secret in its {form}: {}",
            hide(&text)
        );
    }
    Ok(())
}

async fn f8_credentials(fixture: &dyn FencerFixture) -> Verdict {
    let env = build(
        fixture,
        FencerVariant::WrongCredentials,
        "a device with wrong credentials",
    )
    .await?;
    let f = env.fencer();
    let node = env.node();
    let secret = env.secret().filter(|s| s.len() >= 3);
    let why = "with refused credentials";
    let pd = &[ErrorKind::PermissionDenied][..];
    let fence_err = expect_err(format!("fence({node})"), why, pd, f.fence(&node)).await?;
    let status_err = expect_err(
        format!("power_status({node})"),
        why,
        pd,
        f.power_status(&node),
    )
    .await?;
    for (what, e) in [("fence()", &fence_err), ("power_status()", &status_err)] {
        ensure!(
            !e.is_retryable(),
            "{what} with refused credentials says a retry can help ({e}); the same credentials cannot succeed"
        );
        if let Some(s) = &secret {
            secret_hidden(s, what, e)?;
        }
    }
    if let Some(s) = &secret {
        let d = f.describe();
        ensure!(
            !d.contains(s.as_str()),
            "describe() shows the configured secret: {}",
            d.replace(s.as_str(), "<SECRET>")
        );
    }
    Ok(())
}
