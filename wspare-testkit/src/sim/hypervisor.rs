//! [`SimHypervisor`]: the hypervisor of one host of a [`SimWorld`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use wspare_core::spec::validate_disk_target;
use wspare_core::{
    Consistency, DiskSpec, Error, ErrorKind, FrozenDisk, FrozenDisks, Hypervisor, HypervisorCaps,
    NodeId, PowerState, Result, UnixMillis, VmName, VmSpec, VmState, VmStatus,
};

use super::world::{ms, Fault, Freeze, Guest, GuestMode, Host, Images, Run, SimWorld, Vm};

/// The hypervisor of host `node` in a [`SimWorld`]: VMs with test guests
/// (see [`Guest`]) whose disks are world images on that host.
///
/// - Every call takes [`SimConfig::op_latency`](super::SimConfig) of world
///   time; a powered-off host, or [`Fault::HypervisorUnreachable`], fails
///   it with `Unreachable`; [`Fault::HypervisorHangs`] makes it hang.
/// - `start` needs every disk image to exist on the host.
/// - `shutdown` sends ACPI and polls: a guest that honours it powers off
///   [`SimConfig::guest_acpi_delay`](super::SimConfig) after it booted.
/// - `freeze_disks` points the guest's writes at overlays
///   ([`SimHypervisor::overlay_path`]); `release_disks` folds them back, and so
///   does the next `freeze_disks` if a crashed caller never released.
/// - `define` of a running VM is refused (`Conflict`).
#[derive(Clone, Debug)]
pub struct SimHypervisor {
    world: SimWorld,
    node: NodeId,
}

impl SimHypervisor {
    /// The hypervisor of `node` (added to the world if it is not there).
    pub fn new(world: &SimWorld, node: &NodeId) -> Self {
        world.add_host(node);
        SimHypervisor {
            world: world.clone(),
            node: node.clone(),
        }
    }

    /// The host.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// Where the guest's writes to `image` go during a freeze.
    pub fn overlay_path(image: &Path) -> PathBuf {
        let mut p = image.as_os_str().to_owned();
        p.push(".wspare-overlay");
        PathBuf::from(p)
    }

    fn err(&self, kind: ErrorKind, msg: impl std::fmt::Display) -> Error {
        Error::new(kind, format!("sim hypervisor {}: {msg}", self.node))
    }

    /// The call's latency, then its faults.
    async fn enter(&self) -> Result<()> {
        self.world.sleep(self.world.config().op_latency).await;
        let (hangs, unreachable) = self.world.with(|st, _| {
            (
                st.faults
                    .contains(&Fault::HypervisorHangs(self.node.clone())),
                st.faults
                    .contains(&Fault::HypervisorUnreachable(self.node.clone())),
            )
        });
        if hangs {
            std::future::pending::<()>().await;
        }
        if unreachable {
            return Err(self.err(ErrorKind::Unreachable, "connection refused"));
        }
        Ok(())
    }

    /// Runs `f` on this host, which must be up.
    fn host<R>(&self, f: impl FnOnce(&mut Host, &mut Images, u64) -> Result<R>) -> Result<R> {
        self.world.with(|st, now| {
            let Some(host) = st.hosts.get_mut(&self.node) else {
                return Err(self.err(ErrorKind::Unreachable, "no such host"));
            };
            if host.power != PowerState::On {
                return Err(self.err(ErrorKind::Unreachable, "host is powered off"));
            }
            f(host, &mut st.images, now)
        })
    }

    /// Runs `f` on VM `vm` of this host, which must be defined.
    fn vm<R>(
        &self,
        vm: &VmName,
        f: impl FnOnce(&mut Vm, &mut Images, u64) -> Result<R>,
    ) -> Result<R> {
        self.host(|h, images, now| match h.vms.get_mut(vm) {
            Some(v) => f(v, images, now),
            None => Err(self.err(ErrorKind::NotFound, format!("VM {vm} is not defined"))),
        })
    }
}

#[async_trait]
impl Hypervisor for SimHypervisor {
    fn describe(&self) -> String {
        format!("sim hypervisor on {}", self.node)
    }

    fn capabilities(&self) -> HypervisorCaps {
        HypervisorCaps {
            freeze: Some(Consistency::CrashConsistent),
            attach_disk: true,
            graceful_shutdown: true,
            lifecycle_events: false,
        }
    }

    async fn status(&self, vm: &VmName) -> Result<VmStatus> {
        self.enter().await?;
        self.host(|h, _, _| {
            Ok(h.vms
                .get(vm)
                .map_or(VmStatus::new(VmState::Missing), |v| VmStatus {
                    state: v.state,
                    reason: v.reason.clone(),
                }))
        })
    }

    async fn list(&self) -> Result<Vec<VmName>> {
        self.enter().await?;
        self.host(|h, _, _| Ok(h.vms.keys().cloned().collect()))
    }

