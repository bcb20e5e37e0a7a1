//! libvirt's domain states and reasons mapped onto [`VmStatus`].
//!
//! | libvirt state | [`VmState`] |
//! |---|---|
//! | running, blocked, no state | `Running` (an unknown state counts as live: it never yields a receipt) |
//! | paused | `Paused`; `ShuttingDown` when paused during shutdown; `Crashed` when paused by a guest crash |
//! | shutdown (in progress) | `ShuttingDown` |
//! | shut off (any reason, "crashed" included: the process is gone) | `ShutOff` |
//! | crashed (`on_crash='preserve'`: the process may remain) | `Crashed` |
//! | pmsuspended | `Suspended` |
//!
//! The reason is libvirt's, in `virsh domstate --reason` words.

use wspare_core::{VmState, VmStatus};

/// Maps a raw `virDomainState` and its reason.
pub fn map_state(state: u32, reason: i32) -> VmStatus {
    use virt::sys::*;
    let r = |words: &[&str]| -> String {
        usize::try_from(reason)
            .ok()
            .and_then(|i| words.get(i).copied())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("reason {reason}"))
    };
    let (state, reason) = match state {
        VIR_DOMAIN_NOSTATE => (VmState::Running, "no state".to_owned()),
        VIR_DOMAIN_RUNNING => (
            VmState::Running,
            r(&[
                "unknown",
                "booted",
                "migrated",
                "restored",
                "from snapshot",
                "unpaused",
                "migration canceled",
                "save canceled",
                "event wakeup",
                "crashed",
                "post-copy",
                "post-copy failed",
            ]),
        ),
        VIR_DOMAIN_BLOCKED => (VmState::Running, "blocked".to_owned()),
        VIR_DOMAIN_PAUSED => {
            let words = r(&[
                "unknown",
                "user",
                "migrating",
                "saving",
                "dumping",
                "I/O error",
                "watchdog",
                "from snapshot",
                "shutting down",
                "creating snapshot",
                "crashed",
                "starting up",
                "post-copy",
                "post-copy failed",
                "api error",
            ]);
            let state = if reason == VIR_DOMAIN_PAUSED_SHUTTING_DOWN as i32 {
                VmState::ShuttingDown
            } else if reason == VIR_DOMAIN_PAUSED_CRASHED as i32 {
                VmState::Crashed
            } else {
                VmState::Paused
            };
            (state, words)
        }
        VIR_DOMAIN_SHUTDOWN => (VmState::ShuttingDown, r(&["unknown", "user"])),
        VIR_DOMAIN_SHUTOFF => (
            VmState::ShutOff,
            r(&[
                "unknown",
                "shutdown",
                "destroyed",
                "crashed",
                "migrated",
                "saved",
                "failed",
                "from snapshot",
                "daemon",
            ]),
        ),
        VIR_DOMAIN_CRASHED => (VmState::Crashed, r(&["unknown", "panicked"])),
        VIR_DOMAIN_PMSUSPENDED => (VmState::Suspended, r(&["unknown"])),
        other => (VmState::Running, format!("unknown libvirt state {other}")),
    };
    VmStatus {
        state,
        reason: Some(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virt::sys::*;

    #[test]
    fn states_and_reasons() {
        let m = |s, r: u32| map_state(s, r as i32);
        assert_eq!(
            m(VIR_DOMAIN_RUNNING, VIR_DOMAIN_RUNNING_BOOTED).state,
            VmState::Running
        );
        assert_eq!(
            m(VIR_DOMAIN_RUNNING, VIR_DOMAIN_RUNNING_BOOTED)
                .reason
                .as_deref(),
            Some("booted")
        );
        let off = m(VIR_DOMAIN_SHUTOFF, VIR_DOMAIN_SHUTOFF_DESTROYED);
        assert_eq!(
            (off.state, off.reason.as_deref()),
            (VmState::ShutOff, Some("destroyed"))
        );
        let crashed_off = m(VIR_DOMAIN_SHUTOFF, VIR_DOMAIN_SHUTOFF_CRASHED);
        assert_eq!(
            (crashed_off.state, crashed_off.reason.as_deref()),
            (VmState::ShutOff, Some("crashed"))
        );
        assert_eq!(
            m(VIR_DOMAIN_CRASHED, VIR_DOMAIN_CRASHED_PANICKED).state,
            VmState::Crashed
        );
        assert_eq!(
            m(VIR_DOMAIN_PAUSED, VIR_DOMAIN_PAUSED_USER).state,
            VmState::Paused
        );
        assert_eq!(
            m(VIR_DOMAIN_PAUSED, VIR_DOMAIN_PAUSED_SHUTTING_DOWN).state,
            VmState::ShuttingDown
        );
        assert_eq!(
            m(VIR_DOMAIN_PAUSED, VIR_DOMAIN_PAUSED_CRASHED).state,
            VmState::Crashed
        );
        assert_eq!(
            m(VIR_DOMAIN_PAUSED, VIR_DOMAIN_PAUSED_IOERROR)
                .reason
                .as_deref(),
            Some("I/O error")
        );
        assert_eq!(
            m(VIR_DOMAIN_SHUTDOWN, VIR_DOMAIN_SHUTDOWN_USER).state,
            VmState::ShuttingDown
        );
        assert_eq!(m(VIR_DOMAIN_PMSUSPENDED, 0).state, VmState::Suspended);
        assert_eq!(m(VIR_DOMAIN_BLOCKED, 0).state, VmState::Running);
        // Unknown states and reasons are live, never a receipt.
        let u = map_state(99, 7);
        assert!(u.state.is_live(), "{u:?}");
        assert_eq!(
            map_state(VIR_DOMAIN_SHUTOFF, 42).reason.as_deref(),
            Some("reason 42")
        );
    }
}
