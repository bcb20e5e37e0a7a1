//! Hypervisor conformance: cases `H1`..`H11` of [`wspare_core::hypervisor`].
//!
//! Implement [`HypervisorFixture`] for your backend and call [`run`]. The
//! cases use VMs named `wspare-ct-*`, made from the fixture's
//! [`HypervisorEnv::vm_spec`]; the environment's `Drop` removes them.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use wspare_core::{DiskSpec, ErrorKind, Hypervisor, Result, VmName, VmSpec, VmState};

use super::report::Report;
use super::runner::{
    call, ensure, expect_err, fail, now, pause, run_cases, set_step, skip, Stop, Verdict,
};
use super::Options;

/// What the fixture's test guest does, so cases that need a behaviour are
/// skipped (with the reason) when the guest lacks it.
#[derive(Clone, Copy, Debug)]
pub struct GuestTraits {
    /// The guest keeps writing its first disk while it runs (H8 checks that
    /// the frozen image stays still while the live disk changes).
    pub writes_disk: bool,
    /// The guest powers off on an ACPI shutdown request (H6's success path).
    pub honours_shutdown: bool,
    /// Time for the guest to boot far enough to react (ACPI, disk writes).
    pub boot_time: Duration,
    /// Slack allowed past a deadline before the case calls it broken.
    pub deadline_slack: Duration,
}

/// One fresh environment for one case. Dropping it cleans up (undefines the
/// VMs the case made, removes images): it is the cleanup guard.
#[async_trait]
pub trait HypervisorEnv: Send + Sync {
    /// The backend under test.
    fn hypervisor(&self) -> Arc<dyn Hypervisor>;

    /// A valid spec for a VM named `name`, with fresh disk images that this
    /// backend can define and boot.
    async fn vm_spec(&self, name: &VmName) -> Result<VmSpec>;

    /// A spec whose guest ignores ACPI shutdown, for H6's deadline path;
    /// `None` if the fixture cannot make one (the case is skipped).
    async fn stubborn_vm_spec(&self, name: &VmName) -> Result<Option<VmSpec>>;

    /// A digest of an image file's content on the host (H8).
    async fn image_digest(&self, path: &std::path::Path) -> Result<String>;

    /// What the test guest does.
    fn guest(&self) -> GuestTraits;
}

/// Builds a fresh [`HypervisorEnv`] per case.
#[async_trait]
pub trait HypervisorFixture: Send + Sync {
    /// Title for the report ("libvirt test:///default").
    fn title(&self) -> String;
    /// A fresh environment.
    async fn build(&self) -> Result<Box<dyn HypervisorEnv>>;
}

/// The cases, in the order they run, named as in the trait docs.
pub const CASES: &[&str] = &[
    "H1 missing",
    "H2 define/read-back",
    "H3 redefine",
    "H4 idempotent start",
    "H5 idempotent destroy",
    "H6 shutdown deadline",
    "H7 undefine",
    "H8 freeze",
    "H9 hot-plug",
    "H10 list",
    "H11 concurrency",
];

/// Deadline for `shutdown` of a VM that is already stopped.
const STOPPED_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);
/// Deadline for `shutdown` of a guest that honours ACPI.
const GRACEFUL_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(60);
/// Deadline for `shutdown` of a guest that ignores ACPI (H6 expects Timeout).
const STUBBORN_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(2);
/// How long H8 watches a frozen image while the guest writes.
const FREEZE_WATCH: Duration = Duration::from_secs(2);
/// How many times H8 reads the frozen image during [`FREEZE_WATCH`].
const FREEZE_SAMPLES: u32 = 4;

/// Runs every hypervisor case against `fixture` with default [`Options`].
pub async fn run(fixture: &dyn HypervisorFixture) -> Report {
    run_with(fixture, &Options::default()).await
}