    async fn define(&self, spec: &VmSpec) -> Result<()> {
        self.enter().await?;
        spec.validate()
            .map_err(|e| e.context(format!("sim hypervisor {}", self.node)))?;
        self.host(|h, _, _| {
            match h.vms.get_mut(&spec.name) {
                Some(v) if v.state.is_live() => {
                    return Err(self.err(
                        ErrorKind::Conflict,
                        format!(
                            "VM {} is {}; stop it before redefining it",
                            spec.name, v.state
                        ),
                    ))
                }
                Some(v) => v.spec = spec.clone(),
                None => {
                    h.vms.insert(spec.name.clone(), Vm::new(spec.clone()));
                }
            }
            Ok(())
        })
    }

    async fn spec(&self, vm: &VmName) -> Result<VmSpec> {
        self.enter().await?;
        self.vm(vm, |v, _, _| Ok(v.spec.clone()))
    }

    async fn undefine(&self, vm: &VmName) -> Result<()> {
        self.enter().await?;
        let node = self.node.clone();
        self.host(|h, images, _| {
            let Some(v) = h.vms.get_mut(vm) else {
                return Err(self.err(ErrorKind::NotFound, format!("VM {vm} is not defined")));
            };
            if v.state.is_live() {
                return Err(self.err(
                    ErrorKind::Conflict,
                    format!("VM {vm} is {}; stop it first", v.state),
                ));
            }
            v.merge_overlays(&node, images);
            h.vms.remove(vm);
            Ok(())
        })
    }

    async fn start(&self, vm: &VmName) -> Result<()> {
        self.enter().await?;
        let node = self.node.clone();
        self.vm(vm, |v, images, now| {
            if v.state.is_live() {
                return Ok(());
            }
            if let Some(d) = v
                .spec
                .disks
                .iter()
                .find(|d| !images.contains_key(&(node.clone(), d.path.clone())))
            {
                return Err(self.err(
                    ErrorKind::Backend,
                    format!(
                        "cannot start {vm}: disk image {} does not exist",
                        d.path.display()
                    ),
                ));
            }
            let guest = Guest::of(&v.spec);
            let boot_done = now + ms(self.world.config().guest_boot);
            v.state = VmState::Running;
            v.reason = Some("booted".into());
            v.run = Some(Run {
                started: now,
                guest,
                writes: 0,
                off_at: (guest.mode == GuestMode::Once).then_some(boot_done),
                off_reason: "guest powered off",
            });
            Ok(())
        })
    }

    async fn shutdown(&self, vm: &VmName, timeout: Duration) -> Result<()> {
        self.enter().await?;
        let cfg = self.world.config().clone();
        let t0 = self.world.now();
        let live = self.vm(vm, |v, _, now| {
            if let Some(r) = &mut v.run {
                if r.guest.acpi {
                    let boot_done = r.started + ms(cfg.guest_boot);
                    let off = now.max(boot_done) + ms(cfg.guest_acpi_delay);
                    if r.off_at.is_none_or(|o| o > off) {
                        r.off_at = Some(off);
                        r.off_reason = "shut down by ACPI";
                    }
                }
            }
            Ok(v.state.is_live())
        })?;
        if !live {
            return Ok(());
        }
        loop {
            let live = self.vm(vm, |v, _, _| Ok(v.state.is_live()))?;
            if !live {
                return Ok(());
            }
            let waited = self.world.now().saturating_since(t0);
            if waited >= timeout {
                return Err(self.err(
                    ErrorKind::Timeout,
                    format!("guest {vm} still running {timeout:?} after the ACPI shutdown request"),
                ));
            }
            self.world
                .sleep(cfg.poll_interval.min(timeout - waited))
                .await;
        }
    }

    async fn destroy(&self, vm: &VmName) -> Result<()> {
        self.enter().await?;
        self.vm(vm, |v, _, _| {
            if v.state.is_live() || v.state == VmState::Crashed {
                v.state = VmState::ShutOff;
                v.reason = Some("destroyed".into());
                v.run = None;
            }
            Ok(())
        })
    }

    async fn attach_disk(&self, vm: &VmName, disk: &DiskSpec) -> Result<()> {
        self.enter().await?;
        validate_disk_target(&disk.target)?;
        let node = self.node.clone();
        self.vm(vm, |v, images, _| {
            if v.spec.disk(&disk.target).is_some() {
                return Err(self.err(
                    ErrorKind::Conflict,
                    format!("VM {vm} already has a disk in slot {}", disk.target),
                ));
            }
            if !images.contains_key(&(node.clone(), disk.path.clone())) {
                return Err(self.err(
                    ErrorKind::InvalidInput,
                    format!("disk image {} does not exist", disk.path.display()),
                ));
            }
            v.spec.disks.push(disk.clone());
            Ok(())
        })
    }

