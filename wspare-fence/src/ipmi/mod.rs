//! IPMI fencing through the real `ipmitool -I lanplus`.
//!
//! `fence` runs `power off`, then `power status` until it reads off or the
//! confirm deadline passes; only a reading of off makes a receipt.
//! `unfence` runs `power on`, then reads back on.
//!
//! The password never goes on the command line: either `-E` with the
//! password in `IPMI_PASSWORD` (a [`Secret`] in the child's environment) or
//! `-f FILE` naming a file that holds it. ipmitool runs with `-v` so that a
//! refused password (`RAKP 2 HMAC is invalid`) can be told apart from a BMC
//! that does not answer; see [`parse::classify`].

pub mod parse;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use wspare_core::runner::{Command, CommandRunner, Secret};
use wspare_core::{FenceReceipt, FenceScope, Fencer, FencerCaps, NodeId, PowerState, Result};

use crate::confirm::{confirm_off, confirm_on, Timing};
use crate::error::{tool_failure, Exchange, FenceError, Op};

/// How ipmitool gets the password.
#[derive(Clone, Debug)]
pub enum IpmiPassword {
    /// Put in the child's `IPMI_PASSWORD`, read by `-E`.
    Env(Secret),
    /// A file holding the password, read by ipmitool's `-f FILE`; only the
    /// path goes on the command line.
    File(PathBuf),
}

/// The session privilege level (`-L`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Privilege {
    /// `CALLBACK`.
    Callback,
    /// `USER`.
    User,
    /// `OPERATOR`: enough for chassis power control on most BMCs.
    Operator,
    /// `ADMINISTRATOR` (ipmitool's default).
    Administrator,
}

impl Privilege {
    fn as_arg(self) -> &'static str {
        match self {
            Privilege::Callback => "CALLBACK",
            Privilege::User => "USER",
            Privilege::Operator => "OPERATOR",
            Privilege::Administrator => "ADMINISTRATOR",
        }
    }
}

/// One BMC reached over IPMI v2.0 (lanplus).
#[derive(Clone, Debug)]
pub struct IpmiDevice {
    /// BMC address or host name.
    pub host: String,
    /// UDP port (623).
    pub port: u16,
    /// IPMI user name (at most 16 bytes).
    pub username: String,
    /// The password, by environment or file.
    pub password: IpmiPassword,
    /// Session privilege level; `None` leaves ipmitool's default.
    pub privilege: Option<Privilege>,
    /// Cipher suite (`-C`); `None` lets ipmitool pick the best.
    pub cipher_suite: Option<u8>,
    /// Per-try timeout of one IPMI request (`-N`, whole seconds, at least 1).
    pub try_timeout: Duration,
    /// Retries of one IPMI request (`-R`).
    pub retries: u32,
    /// The ipmitool program.
    pub ipmitool: String,
    /// Deadlines and pacing.
    pub timing: Timing,
}

impl IpmiDevice {
    /// A BMC at `host`:623 with defaults: ipmitool's privilege and cipher
    /// suite, 3 s per try and 1 retry (a dead BMC fails in about 6 s),
    /// [`Timing::default`].
    pub fn new(
        host: impl Into<String>,
        username: impl Into<String>,
        password: IpmiPassword,
    ) -> Self {
        IpmiDevice {
            host: host.into(),
            port: 623,
            username: username.into(),
            password,
            privilege: None,
            cipher_suite: None,
            try_timeout: Duration::from_secs(3),
            retries: 1,
            ipmitool: "ipmitool".into(),
            timing: Timing::default(),
        }
    }

