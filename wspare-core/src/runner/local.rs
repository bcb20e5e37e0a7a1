//! [`LocalRunner`]: runs commands on this host.

use std::process::Stdio;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{Command, CommandError, CommandRunner, LineSink, LineSplitter, Output};

/// Runs commands on this host with tokio. The child gets its own process
/// group, and the whole group is killed at the deadline or when the future
/// is dropped, so a tool's own children (rsync's ssh) die with it.
///
/// The kill is finished when control returns: on Linux the runner waits
/// (up to 2 s) until no process of the group still runs, so a
/// fence command that timed out cannot act later, and a stopped copy
/// writes nothing after its caller was told it stopped. A process of the
/// group that has exited but is not yet reaped (a zombie) runs nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalRunner;

/// Kills a process group unless disarmed.
struct GroupKill(Option<u32>);

impl GroupKill {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            kill_group(pgid);
            // Blocking, but SIGKILLed processes exit within milliseconds;
            // only a process stuck in the kernel (a hung NFS write) makes
            // this wait its bound.
            if !wait_group_gone(pgid, KILL_WAIT) {
                tracing::warn!(
                    pgid,
                    "processes of a killed command still run after {KILL_WAIT:?}"
                );
            }
        }
    }
}

/// How long a kill waits for the killed processes to be gone.
const KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits until no process in group `pgid` still runs, polling `/proc`;
/// false if some still does after `bound`.
#[cfg(target_os = "linux")]
fn wait_group_gone(pgid: u32, bound: std::time::Duration) -> bool {
    let t0 = std::time::Instant::now();
    loop {
        if !group_runs(pgid) {
            return true;
        }
        if t0.elapsed() >= bound {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[cfg(not(target_os = "linux"))]
fn wait_group_gone(_pgid: u32, _bound: std::time::Duration) -> bool {
    true
}

/// Whether a process in group `pgid` is alive and not a zombie.
#[cfg(target_os = "linux")]
fn group_runs(pgid: u32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            return false;
        };
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| stat_state_and_group(&s))
            .is_some_and(|(state, group)| group == pgid && !matches!(state, 'Z' | 'X'))
    })
}