/// Runs the selected hypervisor cases against `fixture`.
pub async fn run_with(fixture: &dyn HypervisorFixture, opts: &Options) -> Report {
    let title = format!("hypervisor: {}", fixture.title());
    run_cases(title, CASES, opts, |i| run_case(fixture, i)).await
}

async fn run_case(fixture: &dyn HypervisorFixture, i: usize) -> Verdict {
    let env = call("fixture build()", fixture.build()).await?;
    let env = &*env;
    let hv = env.hypervisor();
    let hv = &*hv;
    match i {
        0 => h1_missing(env, hv).await,
        1 => h2_define_read_back(env, hv).await,
        2 => h3_redefine(env, hv).await,
        3 => h4_idempotent_start(env, hv).await,
        4 => h5_idempotent_destroy(env, hv).await,
        5 => h6_shutdown_deadline(env, hv).await,
        6 => h7_undefine(env, hv).await,
        7 => h8_freeze(env, hv).await,
        8 => h9_hot_plug(env, hv).await,
        9 => h10_list(env, hv).await,
        10 => h11_concurrency(env, hv).await,
        _ => unreachable!("no hypervisor case {i}"),
    }
}

fn vm_name(s: &str) -> VmName {
    VmName::new(s).expect("suite VM names are valid")
}

async fn fresh_spec(env: &dyn HypervisorEnv, vm: &VmName) -> Result<VmSpec, Stop> {
    let spec = call(format!("fixture vm_spec({vm})"), env.vm_spec(vm)).await?;
    if &spec.name != vm {
        fail!("fixture vm_spec({vm}) returned a spec named {}", spec.name);
    }
    Ok(spec)
}

async fn state_of(hv: &dyn Hypervisor, vm: &VmName) -> Result<VmState, Stop> {
    Ok(call(format!("status({vm})"), hv.status(vm)).await?.state)
}

/// Fails unless `status(vm)` is `want`; `after` says what just happened.
async fn expect_state(hv: &dyn Hypervisor, vm: &VmName, want: VmState, after: &str) -> Verdict {
    let got = state_of(hv, vm).await?;
    ensure!(
        got == want,
        "after {after}, status({vm}) answered {got:?}, expected {want:?}"
    );
    Ok(())
}

async fn define(hv: &dyn Hypervisor, spec: &VmSpec) -> Verdict {
    call(format!("define({})", spec.name), hv.define(spec)).await
}

async fn start(hv: &dyn Hypervisor, vm: &VmName) -> Verdict {
    call(format!("start({vm})"), hv.start(vm)).await
}

async fn destroy(hv: &dyn Hypervisor, vm: &VmName) -> Verdict {
    call(format!("destroy({vm})"), hv.destroy(vm)).await
}

async fn spec_of(hv: &dyn Hypervisor, vm: &VmName) -> Result<VmSpec, Stop> {
    call(format!("spec({vm})"), hv.spec(vm)).await
}

/// The fields in which two specs differ, with both values.
fn spec_diff(want: &VmSpec, got: &VmSpec) -> String {
    let mut d = Vec::new();
    macro_rules! field {
        ($f:ident) => {
            if want.$f != got.$f {
                d.push(format!(
                    "{}: expected {:?}, got {:?}",
                    stringify!($f),
                    want.$f,
                    got.$f
                ));
            }
        };
    }
    field!(name);
    field!(vcpus);
    field!(memory_mib);
    field!(firmware);
    field!(disks);
    field!(nics);
    field!(boot);
    d.join("; ")
}

