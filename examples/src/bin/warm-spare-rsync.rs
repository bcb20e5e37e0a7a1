//! `warm-spare-rsync`: the classic rsync warm spare in one file.
//!
//! A VM runs on a primary host; every few minutes its disk images are
//! copied to a spare host, where a stopped copy of the VM stays defined on
//! the newest complete copy. When the primary dies, an operator (or a
//! monitor) runs `failover` on the spare; when the primary is back,
//! `failback` moves the VM home with a final sync and no data lost. No
//! heartbeats, no automatic decisions: that is `wspare-agent`. This is the
//! setup people build with cron and rsync, made safe by the library:
//! a copy is never torn (two slots and an atomically switched manifest,
//! `wspare-rsync`), a running VM is copied from a point-in-time freeze
//! (`wspare-libvirt`), the spare is only started once the primary is
//! proven off (`wspare-fence`), and a stale direction can never copy an
//! old primary over the new active copy.
//!
//! ```text
//! # on the primary (or any host with ssh to both), e.g. as a service:
//! warm-spare-rsync --vm web --primary root@10.0.0.1 --spare root@10.0.0.2 \
//!     --local primary --dir /srv/wspare/web run --interval 5m
//! # on the spare, when the primary is dead:
//! warm-spare-rsync ... --local spare failover --ipmi 10.1.0.1 --ipmi-user fence \
//!     --ipmi-password-file /etc/wspare/bmc.pw
//! # later, the primary back, from the spare:
//! warm-spare-rsync ... --local spare failback
//! ```
//!
//! Each host is named by its ssh destination (`user@host`, the address the
//! other host reaches it at) and its libvirt URI as seen from where this
//! runs (default: `qemu:///system` for the local host, `qemu+ssh://DEST/system`
//! for the other). The replica directory is the same path on both hosts
//! (`{node}` in it is replaced by the host's name, for hosts that share a
//! filesystem).
//! Which way the images flow is read from the manifests on both hosts, so
//! the commands work the same after a failover.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use wspare_core::runner::{CommandRunner, LocalRunner, SshRunner, SshTarget};
use wspare_core::{
    FenceReceipt, Fencer, Generation, Hypervisor, NodeId, Replicator, SourceView, UnixMillis,
    VmName, VmSpec,
};
use wspare_examples::per_node_path;
use wspare_fence::ipmi::{IpmiDevice, IpmiFencer, IpmiPassword};
use wspare_libvirt::{DomainType, LibvirtConfig, LibvirtHypervisor};
use wspare_rsync::{read_direction, Endpoint, Options, Reach, RsyncReplicator};

