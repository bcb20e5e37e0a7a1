//! Any ClusterLabs fence agent (Debian package `fence-agents`: `fence_ipmilan`,
//! `fence_apc_snmp`, `fence_ilo`, `fence_redfish`, cloud agents...) through
//! its stdin `key=value` protocol.
//!
//! `fence` runs the agent with `action=off`, then with `action=status` until
//! it answers `Status: OFF` or the confirm deadline passes: the agent's own
//! "Success" is not taken as proof. `unfence` runs `action=on`, then reads
//! back on.
//!
//! The agent gets everything on stdin, nothing on its command line; the
//! password is one of those lines, a secret part of the stdin that the
//! runner redacts from any output on its own.
//! What the agent does with it is its own business: `fence_ipmilan` 4.12,
//! for one, hands it to ipmitool as `-P`, visible in the process table of
//! the machine it runs on. Use [`crate::ipmi`] for IPMI where that matters.

pub mod parse;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use wspare_core::runner::{Command, CommandRunner, Output, Secret, StdinPart};
use wspare_core::{FenceReceipt, FenceScope, Fencer, FencerCaps, NodeId, PowerState, Result};

use crate::confirm::{confirm_off, confirm_on, Timing};
use crate::error::{tool_failure, Exchange, FenceError, Op};

/// Option keys the adapter sets itself: an agent's options may not.
const RESERVED: &[&str] = &[
    "action", "option", "password", "passwd", "plug", "port", "nodename",
];

/// One fence device driven by a fence agent.
#[derive(Clone, Debug)]
pub struct AgentDevice {
    /// The agent: a name on `PATH` (`fence_ipmilan`) or an absolute path.
    pub agent: String,
    /// The agent's options as its stdin keys (`ip`, `username`, `lanplus`,
    /// `ssl_insecure`, `power_timeout`...), without `action`, `plug` and
    /// `password`, which the adapter sets.
    pub options: BTreeMap<String, String>,
    /// Sent as `password=...`.
    pub password: Option<Secret>,
    /// Whether the agent can power a node on (`action=on`); `false` for
    /// agents that only cut power or only watch (`fence_kdump`).
    pub unfence: bool,
    /// Deadlines and pacing. `command_timeout` bounds one agent run, so it
    /// must exceed the agent's own `power_timeout` plus its login time.
    pub timing: Timing,
}

impl AgentDevice {
    /// An agent with no options, no password, unfencing on, and a 60 s
    /// command timeout.
    pub fn new(agent: impl Into<String>) -> Self {
        AgentDevice {
            agent: agent.into(),
            options: BTreeMap::new(),
            password: None,
            unfence: true,
            timing: Timing {
                command_timeout: Duration::from_secs(60),
                ..Timing::default()
            },
        }
    }

    /// Adds an option.
    pub fn option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.insert(key.into(), value.into());
        self
    }

    /// Checks the agent name and options. `field` names the device in errors.
    pub fn validate(&self, field: &str) -> Result<(), FenceError> {
        let a = &self.agent;
        let name_ok = !a.is_empty()
            && !a.starts_with('-')
            && a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
            && (a.starts_with('/') || !a.contains('/'));
        if !name_ok {
            return Err(FenceError::config(
                format!("{field}.agent"),
                format!("{a:?} is not an agent name (fence_ipmilan) or an absolute path"),
            ));
        }
        for (k, v) in &self.options {
            let key_ok = !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !key_ok {
                return Err(FenceError::config(
                    format!("{field}.options.{k}"),
                    "option keys are lower-case letters, digits and '_'",
                ));
            }
            if RESERVED.contains(&k.as_str()) {
                return Err(FenceError::config(
                    format!("{field}.options.{k}"),
                    "set by the adapter: use password-file for the password and the node's plug for the plug",
                ));
            }
            if v.contains(['\n', '\r', '\0']) {
                return Err(FenceError::config(
                    format!("{field}.options.{k}"),
                    "a value cannot hold a line break",
                ));
            }
        }
        if let Some(p) = &self.password {
            if p.expose().contains(['\n', '\r', '\0']) {
                return Err(FenceError::config(
                    format!("{field}.password"),
                    "a password cannot hold a line break",
                ));
            }
        }
        Ok(())
    }
}