async fn h1_missing(env: &dyn HypervisorEnv, hv: &dyn Hypervisor) -> Verdict {
    let caps = hv.capabilities();
    let vm = vm_name("wspare-ct-h1");
    let got = state_of(hv, &vm).await?;
    ensure!(
        got == VmState::Missing,
        "status({vm}) of a VM that is not defined answered {got:?}, expected Missing"
    );
    let why = "of a VM that is not defined";
    let nf = &[ErrorKind::NotFound][..];
    let nf_or_unsupported = &[ErrorKind::NotFound, ErrorKind::Unsupported][..];
    expect_err(format!("start({vm})"), why, nf, hv.start(&vm)).await?;
    expect_err(
        format!("shutdown({vm}, 1s)"),
        why,
        nf,
        hv.shutdown(&vm, Duration::from_secs(1)),
    )
    .await?;
    expect_err(format!("destroy({vm})"), why, nf, hv.destroy(&vm)).await?;
    expect_err(format!("undefine({vm})"), why, nf, hv.undefine(&vm)).await?;
    expect_err(format!("spec({vm})"), why, nf, hv.spec(&vm)).await?;
    let donor = fresh_spec(env, &vm_name("wspare-ct-h1-donor")).await?;
    let disk = donor.disks.first().cloned().unwrap_or_else(|| DiskSpec {
        target: "vdb".into(),
        path: "/nonexistent/wspare-ct-h1.img".into(),
        format: Default::default(),
        bus: Default::default(),
        read_only: false,
    });
    let kinds = if caps.attach_disk {
        nf
    } else {
        nf_or_unsupported
    };
    expect_err(
        format!("attach_disk({vm}, {})", disk.target),
        why,
        kinds,
        hv.attach_disk(&vm, &disk),
    )
    .await?;
    expect_err(
        format!("detach_disk({vm}, vdb)"),
        why,
        kinds,
        hv.detach_disk(&vm, "vdb"),
    )
    .await?;
    let kinds = if caps.freeze.is_some() {
        nf
    } else {
        nf_or_unsupported
    };
    expect_err(
        format!("freeze_disks({vm})"),
        why,
        kinds,
        hv.freeze_disks(&vm),
    )
    .await?;
    let got = state_of(hv, &vm).await?;
    ensure!(
        got == VmState::Missing,
        "after the calls on a VM that is not defined, status({vm}) answered {got:?}, expected Missing"
    );
    Ok(())
}

async fn h2_define_read_back(env: &dyn HypervisorEnv, hv: &dyn Hypervisor) -> Verdict {
    let vm = vm_name("wspare-ct-h2");
    let spec = fresh_spec(env, &vm).await?;
    define(hv, &spec).await?;
    let back = spec_of(hv, &vm).await?;
    ensure!(
        back == spec,
        "spec({vm}) after define differs from the spec given: {}",
        spec_diff(&spec, &back)
    );
    expect_state(
        hv,
        &vm,
        VmState::ShutOff,
        "define() returned Ok (defined, not started)",
    )
    .await
}

async fn h3_redefine(env: &dyn HypervisorEnv, hv: &dyn Hypervisor) -> Verdict {
    let vm = vm_name("wspare-ct-h3");
    let spec = fresh_spec(env, &vm).await?;
    define(hv, &spec).await?;
    let mut v2 = spec.clone();
    v2.vcpus += 1;
    v2.memory_mib += 64;
    call(
        format!("define({vm}) again with vcpus = {}", v2.vcpus),
        hv.define(&v2),
    )
    .await?;
    let back = spec_of(hv, &vm).await?;
    ensure!(
        back == v2,
        "after redefining {vm} with vcpus = {} and memory-mib = {}, spec({vm}) differs from the new spec: {}",
        v2.vcpus,
        v2.memory_mib,
        spec_diff(&v2, &back)
    );
    expect_state(hv, &vm, VmState::ShutOff, "redefining a stopped VM").await?;
    let mut bad = v2.clone();
    bad.vcpus = 0;
    expect_err(
        format!("define({vm})"),
        "of an invalid spec (vcpus = 0)",
        &[ErrorKind::InvalidInput],
        hv.define(&bad),
    )
    .await?;
    let back = spec_of(hv, &vm).await?;
    ensure!(
        back == v2,
        "a rejected define (vcpus = 0) changed the definition of {vm}: {}",
        spec_diff(&v2, &back)
    );
    let other = vm_name("wspare-ct-h3-invalid");
    let mut bad = v2.clone();
    bad.name = other.clone();
    bad.memory_mib = 1;
    expect_err(
        format!("define({other})"),
        "of an invalid spec (memory-mib = 1)",
        &[ErrorKind::InvalidInput],
        hv.define(&bad),
    )
    .await?;
    expect_state(
        hv,
        &other,
        VmState::Missing,
        "a rejected define of a new VM",
    )
    .await
}