#[derive(Parser, Debug)]
#[command(
    name = "warm-spare-rsync",
    about = "The classic rsync warm spare of one libvirt VM: periodic copies to a stopped spare, failover, failback"
)]
struct Args {
    /// The VM (libvirt domain name, the same on both hosts).
    #[arg(long)]
    vm: VmName,
    /// The primary host's ssh destination (`root@10.0.0.1`).
    #[arg(long)]
    primary: String,
    /// The spare host's ssh destination.
    #[arg(long)]
    spare: String,
    /// Which host this runs on: `primary`, `spare`, or `none` (both over ssh).
    #[arg(long, value_enum)]
    local: Local,
    /// The replica directory on both hosts (one per VM); `{node}` is
    /// replaced by each host's name (the host part of its destination).
    #[arg(long)]
    dir: PathBuf,
    /// libvirt URI of the primary (default: local or qemu+ssh).
    #[arg(long)]
    primary_uri: Option<String>,
    /// libvirt URI of the spare.
    #[arg(long)]
    spare_uri: Option<String>,
    /// `<domain type>` for the spare's definition: kvm, or qemu (TCG).
    #[arg(long, value_enum, default_value_t = Domain::Kvm)]
    domain_type: Domain,
    /// Serial consoles of defined VMs go to `<dir>/<vm>.console.log`
    /// (`{node}` as in `--dir`).
    #[arg(long)]
    console_log_dir: Option<PathBuf>,
    /// ssh key for both hosts.
    #[arg(long)]
    ssh_key: Option<PathBuf>,
    /// ssh port for both hosts.
    #[arg(long)]
    ssh_port: Option<u16>,
    /// Extra ssh `-o` option (repeatable), e.g. `ConnectTimeout=5`.
    #[arg(long)]
    ssh_option: Vec<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Domain {
    Kvm,
    Qemu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Local {
    Primary,
    Spare,
    None,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Copies the VM's disks to the other host every `--interval`, and keeps
    /// the stopped copy there defined on the newest complete copy.
    Run {
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
    /// One copy now.
    Sync,
    /// The complete copies on the receiving host.
    Status,
    /// Starts the VM on the spare from a copy (the newest by default), once
    /// the primary is proven off: by its BMC (`--ipmi`), or by your word
    /// (`--primary-is-off`, after you checked).
    Failover {
        #[arg(long)]
        generation: Option<u64>,
        /// The primary's BMC address (`host` or `host:port`).
        #[arg(long)]
        ipmi: Option<String>,
        #[arg(long, default_value = "admin")]
        ipmi_user: String,
        #[arg(long)]
        ipmi_password_file: Option<PathBuf>,
        /// You checked that the primary is off.
        #[arg(long)]
        primary_is_off: bool,
    },
    /// Moves the VM from the spare back to the primary: stop, final copy,
    /// verify, start on the primary. Nothing written is lost.
    Failback {
        /// Graceful shutdown deadline.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        shutdown_timeout: Duration,
    },
}

/// One host.
struct Host {
    node: NodeId,
    hv: Arc<dyn Hypervisor>,
    endpoint: Endpoint,
}

/// The host at ssh destination `dest`, given as `--{flag}`.
fn host(a: &Args, flag: &str, dest: &str, local: bool, uri: &Option<String>) -> Result<Host> {
    let mut ssh = SshTarget::new(dest).with_context(|| format!("--{flag} {dest}"))?;
    ssh.identity = a.ssh_key.clone();
    ssh.port = a.ssh_port;
    ssh.options = vec!["StrictHostKeyChecking=yes".into()];
    ssh.options.extend(a.ssh_option.iter().cloned());
    // The node is named after the host part of the destination.
    let node = NodeId::new(dest.rsplit('@').next().unwrap_or(dest).replace(':', "-"))
        .with_context(|| format!("--{flag} {dest}: the host part names the node"))?;
    let runner: Arc<dyn CommandRunner> = if local {
        Arc::new(LocalRunner)
    } else {
        Arc::new(SshRunner::new(ssh.clone()))
    };
    let uri = uri.clone().unwrap_or_else(|| {
        if local {
            "qemu:///system".into()
        } else {
            // libvirt's own ssh connection: the same port and key as ours.
            let port = a.ssh_port.map(|p| format!(":{p}")).unwrap_or_default();
            let mut u = format!("qemu+ssh://{dest}{port}/system?no_tty=1");
            if let Some(k) = &a.ssh_key {
                u.push_str(&format!("&keyfile={}", k.display()));
            }
            u
        }
    });
    let mut cfg = LibvirtConfig::new(&uri);
    cfg.domain_type = Some(match a.domain_type {
        Domain::Kvm => DomainType::Kvm,
        Domain::Qemu => DomainType::Qemu,
    });
    cfg.console_log_dir = a.console_log_dir.as_ref().map(|d| per_node_path(d, &node));
    cfg.guest_agent = false;
    let hv = LibvirtHypervisor::new(cfg)
        .with_context(|| format!("{node}'s libvirt at {uri} (see --{flag}-uri)"))?;
    Ok(Host {
        hv: Arc::new(hv),
        endpoint: Endpoint::new(
            node.clone(),
            runner,
            Reach::Ssh(ssh),
            per_node_path(&a.dir, &node),
        ),
        node,
    })
}

/// (source, target) as the manifests on both hosts say
/// ([`wspare_rsync::read_direction`]); without manifests, the primary is
/// the source. A manifest that cannot be read (a host down) is left out,
/// with a note.
async fn direction<'h>(vm: &VmName, p: &'h Host, s: &'h Host) -> (&'h Host, &'h Host) {
    let (d, unread) = read_direction(
        vm.as_str(),
        &p.node,
        &p.endpoint,
        &s.endpoint,
        &Options::default(),
    )
    .await;
    for e in unread {
        eprintln!("{vm}: leaving a manifest out of the direction: {e}");
    }
    if d.source == p.node {
        (p, s)
    } else {
        (s, p)
    }
}

fn replicator(name: &VmName, src: &Host, tgt: &Host) -> Result<RsyncReplicator> {
    Ok(RsyncReplicator::new(
        name.as_str(),
        src.endpoint.clone(),
        tgt.endpoint.clone(),
        Options::default(),
    )?)
}

/// One cycle from `src` to `tgt`: freeze the running VM's disks (or read
/// the stopped VM's files), copy, release; then keep the stopped copy on
/// `tgt` defined on the new generation.
async fn sync(vm: &VmName, src: &Host, tgt: &Host) -> Result<Generation> {
    let rep = replicator(vm, src, tgt)?;
    let state = src.hv.status(vm).await?.state;
    let info = if state.is_live() {
        let frozen = src.hv.freeze_disks(vm).await?;
        let r = rep.sync(&SourceView::Frozen(frozen.clone())).await;
        // Always release, whatever the copy did.
        src.hv
            .release_disks(&frozen)
            .await
            .context("releasing the freeze (the VM may still write to an overlay)")?;
        r?
    } else {
        let spec = src.hv.spec(vm).await?;
        rep.sync(&SourceView::Stopped {
            disks: spec.disks,
            at: UnixMillis::now(),
        })
        .await?
    };
    // The stopped copy on the target follows the newest generation.
    let m = rep
        .target_manifest()
        .await?
        .ok_or_else(|| anyhow!("no manifest on {} after a sync", tgt.node))?;
    if let Some(newest) = m.newest() {
        if !tgt.hv.status(vm).await?.state.is_live() {
            let spec = with_disks(
                src.hv.spec(vm).await?,
                newest.disk_specs(&tgt.endpoint.replica_dir),
            )?;
            tgt.hv.define(&spec).await?;
        }
    }
    Ok(info.generation)
}

/// The VM starts on `tgt` from generation `g` of `rep`'s copy there (defined
/// as `spec` on the promoted images), and replication reverses: `tgt` is
/// the source from now on.
async fn start_from_copy(
    rep: &RsyncReplicator,
    tgt: &Host,
    spec: VmSpec,
    g: Generation,
) -> Result<()> {
    let vm = spec.name.clone();
    let promoted = rep
        .promote(g)
        .await
        .with_context(|| format!("promoting {g} on {}", tgt.node))?;
    let spec = with_disks(spec, promoted.disks)
        .with_context(|| format!("the promoted {g} on {}", tgt.node))?;
    tgt.hv
        .define(&spec)
        .await
        .with_context(|| format!("defining {vm} on {} on the promoted {g}", tgt.node))?;
    tgt.hv.start(&vm).await.with_context(|| {
        format!(
            "starting {vm} on {} (defined there on the promoted {g})",
            tgt.node
        )
    })?;
    rep.reverse().await.with_context(|| {
        format!(
            "{vm} runs on {} from {g}, but reversing the replication failed: the manifests do not name {} the source yet",
            tgt.node, tgt.node
        )
    })
}

/// `spec` with its disks' images replaced by `disks` (matched by slot).
fn with_disks(mut spec: VmSpec, disks: Vec<wspare_core::DiskSpec>) -> Result<VmSpec> {
    for d in &mut spec.disks {
        let r = disks
            .iter()
            .find(|r| r.target == d.target)
            .ok_or_else(|| {
                anyhow!(
                    "the copy has no image for disk {} of {}: the VM's definition has a disk the copy was not made with",
                    d.target,
                    spec.name
                )
            })?;
        d.path = r.path.clone();
    }
    Ok(spec)
}

async fn run(a: Args) -> Result<()> {
    let primary = host(
        &a,
        "primary",
        &a.primary,
        a.local == Local::Primary,
        &a.primary_uri,
    )?;
    let spare = host(&a, "spare", &a.spare, a.local == Local::Spare, &a.spare_uri)?;
    let vm = a.vm.clone();
    match a.cmd {
        Cmd::Run { interval } => loop {
            let (src, tgt) = direction(&vm, &primary, &spare).await;
            match sync(&vm, src, tgt).await {
                Ok(g) => println!("{vm}: {g} complete on {}", tgt.node),
                // A failed cycle leaves the previous copy intact: try again.
                Err(e) => eprintln!("{vm}: sync {} -> {} failed: {e:#}", src.node, tgt.node),
            }
            tokio::time::sleep(interval).await;
        },
        Cmd::Sync => {
            let (src, tgt) = direction(&vm, &primary, &spare).await;
            let g = sync(&vm, src, tgt)
                .await
                .with_context(|| format!("{vm}: sync {} -> {}", src.node, tgt.node))?;
            println!("{vm}: {g} complete on {}", tgt.node);
        }
        Cmd::Status => {
            let (src, tgt) = direction(&vm, &primary, &spare).await;
            let st = replicator(&vm, src, tgt)?.status().await?;
            println!("{vm}: {} -> {}", st.source, st.target);
            for g in st.generations {
                let age = UnixMillis::now().saturating_since(g.source_time);
                println!(
                    "  {}  {} old",
                    g.generation,
                    humantime::format_duration(Duration::from_secs(age.as_secs()))
                );
            }
        }
        Cmd::Failover {
            generation,
            ipmi,
            ipmi_user,
            ipmi_password_file,
            primary_is_off,
        } => {
            let (src, tgt) = direction(&vm, &primary, &spare).await;
            if tgt.node != spare.node {
                bail!(
                    "{} is the replication source already (failed over before); use failback",
                    spare.node
                );
            }
            // 1. Proof that the primary's copy is off.
            let receipt = match (ipmi, primary_is_off) {
                (Some(bmc), _) => {
                    let (h, port) = match bmc.rsplit_once(':') {
                        Some((h, p)) => {
                            let port = p.parse().with_context(|| {
                                format!("--ipmi {bmc}: {p:?} after ':' is not a port number")
                            })?;
                            (h.to_string(), port)
                        }
                        None => (bmc.clone(), 623),
                    };
                    let pw = ipmi_password_file
                        .ok_or_else(|| anyhow!("--ipmi needs --ipmi-password-file"))?;
                    let mut dev = IpmiDevice::new(h, ipmi_user, IpmiPassword::File(pw));
                    dev.port = port;
                    let f = IpmiFencer::new("primary-bmc", src.node.clone(), dev, Arc::new(LocalRunner))?;
                    println!("fencing {} through {}", src.node, f.describe());
                    f.fence(&src.node).await.with_context(|| {
                        format!(
                            "fencing {} through its BMC {bmc} failed; check the BMC, or once you know {} is off, rerun with --primary-is-off",
                            src.node, src.node
                        )
                    })?
                }
                (None, true) => FenceReceipt::from_operator(src.node.clone(), UnixMillis::now()),
                (None, false) => bail!(
                    "failover needs proof that {} is off: --ipmi HOST (its BMC), or --primary-is-off once you checked",
                    src.node
                ),
            };
            // The hypervisor, if it still answers, must not see the VM live.
            if let Ok(st) = src.hv.status(&vm).await {
                if st.state.is_live() {
                    bail!(
                        "{} still reports {vm} {}: not starting a second copy ({receipt})",
                        src.node,
                        st.state
                    );
                }
            }
            println!("{receipt}");
            // 2. Promote a complete copy, 3. start the VM on it, 4. reverse.
            let rep = replicator(&vm, src, tgt)?;
            let g = match generation {
                Some(g) => Generation(g),
                None => {
                    rep.status()
                        .await?
                        .newest
                        .ok_or_else(|| {
                            anyhow!(
                                "no complete copy of {vm} on {}: nothing to start from (has a `sync` ever completed?)",
                                tgt.node
                            )
                        })?
                        .generation
                }
            };
            let spec = match tgt.hv.spec(&vm).await {
                Ok(s) => s,
                Err(_) => src.hv.spec(&vm).await.with_context(|| {
                    format!("no definition of {vm} on {} or {}", tgt.node, src.node)
                })?,
            };
            start_from_copy(&rep, tgt, spec, g).await?;
            println!(
                "{vm} runs on {} from {g}; replication now {} -> {}",
                tgt.node, tgt.node, src.node
            );
        }
        Cmd::Failback { shutdown_timeout } => {
            let (src, tgt) = direction(&vm, &primary, &spare).await;
            if src.node != spare.node {
                bail!(
                    "{} is not the replication source: nothing to fail back",
                    spare.node
                );
            }
            // Stop, copy the stopped disks, check the copy against them.
            src.hv
                .shutdown(&vm, shutdown_timeout)
                .await
                .with_context(|| format!("shutting {vm} down on {}", src.node))?;
            let g = sync(&vm, src, tgt).await.with_context(|| {
                format!(
                    "the final copy {} -> {} ({vm} is stopped on {}: start it again there, or retry failback)",
                    src.node, tgt.node, src.node
                )
            })?;
            let rep = replicator(&vm, src, tgt)?;
            let spec = src.hv.spec(&vm).await?;
            rep.verify(
                g,
                &SourceView::Stopped {
                    disks: spec.disks.clone(),
                    at: UnixMillis::now(),
                },
            )
            .await
            .with_context(|| {
                format!(
                    "verifying {g} on {} against the stopped {vm} on {}",
                    tgt.node, src.node
                )
            })?;
            start_from_copy(&rep, tgt, spec, g).await?;
            println!(
                "{vm} runs on {} again from {g} (verified); replication {} -> {}",
                tgt.node, tgt.node, src.node
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warm-spare-rsync: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warm-spare-rsync: {e:#}");
            ExitCode::FAILURE
        }
    }
}
