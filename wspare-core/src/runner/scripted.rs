//! [`ScriptedRunner`]: replays recorded tool output in tests.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::{Command, CommandError, CommandRunner, LineSink, LineSplitter, Output};

/// What a scripted command answers.
#[derive(Clone, Debug)]
pub struct Reply {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    delay: Duration,
    timeout: bool,
    spawn_error: bool,
}

impl Reply {
    /// Exit 0 with `stdout`.
    pub fn ok(stdout: impl Into<String>) -> Self {
        Reply::exit(0, stdout, "")
    }

    /// Exit `code` with `stdout` and `stderr`.
    pub fn exit(code: i32, stdout: impl Into<String>, stderr: impl Into<String>) -> Self {
        Reply {
            code: Some(code),
            stdout: stdout.into(),
            stderr: stderr.into(),
            delay: Duration::ZERO,
            timeout: false,
            spawn_error: false,
        }
    }

    /// Killed by a signal (rsync interrupted, say).
    pub fn killed(stdout: impl Into<String>, stderr: impl Into<String>) -> Self {
        Reply {
            code: None,
            ..Reply::exit(0, stdout, stderr)
        }
    }

    /// Hangs past the command's deadline.
    pub fn hang() -> Self {
        Reply {
            timeout: true,
            ..Reply::ok("")
        }
    }

    /// The program is not installed.
    pub fn not_installed() -> Self {
        Reply {
            spawn_error: true,
            ..Reply::ok("")
        }
    }

    /// Answers after `d` (tokio time, so paused clocks apply).
    pub fn after(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

struct Expectation {
    argv: Vec<String>,
    stdin: Option<String>,
    env: Vec<(String, String)>,
    reply: Reply,
}

/// A [`CommandRunner`] that checks each command against a script: the exact
/// argv, in order, and optionally stdin and environment; then answers with
/// the scripted [`Reply`]. It panics on an unexpected command, and when
/// dropped with replies unused, so a test cannot pass while a backend
/// skipped a step.
pub struct ScriptedRunner {
    name: String,
    script: Mutex<VecDeque<Expectation>>,
    seen: Mutex<Vec<Command>>,
}

impl Default for ScriptedRunner {
    fn default() -> Self {
        Self::new()
    }
}

impl ScriptedRunner {
    /// An empty script.
    pub fn new() -> Self {
        ScriptedRunner {
            name: "scripted".into(),
            script: Mutex::new(VecDeque::new()),
            seen: Mutex::new(Vec::new()),
        }
    }

    /// Expects `argv` next, answers `reply`.
    pub fn expect(self, argv: &[&str], reply: Reply) -> Self {
        self.push(argv, None, Vec::new(), reply);
        self
    }

    /// Expects `argv` with exactly `stdin` (secrets show as `<redacted>`).
    pub fn expect_stdin(self, argv: &[&str], stdin: &str, reply: Reply) -> Self {
        self.push(argv, Some(stdin.into()), Vec::new(), reply);
        self
    }

    /// Expects `argv` with these environment variables among its own
    /// (secret values show as `<redacted>`).
    pub fn expect_env(self, argv: &[&str], env: &[(&str, &str)], reply: Reply) -> Self {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.push(argv, None, env, reply);
        self
    }

    /// Adds an expectation through a shared reference (for runners already
    /// handed to a backend).
    pub fn push(
        &self,
        argv: &[&str],
        stdin: Option<String>,
        env: Vec<(String, String)>,
        reply: Reply,
    ) {
        self.script.lock().unwrap().push_back(Expectation {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            stdin,
            env,
            reply,
        });
    }

    /// Every command run so far.
    pub fn seen(&self) -> Vec<Command> {
        self.seen.lock().unwrap().clone()
    }

    /// Replies not used yet.
    pub fn remaining(&self) -> usize {
        self.script.lock().unwrap().len()
    }

    /// Panics unless every reply was used.
    pub fn assert_done(&self) {
        let left: Vec<String> = self
            .script
            .lock()
            .unwrap()
            .iter()
            .map(|e| super::DisplayArgv(e.argv.clone()).to_string())
            .collect();
        assert!(
            left.is_empty(),
            "scripted runner: {} replies never used: {left:#?}",
            left.len()
        );
    }
}

impl Drop for ScriptedRunner {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.assert_done();
        }
    }
}