async fn h4_idempotent_start(env: &dyn HypervisorEnv, hv: &dyn Hypervisor) -> Verdict {
    let vm = vm_name("wspare-ct-h4");
    let spec = fresh_spec(env, &vm).await?;
    define(hv, &spec).await?;
    start(hv, &vm).await?;
    expect_state(hv, &vm, VmState::Running, "start() returned Ok").await?;
    let before = spec_of(hv, &vm).await?;
    call(format!("start({vm}) of a running VM"), hv.start(&vm)).await?;
    expect_state(hv, &vm, VmState::Running, "a second start() returned Ok").await?;
    let after = spec_of(hv, &vm).await?;
    ensure!(
        after == before,
        "start() of a running VM changed its definition: {}",
        spec_diff(&before, &after)
    );
    Ok(())
}

async fn h5_idempotent_destroy(env: &dyn HypervisorEnv, hv: &dyn Hypervisor) -> Verdict {
    let vm = vm_name("wspare-ct-h5");
    let spec = fresh_spec(env, &vm).await?;
    define(hv, &spec).await?;
    call(
        format!("destroy({vm}) of a defined VM that never ran"),
        hv.destroy(&vm),
    )
    .await?;
    expect_state(
        hv,
        &vm,
        VmState::ShutOff,
        "destroy() of a VM that never ran returned Ok",
    )
    .await?;
    start(hv, &vm).await?;
    expect_state(hv, &vm, VmState::Running, "start() returned Ok").await?;
    destroy(hv, &vm).await?;
    expect_state(hv, &vm, VmState::ShutOff, "destroy() returned Ok").await?;
    call(format!("destroy({vm}) of a stopped VM"), hv.destroy(&vm)).await?;
    expect_state(hv, &vm, VmState::ShutOff, "a second destroy() returned Ok").await
}