    /// Checks the values that go on ipmitool's command line. `field` names
    /// the device in errors (`devices.bmc-a`).
    pub fn validate(&self, field: &str) -> Result<(), FenceError> {
        let host_ok = !self.host.is_empty()
            && !self.host.starts_with('-')
            && self
                .host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b));
        if !host_ok {
            return Err(FenceError::config(
                format!("{field}.host"),
                format!("{:?} is not a host name or IP address", self.host),
            ));
        }
        if self.port == 0 {
            return Err(FenceError::config(format!("{field}.port"), "port 0"));
        }
        if self.username.is_empty()
            || self.username.len() > 16
            || self.username.chars().any(char::is_control)
        {
            return Err(FenceError::config(
                format!("{field}.username"),
                "an IPMI user name is 1 to 16 printable bytes",
            ));
        }
        if let IpmiPassword::Env(s) = &self.password {
            if s.expose().len() > 20 {
                return Err(FenceError::config(
                    format!("{field}.password"),
                    "an IPMI v2 password is at most 20 bytes",
                ));
            }
        }
        if self.try_timeout < Duration::from_secs(1) {
            return Err(FenceError::config(
                format!("{field}.try-timeout"),
                "at least 1s",
            ));
        }
        if self.ipmitool.is_empty() {
            return Err(FenceError::config(
                format!("{field}.ipmitool"),
                "empty program",
            ));
        }
        Ok(())
    }
}

/// Fences one node through its BMC with ipmitool. See the module docs.
pub struct IpmiFencer {
    name: String,
    node: NodeId,
    device: IpmiDevice,
    runner: Arc<dyn CommandRunner>,
}

impl fmt::Debug for IpmiFencer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IpmiFencer")
            .field("device", &self.describe())
            .field("node", &self.node)
            .finish()
    }
}

impl IpmiFencer {
    /// A fencer named `name` (from the config) for `node`'s BMC, running
    /// ipmitool through `runner` (local, or on a jump host over ssh).
    pub fn new(
        name: impl Into<String>,
        node: NodeId,
        device: IpmiDevice,
        runner: Arc<dyn CommandRunner>,
    ) -> Result<Self, FenceError> {
        let name = name.into();
        device.validate(&format!("devices.{name}"))?;
        Ok(IpmiFencer {
            name,
            node,
            device,
            runner,
        })
    }

    /// The ipmitool command for `power <action>`.
    pub fn command(&self, action: &str) -> Command {
        let d = &self.device;
        let mut c = Command::new(d.ipmitool.clone()).args([
            "-I",
            "lanplus",
            "-H",
            &d.host,
            "-p",
            &d.port.to_string(),
            "-U",
            &d.username,
        ]);
        c = match &d.password {
            IpmiPassword::Env(s) => c.arg("-E").secret_env("IPMI_PASSWORD", s.clone()),
            IpmiPassword::File(p) => c.args(["-f".to_string(), p.display().to_string()]),
        };
        if let Some(l) = d.privilege {
            c = c.args(["-L", l.as_arg()]);
        }
        if let Some(cs) = d.cipher_suite {
            c = c.args(["-C".to_string(), cs.to_string()]);
        }
        c.args([
            "-N".to_string(),
            d.try_timeout.as_secs().max(1).to_string(),
            "-R".to_string(),
            d.retries.to_string(),
            "-v".to_string(),
            "power".to_string(),
            action.to_string(),
        ])
        .timeout(d.timing.command_timeout)
    }

    fn check_node(&self, node: &NodeId) -> Result<(), FenceError> {
        if node == &self.node {
            Ok(())
        } else {
            Err(FenceError::UnknownNode {
                device: self.describe(),
                node: node.clone(),
            })
        }
    }