#[async_trait]
impl CommandRunner for ScriptedRunner {
    fn describe(&self) -> String {
        self.name.clone()
    }

    async fn run_with(
        &self,
        cmd: &Command,
        on_line: Option<&mut LineSink<'_>>,
    ) -> Result<Output, CommandError> {
        self.seen.lock().unwrap().push(cmd.clone());
        let exp = self.script.lock().unwrap().pop_front();
        let Some(exp) = exp else {
            panic!("scripted runner: unexpected command `{cmd}` (script exhausted)");
        };
        assert_eq!(
            cmd.argv(),
            exp.argv,
            "scripted runner: argv differs.\n  got:      {cmd}\n  expected: {}",
            super::DisplayArgv(exp.argv.clone())
        );
        if let Some(stdin) = &exp.stdin {
            assert_eq!(
                cmd.stdin_redacted().as_deref(),
                Some(stdin.as_str()),
                "stdin of `{cmd}`"
            );
        }
        let env = cmd.env_redacted();
        for kv in &exp.env {
            assert!(
                env.contains(kv),
                "`{cmd}` lacks env {}={}; has {env:?}",
                kv.0,
                kv.1
            );
        }
        let r = exp.reply;
        if r.spawn_error {
            return Err(cmd.spawn_failed(std::io::Error::from(std::io::ErrorKind::NotFound)));
        }
        if r.timeout {
            tokio::time::sleep(cmd.get_timeout()).await;
            return Err(cmd.timed_out(r.stderr.as_bytes()));
        }
        if !r.delay.is_zero() {
            if r.delay >= cmd.get_timeout() {
                tokio::time::sleep(cmd.get_timeout()).await;
                return Err(cmd.timed_out(r.stderr.as_bytes()));
            }
            tokio::time::sleep(r.delay).await;
        }
        if let Some(sink) = on_line {
            let mut split = LineSplitter::default();
            split.feed(r.stdout.as_bytes(), sink);
            split.finish(sink);
        }
        cmd.finish(r.code, r.stdout.into_bytes(), r.stderr.into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::Secret;

    #[tokio::test]
    async fn replays_in_order_and_checks_argv() {
        let r = ScriptedRunner::new()
            .expect(&["drbdadm", "status"], Reply::ok("r0 role:Primary\n"))
            .expect(
                &["drbdadm", "down", "r0"],
                Reply::exit(10, "", "not configured"),
            );
        let out = r.run(&Command::new("drbdadm").arg("status")).await.unwrap();
        assert_eq!(out.stdout, "r0 role:Primary\n");
        let e = r
            .run(&Command::new("drbdadm").args(["down", "r0"]))
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), Some(10));
        r.assert_done();
    }

    #[tokio::test]
    #[should_panic(expected = "argv differs")]
    async fn wrong_argv_panics() {
        let r = ScriptedRunner::new().expect(&["xl", "list"], Reply::ok(""));
        let _ = r.run(&Command::new("xl").arg("info")).await;
    }

    #[test]
    #[should_panic(expected = "replies never used")]
    fn unused_reply_panics_on_drop() {
        let _r = ScriptedRunner::new().expect(&["xl", "list"], Reply::ok(""));
    }

    #[tokio::test]
    #[should_panic(expected = "script exhausted")]
    async fn extra_command_panics() {
        let r = ScriptedRunner::new();
        let _ = r.run(&Command::new("xl").arg("list")).await;
    }

    #[tokio::test(start_paused = true)]
    async fn hang_times_out_and_env_is_checked_redacted() {
        let r = ScriptedRunner::new().expect_env(
            &["ipmitool", "-E", "power", "status"],
            &[("IPMI_PASSWORD", "<redacted>")],
            Reply::hang(),
        );
        let cmd = Command::new("ipmitool")
            .args(["-E", "power", "status"])
            .secret_env("IPMI_PASSWORD", Secret::new("x"))
            .timeout(Duration::from_secs(5));
        let e = r.run(&cmd).await.unwrap_err();
        assert!(matches!(e, CommandError::Timeout { .. }));
    }
}