/// Fences nodes through one fence agent device; each node may have its own
/// plug (PDU outlet, VM name, blade). See the module docs.
pub struct FenceAgentFencer {
    name: String,
    device: AgentDevice,
    plugs: BTreeMap<NodeId, Option<String>>,
    runner: Arc<dyn CommandRunner>,
}

impl fmt::Debug for FenceAgentFencer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FenceAgentFencer")
            .field("device", &self.describe())
            .field("plugs", &self.plugs)
            .finish()
    }
}

impl FenceAgentFencer {
    /// A fencer named `name` (from the config), running the agent through
    /// `runner`. It serves no node until [`FenceAgentFencer::node`] adds one.
    pub fn new(
        name: impl Into<String>,
        device: AgentDevice,
        runner: Arc<dyn CommandRunner>,
    ) -> Result<Self, FenceError> {
        let name = name.into();
        device.validate(&format!("devices.{name}"))?;
        Ok(FenceAgentFencer {
            name,
            device,
            plugs: BTreeMap::new(),
            runner,
        })
    }

    /// Serves `node`, through `plug` if the device has several outlets.
    pub fn node(mut self, node: NodeId, plug: Option<String>) -> Result<Self, FenceError> {
        if let Some(p) = &plug {
            if p.is_empty() || p.contains(['\n', '\r', '\0']) {
                return Err(FenceError::config(
                    format!("nodes.{node}.plug"),
                    "a plug is a non-empty single line",
                ));
            }
        }
        self.plugs.insert(node, plug);
        Ok(self)
    }

    /// The stdin for `action` on `node` (`key=value` lines), the password
    /// as a secret part.
    pub fn stdin(&self, action: &str, plug: Option<&str>) -> Vec<StdinPart> {
        let mut s = String::new();
        s.push_str(&format!("action={action}\n"));
        for (k, v) in &self.device.options {
            s.push_str(&format!("{k}={v}\n"));
        }
        if let Some(p) = plug {
            s.push_str(&format!("plug={p}\n"));
        }
        let mut parts = Vec::new();
        if let Some(pw) = &self.device.password {
            s.push_str("password=");
            parts.push(StdinPart::Plain(s));
            parts.push(StdinPart::Secret(pw.clone()));
            parts.push(StdinPart::Plain("\n".into()));
        } else {
            parts.push(StdinPart::Plain(s));
        }
        parts
    }

    fn plug(&self, node: &NodeId) -> Result<Option<&str>, FenceError> {
        self.plugs
            .get(node)
            .map(Option::as_deref)
            .ok_or_else(|| FenceError::UnknownNode {
                device: self.describe(),
                node: node.clone(),
            })
    }

    fn asked(&self, action: &str, plug: Option<&str>) -> String {
        let mut keys: Vec<&str> = self.device.options.keys().map(String::as_str).collect();
        if plug.is_some() {
            keys.push("plug");
        }
        if self.device.password.is_some() {
            keys.push("password");
        }
        let plug = plug.map(|p| format!(" plug={p}")).unwrap_or_default();
        format!(
            "{} <<< action={action}{plug} (stdin keys: {})",
            self.device.agent,
            keys.join(", ")
        )
    }