/// State and process group from a `/proc/PID/stat` line: `PID (COMM) S
/// PPID PGRP …`; COMM may hold spaces and parentheses, so fields are
/// counted from the last `)`.
fn stat_state_and_group(stat: &str) -> Option<(char, u32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace();
    let state = f.next()?.chars().next()?;
    let _ppid = f.next()?;
    let pgrp = f.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// Sends SIGKILL to process group `pgid`.
#[allow(unsafe_code)]
fn kill_group(pgid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; a negative pid
    // addresses the process group this runner created with process_group(0)
    // and has not yet reaped.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

async fn read_all(
    mut r: impl AsyncRead + Unpin,
    buf: &mut Vec<u8>,
    mut sink: Option<&mut LineSink<'_>>,
) -> std::io::Result<()> {
    let mut chunk = [0u8; 8192];
    let mut split = LineSplitter::default();
    loop {
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            if let Some(s) = sink.as_deref_mut() {
                split.finish(s);
            }
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(s) = sink.as_deref_mut() {
            split.feed(&chunk[..n], s);
        }
    }
}

#[async_trait]
impl CommandRunner for LocalRunner {
    fn describe(&self) -> String {
        "local".into()
    }

    async fn run_with(
        &self,
        cmd: &Command,
        on_line: Option<&mut LineSink<'_>>,
    ) -> Result<Output, CommandError> {
        let mut c = tokio::process::Command::new(cmd.program());
        c.args(cmd.get_args())
            .stdin(if cmd.stdin_exposed().is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        for (k, v) in cmd.env_exposed() {
            c.env(k, v);
        }
        if let Some(d) = cmd.get_cwd() {
            c.current_dir(d);
        }
        tracing::debug!(command = %cmd, "running");
        let mut child = c.spawn().map_err(|e| cmd.spawn_failed(e))?;
        let mut guard = GroupKill(child.id());
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut out = Vec::new();
        let mut err = Vec::new();
        let io_err = |e| CommandError::Io {
            argv: super::DisplayArgv(cmd.argv()),
            source: e,
        };
        let work = async {
            let write = async {
                if let (Some(mut s), Some(data)) = (stdin, cmd.stdin_exposed()) {
                    // A child that exits without reading all of stdin is not our error.
                    let _ = s.write_all(&data).await;
                    let _ = s.shutdown().await;
                }
            };
            let (_, ro, re) = tokio::join!(
                write,
                read_all(stdout, &mut out, on_line),
                read_all(stderr, &mut err, None)
            );
            ro?;
            re?;
            child.wait().await
        };
        match tokio::time::timeout(cmd.get_timeout(), work).await {
            Ok(Ok(status)) => {
                guard.disarm();
                cmd.finish(status.code(), out, err)
            }
            Ok(Err(e)) => Err(io_err(e)),
            // `guard` kills the group as it drops.
            Err(_) => Err(cmd.timed_out(&err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, ErrorKind};
    use crate::runner::Secret;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn runs_and_captures() {
        let out = LocalRunner
            .run(&Command::new("sh").args(["-c", "echo out; echo err >&2"]))
            .await
            .unwrap();
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
    }

    #[tokio::test]
    async fn failure_carries_argv_code_and_stderr_tail() {
        let e = LocalRunner
            .run(&Command::new("sh").args(["-c", "echo boom >&2; exit 3"]))
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), Some(3));
        assert_eq!(
            e.to_string(),
            "`sh -c 'echo boom >&2; exit 3'` failed with exit code 3; stderr: boom"
        );
        assert_eq!(Error::from(e).kind(), ErrorKind::Backend);
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let e = LocalRunner
            .run(&Command::new("/nonexistent/tool"))
            .await
            .unwrap_err();
        assert!(matches!(e, CommandError::Spawn { .. }));
        assert!(e.to_string().contains("cannot run `/nonexistent/tool`"));
        assert!(!Error::from(e).is_retryable());
    }

    #[tokio::test]
    async fn deadline_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // The grandchild records its pid, then sleeps.
        let script = format!("sh -c 'echo $$ > {}; sleep 30' & wait", pidfile.display());
        let t0 = Instant::now();
        let e = LocalRunner
            .run(
                &Command::new("sh")
                    .args(["-c", &script])
                    .timeout(Duration::from_millis(300)),
            )
            .await
            .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(Error::from(e).kind(), ErrorKind::Timeout);
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // No grace period: the kill is finished when the call returns.
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ");
        assert!(!alive, "grandchild {pid} survived the deadline");
    }

    #[tokio::test]
    async fn dropping_the_future_kills_the_child() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let cmd = Command::new("sh").args([
            "-c",
            &format!("echo $$ > {}; exec sleep 30", pidfile.display()),
        ]);
        let fut = LocalRunner.run(&cmd);
        let _ = tokio::time::timeout(Duration::from_millis(300), fut).await;
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "child {pid} survived: {stat}"
        );
    }

    /// A busy grandchild whose parent has already exited (it holds stdout
    /// open, so the call waits on it): dropping the call finds and kills it
    /// through its group, and returns only once it no longer runs.
    #[tokio::test]
    async fn dropping_the_future_waits_for_the_grandchildren() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "sh -c 'echo $$ > {}; while :; do :; done' &",
            pidfile.display()
        );
        let cmd = Command::new("sh").args(["-c", &script]);
        let fut = LocalRunner.run(&cmd);
        let _ = tokio::time::timeout(Duration::from_millis(500), fut).await;
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
        assert!(
            stat.is_empty() || stat_state_and_group(&stat).is_some_and(|(s, _)| s == 'Z'),
            "grandchild {pid} still runs: {stat}"
        );
    }

    #[test]
    fn stat_lines_with_hostile_command_names_parse() {
        assert_eq!(
            stat_state_and_group("42 (rsync) R 1 42 42 0 -1"),
            Some(('R', 42))
        );
        assert_eq!(
            stat_state_and_group("7 (a) Z (b) S 3 99 1"),
            Some(('S', 99))
        );
        assert_eq!(stat_state_and_group("7 (x"), None);
        assert_eq!(stat_state_and_group("7 (x) S 1 notanumber"), None);
    }

    #[tokio::test]
    async fn secrets_go_by_env_and_stdin_and_are_redacted() {
        let cmd = Command::new("sh")
            .args([
                "-c",
                "echo \"env=$PW\"; read line; echo \"stdin=$line\" >&2; exit 1",
            ])
            .secret_env("PW", Secret::new("topsecret"))
            .secret_stdin(Secret::new("alsosecret\n"));
        let e = LocalRunner.run(&cmd).await.unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("stdin=<redacted>"), "{msg}");
        assert!(!msg.contains("secret"), "{msg}");
        let CommandError::Exit { stdout, .. } = e else {
            panic!()
        };
        assert_eq!(stdout, "env=<redacted>\n");
    }

    #[tokio::test]
    async fn streams_lines_and_accepts_extra_codes() {
        let mut lines = Vec::new();
        let mut sink = |l: &str| lines.push(l.to_string());
        let out = LocalRunner
            .run_with(
                &Command::new("sh")
                    .args(["-c", "printf '1%%\\r2%%\\rdone\\n'; exit 24"])
                    .ok_exit_codes(&[24]),
                Some(&mut sink),
            )
            .await
            .unwrap();
        assert_eq!(out.code, 24);
        assert_eq!(lines, ["1%", "2%", "done"]);
    }
}