async fn h6_shutdown_deadline(env: &dyn HypervisorEnv, hv: &dyn Hypervisor) -> Verdict {
    if !hv.capabilities().graceful_shutdown {
        skip!("backend lacks capability graceful_shutdown");
    }
    let guest = env.guest();
    let vm = vm_name("wspare-ct-h6");
    let spec = fresh_spec(env, &vm).await?;
    define(hv, &spec).await?;
    call(
        format!("shutdown({vm}, {STOPPED_SHUTDOWN_DEADLINE:?}) of a stopped VM"),
        hv.shutdown(&vm, STOPPED_SHUTDOWN_DEADLINE),
    )
    .await?;
    expect_state(
        hv,
        &vm,
        VmState::ShutOff,
        "shutdown() of a stopped VM returned Ok",
    )
    .await?;

    if guest.honours_shutdown {
        start(hv, &vm).await?;
        pause("letting the guest boot", guest.boot_time).await;
        call(
            format!("shutdown({vm}, {GRACEFUL_SHUTDOWN_DEADLINE:?}) of a guest that honours ACPI"),
            hv.shutdown(&vm, GRACEFUL_SHUTDOWN_DEADLINE),
        )
        .await?;
        expect_state(hv, &vm, VmState::ShutOff, "shutdown() returned Ok").await?;
    }

    let stubborn = vm_name("wspare-ct-h6-stubborn");
    let sspec = call(
        format!("fixture stubborn_vm_spec({stubborn})"),
        env.stubborn_vm_spec(&stubborn),
    )
    .await?;
    let Some(sspec) = sspec else {
        if guest.honours_shutdown {
            skip!(
                "deadline path not checked: the fixture cannot make a guest that ignores ACPI shutdown \
                 (stubborn_vm_spec returned None); the stopped and graceful paths passed"
            );
        }
        skip!("the fixture's guest does not honour ACPI shutdown and it cannot make one that ignores it");
    };
    define(hv, &sspec).await?;
    start(hv, &stubborn).await?;
    pause("letting the stubborn guest boot", guest.boot_time).await;
    let t = STUBBORN_SHUTDOWN_DEADLINE;
    set_step(&format!(
        "shutdown({stubborn}, {t:?}) of a guest that ignores ACPI"
    ));
    let t0 = now();
    let r = hv.shutdown(&stubborn, t).await;
    let took = now().saturating_duration_since(t0);
    match r {
        Ok(()) => {
            let st = state_of(hv, &stubborn).await?;
            fail!(
                "shutdown({stubborn}, {t:?}) of a guest that ignores ACPI returned Ok after {took:?}, \
                 expected a Timeout error; status answers {st:?}"
            );
        }
        Err(e) if e.kind() != ErrorKind::Timeout => fail!(
            "shutdown({stubborn}, {t:?}) of a guest that ignores ACPI failed with kind {}, expected Timeout \
             (error: {e})",
            e.kind()
        ),
        Err(_) => {}
    }
    ensure!(
        took <= t + guest.deadline_slack,
        "shutdown({stubborn}, {t:?}) took {took:?} to time out, more than its deadline plus slack \
         ({t:?} + {:?})",
        guest.deadline_slack
    );
    ensure!(
        took >= t.mul_f64(0.9),
        "shutdown({stubborn}, {t:?}) gave up with Timeout after {took:?}, before its deadline"
    );
    let st = state_of(hv, &stubborn).await?;
    ensure!(
        st.is_live(),
        "after shutdown({stubborn}, {t:?}) timed out, status answered {st:?}, expected the VM still \
         running (a timed-out shutdown leaves it running)"
    );
    destroy(hv, &stubborn).await
}

async fn h7_undefine(env: &dyn HypervisorEnv, hv: &dyn Hypervisor) -> Verdict {
    let vm = vm_name("wspare-ct-h7");
    let spec = fresh_spec(env, &vm).await?;
    define(hv, &spec).await?;
    start(hv, &vm).await?;
    expect_err(
        format!("undefine({vm})"),
        "of a running VM",
        &[ErrorKind::Conflict],
        hv.undefine(&vm),
    )
    .await?;
    expect_state(
        hv,
        &vm,
        VmState::Running,
        "undefine() of the running VM was refused",
    )
    .await?;
    destroy(hv, &vm).await?;
    let mut before = Vec::new();
    for d in &spec.disks {
        let digest = call(
            format!("fixture image_digest({})", d.path.display()),
            env.image_digest(&d.path),
        )
        .await?;
        before.push(digest);
    }
    call(format!("undefine({vm}) of a stopped VM"), hv.undefine(&vm)).await?;
    expect_state(hv, &vm, VmState::Missing, "undefine() returned Ok").await?;
    let list = call("list()", hv.list()).await?;
    ensure!(
        !list.contains(&vm),
        "after undefine({vm}) returned Ok, list() still has it: {list:?}"
    );
    for (d, b) in spec.disks.iter().zip(&before) {
        set_step(&format!(
            "fixture image_digest({}) after undefine({vm})",
            d.path.display()
        ));
        match env.image_digest(&d.path).await {
            Ok(a) => ensure!(
                &a == b,
                "undefine({vm}) changed disk image {}: digest {b} before, {a} after",
                d.path.display()
            ),
            Err(e) => fail!(
                "undefine({vm}) did not leave disk image {} in place: image_digest failed afterwards: {e}",
                d.path.display()
            ),
        }
    }
    Ok(())
}