    /// Runs the agent with `action` for `node` and reads its answer with
    /// `read`; `ok_codes` are the exit codes that are answers (a status's 2
    /// is `Status: OFF`).
    async fn run<T>(
        &self,
        node: &NodeId,
        op: Op,
        action: &str,
        ok_codes: &[i32],
        read: impl FnOnce(&Output) -> Result<T, String>,
    ) -> Result<T, FenceError> {
        let plug = self.plug(node)?;
        let cmd = Command::new(self.device.agent.clone())
            .stdin_parts(self.stdin(action, plug))
            .ok_exit_codes(ok_codes)
            .timeout(self.device.timing.command_timeout);
        let exchange = |reply: String| Exchange {
            device: self.describe(),
            node: node.clone(),
            op,
            asked: self.asked(action, plug),
            reply,
        };
        let out = self.runner.run(&cmd).await.map_err(|e| {
            tool_failure(
                e,
                exchange,
                |stdout, stderr| {
                    let summary = parse::summary(stderr);
                    match parse::cause(&format!("{stdout}\n{stderr}")) {
                        Some(cause) => format!("{summary} ({cause})"),
                        None => summary,
                    }
                },
                |stdout, stderr| match parse::classify(&format!("{stdout}\n{stderr}")) {
                    parse::Failure::Credentials => FenceError::CredentialsRefused,
                    parse::Failure::Usage => FenceError::Misconfigured,
                    parse::Failure::Unreachable => FenceError::Unreachable,
                    parse::Failure::NoAnswer => FenceError::NoAnswer,
                    parse::Failure::AnswerLost => FenceError::AnswerLost,
                    parse::Failure::NotChanged | parse::Failure::Other => FenceError::Refused,
                },
            )
        })?;
        read(&out).map_err(|why| FenceError::BadReply(exchange(why)))
    }

    async fn control(&self, node: &NodeId, op: Op, action: &str) -> Result<(), FenceError> {
        self.run(node, op, action, &[0], |o| parse::success(&o.stdout))
            .await
    }

    async fn status(&self, node: &NodeId) -> Result<PowerState, FenceError> {
        self.run(node, Op::PowerStatus, "status", &[0, 2], |o| {
            parse::status(&o.stdout, o.code)
        })
        .await
    }
}

#[async_trait]
impl Fencer for FenceAgentFencer {
    fn describe(&self) -> String {
        format!("fence-agent {} ({})", self.name, self.device.agent)
    }

    fn capabilities(&self) -> FencerCaps {
        FencerCaps {
            scope: FenceScope::Host,
            unfence: self.device.unfence,
        }
    }

    async fn fence(&self, node: &NodeId) -> Result<FenceReceipt> {
        self.plug(node)?;
        let off = self.control(node, Op::PowerOff, "off").await;
        let t = &self.device.timing;
        Ok(confirm_off(&self.describe(), node, t, off, || self.status(node)).await?)
    }

    async fn power_status(&self, node: &NodeId) -> Result<PowerState> {
        Ok(self.status(node).await?)
    }