    async fn detach_disk(&self, vm: &VmName, target: &str) -> Result<()> {
        self.enter().await?;
        self.vm(vm, |v, _, _| {
            let Some(i) = v.spec.disks.iter().position(|d| d.target == target) else {
                return Err(self.err(
                    ErrorKind::NotFound,
                    format!("VM {vm} has no disk in slot {target}"),
                ));
            };
            if v.freeze.is_some() {
                return Err(self.err(ErrorKind::Conflict, format!("VM {vm}'s disks are frozen")));
            }
            v.spec.disks.remove(i);
            Ok(())
        })
    }

    async fn freeze_disks(&self, vm: &VmName) -> Result<FrozenDisks> {
        self.enter().await?;
        let node = self.node.clone();
        self.vm(vm, |v, images, now| {
            if !v.state.is_live() {
                return Err(self.err(
                    ErrorKind::Conflict,
                    format!("VM {vm} is {}: its disks are already consistent", v.state),
                ));
            }
            // A freeze left behind by a caller that crashed before its
            // release is released first (H8).
            v.merge_overlays(&node, images);
            let mut overlays = Vec::new();
            let mut disks = Vec::new();
            for d in &v.spec.disks {
                let Some(bytes) = images.get(&(node.clone(), d.path.clone())).cloned() else {
                    return Err(self.err(
                        ErrorKind::Backend,
                        format!("disk image {} of {vm} does not exist", d.path.display()),
                    ));
                };
                let ov = SimHypervisor::overlay_path(&d.path);
                images.insert((node.clone(), ov.clone()), bytes);
                overlays.push((d.path.clone(), ov.clone()));
                disks.push(FrozenDisk {
                    target: d.target.clone(),
                    path: d.path.clone(),
                    format: d.format,
                    overlay: Some(ov),
                });
            }
            v.freeze = Some(Freeze { overlays });
            Ok(FrozenDisks {
                vm: vm.clone(),
                at: UnixMillis(now),
                consistency: Consistency::CrashConsistent,
                disks,
            })
        })
    }

    async fn release_disks(&self, frozen: &FrozenDisks) -> Result<()> {
        self.enter().await?;
        let node = self.node.clone();
        self.vm(&frozen.vm, |v, images, _| {
            v.merge_overlays(&node, images);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::world::fresh_guest_disk;
    use crate::sim::world::tests::spec;

    fn setup() -> (SimWorld, SimHypervisor, NodeId) {
        let w = SimWorld::new();
        let a = NodeId::new("node-a").unwrap();
        let hv = SimHypervisor::new(&w, &a);
        (w, hv, a)
    }

    #[tokio::test(start_paused = true)]
    async fn once_guest_writes_then_powers_off() {
        let (w, hv, a) = setup();
        let s = spec("once", "wspare.mode=once");
        w.write_image(&a, &s.disks[0].path, fresh_guest_disk());
        hv.define(&s).await.unwrap();
        hv.start(&s.name).await.unwrap();
        assert_eq!(hv.status(&s.name).await.unwrap().state, VmState::Running);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let st = hv.status(&s.name).await.unwrap();
        assert_eq!(st.state, VmState::ShutOff);
        assert_eq!(st.reason.as_deref(), Some("guest powered off"));
        assert_eq!(w.guest_counter(&a, &s.disks[0].path), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn start_needs_the_images_and_a_powered_host() {
        let (w, hv, a) = setup();
        let s = spec("web", "wspare.mode=idle");
        hv.define(&s).await.unwrap();
        let e = hv.start(&s.name).await.unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        w.write_image(&a, &s.disks[0].path, fresh_guest_disk());
        hv.start(&s.name).await.unwrap();
        w.power_off(&a);
        let e = hv.status(&s.name).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unreachable);
        assert_eq!(w.vm_state(&a, &s.name), VmState::ShutOff);
    }

    #[tokio::test(start_paused = true)]
    async fn faults_make_calls_fail_or_hang() {
        let (w, hv, a) = setup();
        w.set_fault(Fault::HypervisorUnreachable(a.clone()));
        assert_eq!(hv.list().await.unwrap_err().kind(), ErrorKind::Unreachable);
        w.clear_faults();
        w.set_fault(Fault::HypervisorHangs(a.clone()));
        let r = tokio::time::timeout(Duration::from_secs(30), hv.list()).await;
        assert!(r.is_err(), "the call hangs");
        w.clear_faults();
        assert!(hv.list().await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_crashed_vm_is_not_live_and_destroy_clears_it() {
        let (w, hv, a) = setup();
        let s = spec("web", "wspare.mode=loop");
        w.write_image(&a, &s.disks[0].path, fresh_guest_disk());
        hv.define(&s).await.unwrap();
        hv.start(&s.name).await.unwrap();
        assert!(w.crash_vm(&a, &s.name));
        assert_eq!(hv.status(&s.name).await.unwrap().state, VmState::Crashed);
        hv.destroy(&s.name).await.unwrap();
        assert_eq!(hv.status(&s.name).await.unwrap().state, VmState::ShutOff);
    }
}