async fn h8_freeze(env: &dyn HypervisorEnv, hv: &dyn Hypervisor) -> Verdict {
    let Some(cap) = hv.capabilities().freeze else {
        skip!("backend lacks capability freeze");
    };
    let guest = env.guest();
    if !guest.writes_disk {
        skip!(
            "the fixture's guest does not write its disk while it runs (GuestTraits::writes_disk)"
        );
    }
    let vm = vm_name("wspare-ct-h8");
    let spec = fresh_spec(env, &vm).await?;
    let Some(first) = spec.disks.first() else {
        fail!("fixture vm_spec({vm}) has no disk; H8 needs the guest's first disk");
    };
    define(hv, &spec).await?;
    expect_err(
        format!("freeze_disks({vm})"),
        "of a stopped VM",
        &[ErrorKind::Conflict],
        hv.freeze_disks(&vm),
    )
    .await?;
    start(hv, &vm).await?;
    pause("letting the guest boot", guest.boot_time).await;
    let frozen = call(format!("freeze_disks({vm})"), hv.freeze_disks(&vm)).await?;
    ensure!(
        frozen.vm == vm,
        "freeze_disks({vm}) returned disks of VM {}",
        frozen.vm
    );
    for d in &spec.disks {
        ensure!(
            frozen.disks.iter().any(|f| f.target == d.target),
            "freeze_disks({vm}) left out disk {} (frozen: {:?})",
            d.target,
            frozen.disks.iter().map(|f| &f.target).collect::<Vec<_>>()
        );
    }
    ensure!(
        frozen.consistency <= cap,
        "freeze_disks({vm}) reports consistency {:?}, above the capability's {cap:?}",
        frozen.consistency
    );
    let image = frozen
        .disks
        .iter()
        .find(|f| f.target == first.target)
        .map(|f| f.path.clone())
        .unwrap_or_default();
    let d0 = call(
        format!(
            "fixture image_digest({}) of the frozen image",
            image.display()
        ),
        env.image_digest(&image),
    )
    .await?;
    let step = FREEZE_WATCH / FREEZE_SAMPLES;
    for i in 1..=FREEZE_SAMPLES {
        pause("watching the frozen image while the guest writes", step).await;
        let d = call(
            format!("fixture image_digest({})", image.display()),
            env.image_digest(&image),
        )
        .await?;
        ensure!(
            d == d0,
            "the frozen image {} of {} changed during the freeze: digest {d0} at the freeze, {d} {:?} later",
            image.display(),
            first.target,
            step * i
        );
        expect_state(
            hv,
            &vm,
            VmState::Running,
            &format!("{:?} of freeze", step * i),
        )
        .await?;
    }
    call(format!("release_disks({vm})"), hv.release_disks(&frozen)).await?;
    expect_state(hv, &vm, VmState::Running, "release_disks() returned Ok").await?;
    let live = call(
        format!("fixture image_digest({})", first.path.display()),
        env.image_digest(&first.path),
    )
    .await?;
    ensure!(
        live != d0,
        "after release_disks({vm}), disk {} ({}) still holds the content frozen {FREEZE_WATCH:?} earlier \
         (digest {d0}): the guest's writes during the freeze are lost",
        first.target,
        first.path.display()
    );
    // A caller that crashes between freeze and release leaves the freeze
    // behind: the next freeze_disks releases it and freezes afresh.
    let _left_behind = call(
        format!("freeze_disks({vm}) (a caller that will crash)"),
        hv.freeze_disks(&vm),
    )
    .await?;
    pause("the guest writes into the left-behind freeze", step).await;
    let again = call(
        format!("freeze_disks({vm}) after a freeze left behind by a crashed caller"),
        hv.freeze_disks(&vm),
    )
    .await?;
    call(format!("release_disks({vm})"), hv.release_disks(&again)).await?;
    expect_state(
        hv,
        &vm,
        VmState::Running,
        "release_disks() after a freeze left behind",
    )
    .await?;
    Ok(())
}