    async fn unfence(&self, node: &NodeId) -> Result<()> {
        self.plug(node)?;
        if !self.device.unfence {
            return Err(wspare_core::Error::unsupported(format!(
                "{}: cannot power node {node} on: the device is configured with unfence = false",
                self.describe()
            )));
        }
        let on = self.control(node, Op::PowerOn, "on").await;
        let t = &self.device.timing;
        Ok(confirm_on(&self.describe(), node, t, on, || self.status(node)).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wspare_core::runner::{Reply, ScriptedRunner};
    use wspare_core::ErrorKind;

    macro_rules! rec {
        ($name:literal) => {
            include_str!(concat!("../../testdata/fence_ipmilan/", $name))
        };
    }

    fn node() -> NodeId {
        NodeId::new("node-a").unwrap()
    }

    fn device() -> AgentDevice {
        let mut d = AgentDevice::new("fence_ipmilan")
            .option("ip", "10.0.0.5")
            .option("username", "admin")
            .option("lanplus", "1")
            .option("verbose_level", "2");
        d.password = Some(Secret::new("s3cretpw"));
        d.timing = Timing {
            command_timeout: Duration::from_secs(30),
            confirm_timeout: Duration::from_secs(3),
            poll_interval: Duration::from_secs(1),
        };
        d
    }

    fn fencer(r: &Arc<ScriptedRunner>) -> FenceAgentFencer {
        FenceAgentFencer::new("ipmi-agent-a", device(), r.clone())
            .unwrap()
            .node(node(), None)
            .unwrap()
    }

    /// Stdin as tests see it: the password redacted.
    fn shown(parts: Vec<StdinPart>) -> String {
        Command::new("x")
            .stdin_parts(parts)
            .stdin_redacted()
            .unwrap()
    }

    #[test]
    fn stdin_is_key_value_lines_with_the_password_last() {
        let r = Arc::new(ScriptedRunner::new());
        let f = fencer(&r);
        assert_eq!(
            shown(f.stdin("off", None)),
            "action=off\nip=10.0.0.5\nlanplus=1\nusername=admin\nverbose_level=2\npassword=<redacted>\n"
        );
        assert_eq!(
            shown(f.stdin("status", Some("3"))),
            "action=status\nip=10.0.0.5\nlanplus=1\nusername=admin\nverbose_level=2\nplug=3\npassword=<redacted>\n"
        );
        assert!(
            matches!(&f.stdin("off", None)[1], StdinPart::Secret(p) if p.expose() == "s3cretpw")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fence_is_off_then_status_until_off_all_on_stdin() {
        let r = Arc::new(
            ScriptedRunner::new()
                .expect_stdin(
                    &["fence_ipmilan"],
                    "action=off\nip=10.0.0.5\nlanplus=1\nusername=admin\nverbose_level=2\npassword=<redacted>\n",
                    Reply::exit(0, rec!("off_ok.stdout"), rec!("off_ok.stderr")),
                )
                .expect(
                    &["fence_ipmilan"],
                    Reply::exit(2, rec!("status_off.stdout"), rec!("status_off.stderr")),
                ),
        );
        let receipt = fencer(&r).fence(&node()).await.unwrap();
        assert_eq!(
            receipt.to_string(),
            "node node-a read back off by fence-agent ipmi-agent-a (fence_ipmilan)"
        );
        let seen = r.seen();
        assert_eq!(seen[0].argv(), ["fence_ipmilan"]);
        assert_eq!(
            seen[1].stdin_redacted().as_deref(),
            Some("action=status\nip=10.0.0.5\nlanplus=1\nusername=admin\nverbose_level=2\npassword=<redacted>\n")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn agent_success_is_not_proof_stuck_on_gives_no_receipt() {
        let r = Arc::new(ScriptedRunner::new().expect(
            &["fence_ipmilan"],
            Reply::exit(1, rec!("stuck_off.stdout"), rec!("stuck_off.stderr")),
        ));
        for _ in 0..4 {
            r.push(
                &["fence_ipmilan"],
                None,
                vec![],
                Reply::exit(0, rec!("stuck_status.stdout"), ""),
            );
        }
        let e = fencer(&r).fence(&node()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        let m = e.message();
        assert!(
            m.starts_with("fence-agent ipmi-agent-a (fence_ipmilan): power off of node node-a failed (device reported failure:"),
            "{m}"
        );
        assert!(m.contains("Failed: Timed out waiting to power OFF"), "{m}");
        assert!(
            m.ends_with("within 3.0s (4 readings, last: on); no receipt"),
            "{m}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refused_password_is_permission_denied_with_its_cause() {
        let r = Arc::new(ScriptedRunner::new().expect(
            &["fence_ipmilan"],
            Reply::exit(
                1,
                rec!("wrong_password.stdout"),
                rec!("wrong_password.stderr"),
            ),
        ));
        let e = fencer(&r).fence(&node()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(!e.is_retryable());
        assert_eq!(
            e.message(),
            "credentials refused: fence-agent ipmi-agent-a (fence_ipmilan): power off of node node-a: asked \
             `fence_ipmilan <<< action=off (stdin keys: ip, lanplus, username, verbose_level, password)`, got: \
             exit code 1: Failed: Unable to obtain correct plug status or plug is not available (RAKP 2 HMAC is invalid); \
             check the user, password and privilege level configured for the device"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dead_device_is_a_timeout() {
        let r = Arc::new(ScriptedRunner::new().expect(
            &["fence_ipmilan"],
            Reply::exit(1, "", rec!("no_answer.stderr")),
        ));
        let e = fencer(&r).fence(&node()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(e.message().starts_with("no answer: "), "{}", e.message());
    }

    #[tokio::test(start_paused = true)]
    async fn an_echoed_password_is_redacted() {
        let r = Arc::new(ScriptedRunner::new().expect(
            &["fence_ipmilan"],
            Reply::exit(1, "", "ERROR: login as admin/s3cretpw refused\n"),
        ));
        let e = fencer(&r).power_status(&node()).await.unwrap_err();
        assert!(!e.to_string().contains("s3cretpw"), "{e}");
        assert!(e.to_string().contains("admin/<redacted>"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn plugs_per_node_and_unknown_nodes() {
        let r = Arc::new(
            ScriptedRunner::new().expect(&["fence_apc_snmp"], Reply::exit(0, "Status: ON\n", "")),
        );
        let f = FenceAgentFencer::new(
            "pdu-1",
            AgentDevice::new("fence_apc_snmp").option("ip", "10.0.0.9"),
            r.clone(),
        )
        .unwrap()
        .node(node(), Some("3".into()))
        .unwrap();
        assert_eq!(f.power_status(&node()).await.unwrap(), PowerState::On);
        assert_eq!(
            f.power_status(&NodeId::new("node-b").unwrap())
                .await
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            shown(f.stdin("status", Some("3"))),
            "action=status\nip=10.0.0.9\nplug=3\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unfence_is_on_then_status() {
        let r = Arc::new(
            ScriptedRunner::new()
                .expect(&["fence_ipmilan"], Reply::exit(0, rec!("on_ok.stdout"), ""))
                .expect(
                    &["fence_ipmilan"],
                    Reply::exit(0, rec!("status_on.stdout"), ""),
                ),
        );
        fencer(&r).unfence(&node()).await.unwrap();
    }

    #[tokio::test]
    async fn an_agent_without_unfence_says_so_and_runs_nothing() {
        let r = Arc::new(ScriptedRunner::new());
        let mut d = AgentDevice::new("fence_kdump");
        d.unfence = false;
        let f = FenceAgentFencer::new("kdump", d, r.clone())
            .unwrap()
            .node(node(), None)
            .unwrap();
        assert!(!f.capabilities().unfence);
        assert_eq!(
            f.unfence(&node()).await.unwrap_err().kind(),
            ErrorKind::Unsupported
        );
    }

    #[test]
    fn options_are_validated() {
        let r: Arc<dyn CommandRunner> = Arc::new(wspare_core::runner::LocalRunner);
        for (k, v, field) in [
            ("password", "x", "devices.a.options.password"),
            ("action", "on", "devices.a.options.action"),
            ("Ip", "x", "devices.a.options.Ip"),
            ("ip", "1\naction=on", "devices.a.options.ip"),
        ] {
            let e = FenceAgentFencer::new("a", AgentDevice::new("fence_x").option(k, v), r.clone())
                .unwrap_err();
            assert!(e.to_string().contains(field), "{e}");
        }
        for agent in ["", "-h", "../fence_x", "fence x"] {
            assert!(
                FenceAgentFencer::new("a", AgentDevice::new(agent), r.clone()).is_err(),
                "{agent}"
            );
        }
        assert!(
            FenceAgentFencer::new("a", AgentDevice::new("/usr/sbin/fence_ipmilan"), r.clone())
                .is_ok()
        );
        let f = FenceAgentFencer::new("a", AgentDevice::new("fence_x"), r).unwrap();
        assert!(f.node(node(), Some("1\naction=on".into())).is_err());
    }
}