    /// Runs `power <action>` and reads its stdout with `read`.
    async fn run<T>(
        &self,
        op: Op,
        action: &str,
        read: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, FenceError> {
        let cmd = self.command(action);
        let exchange = |reply: String| Exchange {
            device: self.describe(),
            node: self.node.clone(),
            op,
            asked: cmd.to_string(),
            reply,
        };
        let out = self.runner.run(&cmd).await.map_err(|e| {
            tool_failure(
                e,
                exchange,
                |_, stderr| parse::meaningful(stderr),
                |_, stderr| match parse::classify(stderr) {
                    parse::Failure::Credentials => FenceError::CredentialsRefused,
                    parse::Failure::Cipher => FenceError::Misconfigured,
                    parse::Failure::Unreachable => FenceError::Unreachable,
                    parse::Failure::NoAnswer => FenceError::NoAnswer,
                    parse::Failure::AnswerLost => FenceError::AnswerLost,
                    parse::Failure::Other => FenceError::Refused,
                },
            )
        })?;
        read(&out.stdout).map_err(|why| FenceError::BadReply(exchange(why)))
    }

    async fn control(&self, op: Op, action: &str, expected: &str) -> Result<(), FenceError> {
        self.run(op, action, |out| parse::power_control(out, expected))
            .await
    }

    async fn status(&self) -> Result<PowerState, FenceError> {
        self.run(Op::PowerStatus, "status", parse::power_status)
            .await
    }
}

#[async_trait]
impl Fencer for IpmiFencer {
    fn describe(&self) -> String {
        format!(
            "ipmi {} ({}:{})",
            self.name, self.device.host, self.device.port
        )
    }

    fn capabilities(&self) -> FencerCaps {
        FencerCaps {
            scope: FenceScope::Host,
            unfence: true,
        }
    }

    async fn fence(&self, node: &NodeId) -> Result<FenceReceipt> {
        self.check_node(node)?;
        let off = self.control(Op::PowerOff, "off", "Down/Off").await;
        let t = &self.device.timing;
        Ok(confirm_off(&self.describe(), node, t, off, || self.status()).await?)
    }

    async fn power_status(&self, node: &NodeId) -> Result<PowerState> {
        self.check_node(node)?;
        Ok(self.status().await?)
    }