async fn h9_hot_plug(env: &dyn HypervisorEnv, hv: &dyn Hypervisor) -> Verdict {
    if !hv.capabilities().attach_disk {
        skip!("backend lacks capability attach_disk");
    }
    let vm = vm_name("wspare-ct-h9");
    let spec = fresh_spec(env, &vm).await?;
    define(hv, &spec).await?;
    start(hv, &vm).await?;
    pause("letting the guest boot", env.guest().boot_time).await;
    let donor = fresh_spec(env, &vm_name("wspare-ct-h9-extra")).await?;
    let Some(mut disk) = donor.disks.first().cloned() else {
        fail!("fixture vm_spec(wspare-ct-h9-extra) has no disk to hot-plug");
    };
    let used: BTreeSet<&str> = spec.disks.iter().map(|d| d.target.as_str()).collect();
    // The first disk's slot without its last letter: vda -> vd, xvda -> xvd.
    let prefix = spec
        .disks
        .first()
        .and_then(|d| d.target.get(..d.target.len().saturating_sub(1)))
        .filter(|p| !p.is_empty())
        .unwrap_or("vd")
        .to_string();
    let Some(slot) = ('b'..='z')
        .map(|c| format!("{prefix}{c}"))
        .find(|s| !used.contains(s.as_str()))
    else {
        fail!("no free disk slot in {vm}");
    };
    disk.target = slot.clone();
    call(
        format!("attach_disk({vm}, {slot})"),
        hv.attach_disk(&vm, &disk),
    )
    .await?;
    let after = spec_of(hv, &vm).await?;
    let Some(got) = after.disk(&slot) else {
        fail!(
            "after attach_disk({vm}, {slot}) returned Ok, spec({vm}) has no disk in slot {slot} (slots: {:?})",
            after.disks.iter().map(|d| &d.target).collect::<Vec<_>>()
        );
    };
    ensure!(
        got.path == disk.path,
        "after attach_disk({vm}, {slot}), spec({vm}) shows {} in slot {slot}, expected {}",
        got.path.display(),
        disk.path.display()
    );
    for d in &spec.disks {
        ensure!(
            after.disk(&d.target).is_some(),
            "attach_disk({vm}, {slot}) lost disk {} from the spec",
            d.target
        );
    }
    call(
        format!("detach_disk({vm}, {slot})"),
        hv.detach_disk(&vm, &slot),
    )
    .await?;
    let after = spec_of(hv, &vm).await?;
    ensure!(
        after.disk(&slot).is_none(),
        "after detach_disk({vm}, {slot}) returned Ok, spec({vm}) still has a disk in slot {slot}"
    );
    expect_err(
        format!("detach_disk({vm}, {slot})"),
        "of a slot that is no longer attached",
        &[ErrorKind::NotFound],
        hv.detach_disk(&vm, &slot),
    )
    .await?;
    expect_state(hv, &vm, VmState::Running, "hot-plugging a disk").await
}

async fn h10_list(env: &dyn HypervisorEnv, hv: &dyn Hypervisor) -> Verdict {
    let list = |what: &'static str| async move {
        let l = call(format!("list() {what}"), hv.list()).await?;
        let set: BTreeSet<VmName> = l.iter().cloned().collect();
        ensure!(
            set.len() == l.len(),
            "list() {what} returned duplicates: {l:?}"
        );
        Ok::<_, Stop>(set)
    };
    let baseline = list("before the case").await?;
    let names: Vec<VmName> = ["wspare-ct-h10-a", "wspare-ct-h10-b", "wspare-ct-h10-c"]
        .into_iter()
        .map(vm_name)
        .collect();
    for n in &names {
        ensure!(
            !baseline.contains(n),
            "list() in a fresh environment already has {n}: {baseline:?}"
        );
        let spec = fresh_spec(env, n).await?;
        define(hv, &spec).await?;
    }
    let mut want = baseline.clone();
    want.extend(names.iter().cloned());
    let got = list("after defining three VMs").await?;
    ensure!(
        got == want,
        "after defining {names:?}, list() answered {got:?}, expected {want:?}"
    );
    call(format!("undefine({})", names[1]), hv.undefine(&names[1])).await?;
    want.remove(&names[1]);
    let got = list("after undefining one").await?;
    ensure!(
        got == want,
        "after undefine({}), list() answered {got:?}, expected {want:?}",
        names[1]
    );
    Ok(())
}

