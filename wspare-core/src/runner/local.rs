//! [`LocalRunner`]: runs commands on this host.

use std::process::Stdio;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{Command, CommandError, CommandRunner, LineSink, LineSplitter, Output};

/// Runs commands on this host with tokio. The child gets its own process
/// group, and the whole group is killed at the deadline or when the future
/// is dropped, so a tool's own children (rsync's ssh) die with it.
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
        }
    }
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
        // Give the kernel a moment to reap.
        tokio::time::sleep(Duration::from_millis(100)).await;
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
        tokio::time::sleep(Duration::from_millis(100)).await;
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