    async fn unfence(&self, node: &NodeId) -> Result<()> {
        self.check_node(node)?;
        let on = self.control(Op::PowerOn, "on", "Up/On").await;
        let t = &self.device.timing;
        Ok(confirm_on(&self.describe(), node, t, on, || self.status()).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wspare_core::runner::{Reply, ScriptedRunner};
    use wspare_core::{ErrorKind, Evidence};

    macro_rules! rec {
        ($name:literal) => {
            include_str!(concat!("../../testdata/ipmitool/", $name))
        };
    }

    const ARGV: &[&str] = &[
        "ipmitool", "-I", "lanplus", "-H", "10.0.0.5", "-p", "623", "-U", "admin", "-E", "-N", "3",
        "-R", "1", "-v", "power",
    ];

    fn argv(action: &'static str) -> Vec<&'static str> {
        let mut v = ARGV.to_vec();
        v.push(action);
        v
    }

    const PW: (&str, &str) = ("IPMI_PASSWORD", "<redacted>");

    fn node() -> NodeId {
        NodeId::new("node-a").unwrap()
    }

    fn device() -> IpmiDevice {
        let mut d = IpmiDevice::new(
            "10.0.0.5",
            "admin",
            IpmiPassword::Env(Secret::new("s3cretpw")),
        );
        d.timing = Timing {
            command_timeout: Duration::from_secs(10),
            confirm_timeout: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
        };
        d
    }

    fn fencer(runner: &Arc<ScriptedRunner>) -> IpmiFencer {
        IpmiFencer::new("bmc-a", node(), device(), runner.clone()).unwrap()
    }

    fn ok(stdout: &'static str, stderr: &'static str) -> Reply {
        Reply::exit(0, stdout, stderr)
    }

    #[tokio::test(start_paused = true)]
    async fn fence_is_off_then_status_until_off() {
        let r = Arc::new(
            ScriptedRunner::new()
                .expect_env(
                    &argv("off"),
                    &[PW],
                    ok(rec!("off_ok.stdout"), rec!("off_ok.stderr")),
                )
                .expect_env(
                    &argv("status"),
                    &[PW],
                    ok(rec!("status_on.stdout"), rec!("status_on.stderr")),
                )
                .expect_env(
                    &argv("status"),
                    &[PW],
                    ok(rec!("status_off.stdout"), rec!("status_off.stderr")),
                ),
        );
        let f = fencer(&r);
        let receipt = f.fence(&node()).await.unwrap();
        assert!(receipt.covers(&node(), &wspare_core::VmName::new("any").unwrap()));
        assert_eq!(
            receipt.evidence(),
            &Evidence::PowerReadBackOff {
                device: "ipmi bmc-a (10.0.0.5:623)".into()
            }
        );
        r.assert_done();
        for c in r.seen() {
            assert!(
                !c.argv().iter().any(|a| a.contains("s3cretpw")),
                "password in argv: {c}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn accepted_off_but_still_on_gives_no_receipt() {
        let r = Arc::new(ScriptedRunner::new().expect(
            &argv("off"),
            ok(rec!("stuck_off.stdout"), rec!("stuck_off.stderr")),
        ));
        // Readings at 0..=5 s, one a second.
        for _ in 0..6 {
            r.push(
                &argv("status"),
                None,
                vec![],
                ok(rec!("stuck_status.stdout"), rec!("stuck_status.stderr")),
            );
        }
        let e = fencer(&r).fence(&node()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert_eq!(
            e.message(),
            "ipmi bmc-a (10.0.0.5:623): power off of node node-a was accepted, but the power did not read \
             back off within 5.0s (6 readings, last: on); no receipt"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn wrong_password_is_permission_denied_after_one_call() {
        let r = Arc::new(ScriptedRunner::new().expect(
            &argv("off"),
            Reply::exit(1, "", rec!("wrong_password.stderr")),
        ));
        let e = fencer(&r).fence(&node()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(!e.is_retryable());
        assert_eq!(
            e.message(),
            "credentials refused: ipmi bmc-a (10.0.0.5:623): power off of node node-a: asked `ipmitool -I \
             lanplus -H 10.0.0.5 -p 623 -U admin -E -N 3 -R 1 -v power off`, got: exit code 1: RAKP 2 HMAC is \
             invalid; Error: Unable to establish IPMI v2 / RMCP+ session; \
             check the user, password and privilege level configured for the device"
        );
        r.assert_done();
    }

    #[tokio::test(start_paused = true)]
    async fn dead_bmc_is_a_timeout_without_status_polling() {
        let r = Arc::new(
            ScriptedRunner::new()
                .expect(&argv("off"), Reply::exit(1, "", rec!("no_answer.stderr"))),
        );
        let e = fencer(&r).fence(&node()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(
            e.message().starts_with("no answer: ipmi bmc-a"),
            "{}",
            e.message()
        );
        assert!(
            e.message().contains("Get Auth Capabilities error"),
            "{}",
            e.message()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_answer_to_off_is_settled_by_reading_back() {
        // Recorded: vbmc destroys the domain in ~1.3 s, ipmitool -N 1 gave up
        // on the answer, but the domain was off.
        let r = Arc::new(
            ScriptedRunner::new()
                .expect(
                    &argv("off"),
                    Reply::exit(1, "", rec!("off_answer_lost.stderr")),
                )
                .expect(
                    &argv("status"),
                    ok(
                        rec!("status_after_lost_answer.stdout"),
                        rec!("status_after_lost_answer.stderr"),
                    ),
                ),
        );
        assert!(fencer(&r).fence(&node()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn killed_at_the_deadline_is_a_lost_answer_then_read_back() {
        let r = Arc::new(
            ScriptedRunner::new()
                .expect(&argv("off"), Reply::hang())
                .expect(&argv("status"), Reply::hang()),
        );
        let t0 = tokio::time::Instant::now();
        let e = fencer(&r).fence(&node()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(
            e.message()
                .contains("power off of node node-a failed (answer lost:"),
            "{}",
            e.message()
        );
        assert!(
            e.message()
                .contains("(1 readings, last: error: answer lost:"),
            "{}",
            e.message()
        );
        // 10 s for the off, then one reading that hangs its 10 s and ends
        // past the 5 s read-back window: bounded, never hangs.
        assert_eq!(t0.elapsed(), Duration::from_secs(20));
    }

    #[tokio::test(start_paused = true)]
    async fn missing_ipmitool_is_not_retryable() {
        let r = Arc::new(ScriptedRunner::new().expect(&argv("status"), Reply::not_installed()));
        let e = fencer(&r).power_status(&node()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Backend);
        assert!(!e.is_retryable());
    }

    #[tokio::test(start_paused = true)]
    async fn unfence_is_on_then_status_until_on() {
        let r = Arc::new(
            ScriptedRunner::new()
                .expect(&argv("on"), ok(rec!("on_ok.stdout"), rec!("on_ok.stderr")))
                .expect(&argv("status"), ok(rec!("status_on.stdout"), "")),
        );
        fencer(&r).unfence(&node()).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_node_is_not_found_and_runs_nothing() {
        let r = Arc::new(ScriptedRunner::new());
        let f = fencer(&r);
        let other = NodeId::new("node-b").unwrap();
        assert_eq!(
            f.fence(&other).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            f.power_status(&other).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            f.unfence(&other).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }

    #[tokio::test(start_paused = true)]
    async fn password_file_privilege_and_cipher_options() {
        let mut d = device();
        d.password = IpmiPassword::File("/etc/wspare/bmc-a.pw".into());
        d.privilege = Some(Privilege::Operator);
        d.cipher_suite = Some(17);
        d.port = 16230;
        let r = Arc::new(ScriptedRunner::new().expect(
            &[
                "ipmitool",
                "-I",
                "lanplus",
                "-H",
                "10.0.0.5",
                "-p",
                "16230",
                "-U",
                "admin",
                "-f",
                "/etc/wspare/bmc-a.pw",
                "-L",
                "OPERATOR",
                "-C",
                "17",
                "-N",
                "3",
                "-R",
                "1",
                "-v",
                "power",
                "status",
            ],
            ok(rec!("status_off.stdout"), ""),
        ));
        let f = IpmiFencer::new("bmc-a", node(), d, r.clone()).unwrap();
        assert_eq!(f.power_status(&node()).await.unwrap(), PowerState::Off);
        assert!(r.seen()[0].env_redacted().is_empty());
    }

    #[test]
    fn validation_names_the_field() {
        let r: Arc<dyn CommandRunner> = Arc::new(wspare_core::runner::LocalRunner);
        let mut d = device();
        d.host = "-oProxyCommand=x".into();
        let e = IpmiFencer::new("bmc-a", node(), d, r.clone()).unwrap_err();
        assert_eq!(e.to_string(), "invalid fence config: devices.bmc-a.host: \"-oProxyCommand=x\" is not a host name or IP address");
        let mut d = device();
        d.username = "a-very-long-user-name".into();
        assert!(IpmiFencer::new("bmc-a", node(), d, r.clone())
            .unwrap_err()
            .to_string()
            .contains("devices.bmc-a.username"));
        let mut d = device();
        d.try_timeout = Duration::from_millis(500);
        assert!(IpmiFencer::new("bmc-a", node(), d, r)
            .unwrap_err()
            .to_string()
            .contains("try-timeout"));
    }

    #[test]
    fn debug_never_shows_the_password() {
        let f = IpmiFencer::new(
            "bmc-a",
            node(),
            device(),
            Arc::new(wspare_core::runner::LocalRunner),
        )
        .unwrap();
        assert!(!format!("{f:?}").contains("s3cretpw"));
        assert!(!format!("{:?}", device()).contains("s3cretpw"));
        assert!(!format!("{:?}", f.command("off")).contains("s3cretpw"));
    }
}