async fn h11_concurrency(env: &dyn HypervisorEnv, hv: &dyn Hypervisor) -> Verdict {
    let vms: Vec<VmName> = (0..3)
        .map(|i| vm_name(&format!("wspare-ct-h11-{i}")))
        .collect();
    let mut specs = Vec::new();
    for vm in &vms {
        specs.push(fresh_spec(env, vm).await?);
    }
    let (a, b, c) = tokio::join!(
        define(hv, &specs[0]),
        define(hv, &specs[1]),
        define(hv, &specs[2])
    );
    a?;
    b?;
    c?;
    let (a, b, c) = tokio::join!(start(hv, &vms[0]), start(hv, &vms[1]), start(hv, &vms[2]));
    a?;
    b?;
    c?;
    let (a, b, c) = tokio::join!(
        state_of(hv, &vms[0]),
        state_of(hv, &vms[1]),
        state_of(hv, &vms[2])
    );
    for (vm, st) in vms.iter().zip([a?, b?, c?]) {
        ensure!(
            st == VmState::Running,
            "after starting three VMs at once, status({vm}) answered {st:?}, expected Running"
        );
    }
    let (a, b, c) = tokio::join!(
        destroy(hv, &vms[0]),
        spec_of(hv, &vms[1]),
        state_of(hv, &vms[2])
    );
    a?;
    let spec1 = b?;
    ensure!(
        spec1 == specs[1],
        "spec({}) read while {} was destroyed differs from its own spec: {}",
        vms[1],
        vms[0],
        spec_diff(&specs[1], &spec1)
    );
    let st2 = c?;
    ensure!(
        st2 == VmState::Running,
        "status({}) read while {} was destroyed answered {st2:?}, expected Running",
        vms[2],
        vms[0]
    );
    let after = format!("destroy({}) alone", vms[0]);
    expect_state(hv, &vms[0], VmState::ShutOff, &after).await?;
    expect_state(hv, &vms[1], VmState::Running, &after).await?;
    expect_state(hv, &vms[2], VmState::Running, &after).await?;
    let (a, b, c) = tokio::join!(
        start(hv, &vms[0]),
        destroy(hv, &vms[1]),
        destroy(hv, &vms[2])
    );
    a?;
    b?;
    c?;
    let after = format!("start({}) at once with destroy of the other two", vms[0]);
    expect_state(hv, &vms[0], VmState::Running, &after).await?;
    expect_state(hv, &vms[1], VmState::ShutOff, &after).await?;
    expect_state(hv, &vms[2], VmState::ShutOff, &after).await?;
    let (a, b, c) = tokio::join!(
        spec_of(hv, &vms[0]),
        call(format!("undefine({})", vms[1]), hv.undefine(&vms[1])),
        call(format!("undefine({})", vms[2]), hv.undefine(&vms[2]))
    );
    let spec0 = a?;
    b?;
    c?;
    ensure!(
        spec0 == specs[0],
        "spec({}) read while the others were undefined differs from its own spec: {}",
        vms[0],
        spec_diff(&specs[0], &spec0)
    );
    let list = call("list()", hv.list()).await?;
    ensure!(
        list.contains(&vms[0]) && !list.contains(&vms[1]) && !list.contains(&vms[2]),
        "after undefining {} and {} at once, list() answered {list:?}, expected {} and neither of them",
        vms[1],
        vms[2],
        vms[0]
    );
    expect_state(hv, &vms[0], VmState::Running, "undefining the two others").await
}
