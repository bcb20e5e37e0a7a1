//! What the test watches beside the agents: both hosts' copies of the VM
//! (never two running), the replica generations and the counter each one
//! holds, and the guests' consoles.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wspare_core::{Hypervisor, VmName, VmState};
use wspare_libvirt::{LibvirtConfig, LibvirtHypervisor};
use wspare_rsync::manifest::{slot_file, Manifest, MANIFEST};

/// One look at both copies of one VM.
#[derive(Clone, Debug)]
pub(crate) struct Sample {
    pub(crate) vm: String,
    pub(crate) a: Option<VmState>,
    pub(crate) b: Option<VmState>,
}

/// Samples the VM's state on both hosts every 100 ms, on a thread of its
/// own, until dropped.
pub(crate) struct Sampler {
    pub(crate) samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub(crate) fn start(uris: [String; 2], vms: &[&str]) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let vms: Vec<VmName> = vms.iter().map(|v| VmName::new(*v).unwrap()).collect();
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let hv = |u: &str| {
                let mut c = LibvirtConfig::new(u);
                c.call_timeout = Duration::from_secs(3);
                LibvirtHypervisor::new(c).unwrap()
            };
            let (a, b) = (hv(&uris[0]), hv(&uris[1]));
            while !st.load(Ordering::SeqCst) {
                for vm in &vms {
                    let (ra, rb) = rt.block_on(async { tokio::join!(a.status(vm), b.status(vm)) });
                    s.lock().unwrap().push(Sample {
                        vm: vm.to_string(),
                        a: ra.ok().map(|x| x.state),
                        b: rb.ok().map(|x| x.state),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sampler {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// Samples in which both copies were live.
    pub(crate) fn both_live(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.a.is_some_and(|x| x.is_live()) && s.b.is_some_and(|x| x.is_live()))
            .cloned()
            .collect()
    }

    pub(crate) fn count(&self) -> usize {
        self.samples.lock().unwrap().len()
    }

    /// Asserts that no VM ever ran on both hosts at once so far.
    pub(crate) fn assert_never_twice(&self, when: &str) {
        let both = self.both_live();
        assert!(
            both.is_empty(),
            "{when}: VM {} ran on both hosts at once in {} of {} samples, first: {:?}",
            both.first().map(|b| b.vm.as_str()).unwrap_or(""),
            both.len(),
            self.count(),
            both.first()
        );
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// (host id, VM, generation) to the counter its image held.
pub(crate) type Seen = BTreeMap<(String, String, u64), u64>;

/// Every complete generation seen in a replica directory, with the
/// counter its image holds (read while it is listed and not yet used).
pub(crate) struct Snooper {
    /// (host id, VM, generation) to counter.
    pub(crate) seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Snooper {
    /// Watches `(host id, VM, replica directory)`s.
    pub(crate) fn start(dirs: Vec<(String, String, PathBuf)>) -> Snooper {
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                for (host, vm, dir) in &dirs {
                    let Ok(text) = std::fs::read_to_string(dir.join(MANIFEST)) else {
                        continue;
                    };
                    let Ok(m) = Manifest::parse(&text) else {
                        continue;
                    };
                    for g in &m.generations {
                        let key = (host.clone(), vm.clone(), g.generation.0);
                        if s.lock().unwrap().contains_key(&key) {
                            continue;
                        }
                        // A promoted slot may already run the VM: only
                        // generations seen before they are used count.
                        if m.promoted == Some(g.slot) {
                            continue;
                        }
                        let file = slot_file(dir, g.slot, &g.disks[0].file);
                        if let Ok(c) = wspare_testkit::guest::read_counter(&file) {
                            s.lock().unwrap().insert(key, c);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Snooper {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// The counter generation `g` of `vm` held on `host`, if it was seen.
    pub(crate) fn counter(&self, host: &str, vm: &str, g: u64) -> Option<u64> {
        self.seen
            .lock()
            .unwrap()
            .get(&(host.to_string(), vm.to_string(), g))
            .copied()
    }

    /// Waits (up to `timeout`) for the guest on `console` to boot and
    /// asserts it booted from generation `g` of `vm` held on `host`: its
    /// first counter is that generation's plus one. Returns the first
    /// counter, the generation's, and when the first was seen.
    pub(crate) fn assert_boot(
        &self,
        console: &Path,
        host: &str,
        vm: &str,
        g: u64,
        timeout: Duration,
    ) -> (u64, u64, Instant) {
        let (first, at) = first_counter(console, timeout);
        let want = self
            .counter(host, vm, g)
            .unwrap_or_else(|| panic!("the snooper never saw {vm}'s g{g} on {host}"));
        assert_eq!(
            first,
            want + 1,
            "{vm} must boot on {host} with g{g}'s counter ({want}) plus one"
        );
        (first, want, at)
    }

    /// How many generations were seen.
    pub(crate) fn generations(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for Snooper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The `WSPARE-COUNTER` values of a console log, in order.
pub(crate) fn counters(log: &Path) -> Vec<u64> {
    let guest = wspare_testkit::guest::read_console(log);
    wspare_testkit::guest::console_counters(&guest)
}

/// Waits for the first counter on a console (a booted guest); returns it
/// and when it was seen.
pub(crate) fn first_counter(log: &Path, timeout: Duration) -> (u64, Instant) {
    let t0 = Instant::now();
    loop {
        if let Some(c) = counters(log).first() {
            return (*c, Instant::now());
        }
        assert!(
            t0.elapsed() < timeout,
            "no WSPARE-COUNTER on {} within {timeout:?}; console:\n{}",
            log.display(),
            wspare_testkit::guest::read_console(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
