//! [`SshRunner`]: runs commands on another host over OpenSSH.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

use super::command::{EnvValue, StdinData};
use super::quote::sh_quote;
use super::StdinPart;
use super::{Command, CommandError, CommandRunner, LineSink, LocalRunner, Output, Secret};
use crate::error::Error;

/// Where to ssh to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshTarget {
    /// `host` or `user@host`.
    pub destination: String,
    /// Port, if not 22.
    pub port: Option<u16>,
    /// Private key file.
    pub identity: Option<PathBuf>,
    /// Extra `-o` options (`StrictHostKeyChecking=yes`, `UserKnownHostsFile=...`).
    pub options: Vec<String>,
    /// How long ssh may take to connect.
    pub connect_timeout: Duration,
}

impl SshTarget {
    /// A target with defaults; the destination is validated (it must not be
    /// mistaken for an ssh option).
    pub fn new(destination: impl Into<String>) -> Result<Self, Error> {
        let destination = destination.into();
        let ok = !destination.is_empty()
            && !destination.starts_with('-')
            && destination
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-@:[]".contains(&b));
        if !ok {
            return Err(Error::invalid(format!(
                "invalid ssh destination {destination:?}: expected host or user@host"
            )));
        }
        Ok(SshTarget {
            destination,
            port: None,
            identity: None,
            options: Vec::new(),
            connect_timeout: Duration::from_secs(10),
        })
    }

    /// The `ssh` option words for this target, without the program name and
    /// the destination: `-o BatchMode=yes -o ConnectTimeout=<s>`, then
    /// `-p <port>`, `-i <identity>` and each extra `-o <option>` that is
    /// set. [`SshRunner`] puts them before `-- <destination>`; anything else
    /// that runs ssh to this target (rsync's `-e`) uses the same words.
    pub fn ssh_options(&self) -> Vec<String> {
        let mut args = vec![
            "-o".to_string(),
            "BatchMode=yes".into(),
            "-o".into(),
            format!("ConnectTimeout={}", self.connect_timeout.as_secs().max(1)),
        ];
        if let Some(p) = self.port {
            args.extend(["-p".into(), p.to_string()]);
        }
        if let Some(i) = &self.identity {
            args.extend(["-i".into(), i.display().to_string()]);
        }
        for o in &self.options {
            args.extend(["-o".into(), o.clone()]);
        }
        args
    }
}

/// Runs each command as `ssh ... destination -- 'quoted' 'argv'` through a
/// [`LocalRunner`]. The remote login shell must be POSIX (sh, bash, dash).
///
/// Each command is a new ssh session (about a second on a slow link, plus
/// the remote login shell's start-up). Backends that run many short
/// commands should set connection multiplexing in [`SshTarget::options`]:
/// `ControlMaster=auto`, `ControlPath=/run/wspare/ssh-%C`,
/// `ControlPersist=60`.
///
/// Secret environment variables travel on stdin, ahead of the command's own
/// stdin, and the remote shell `read`s them, so they never appear in any
/// argv, local or remote. ssh's own failures (exit 255) map to
/// `Unreachable`.
#[derive(Clone, Debug)]
pub struct SshRunner {
    target: SshTarget,
}

impl SshRunner {
    /// A runner for `target`.
    pub fn new(target: SshTarget) -> Self {
        SshRunner { target }
    }

    /// The local `ssh` command that runs `cmd` remotely.
    pub fn wrap(&self, cmd: &Command) -> Result<Command, Error> {
        let t = &self.target;
        let mut args = t.ssh_options();
        args.extend(["--".into(), t.destination.clone()]);

        let mut script = String::new();
        let mut secret_lines = String::new();
        let mut plain_env = Vec::new();
        for (k, v) in cmd.env_entries() {
            if !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') || k.is_empty() {
                return Err(Error::invalid(format!(
                    "invalid environment variable name {k:?}"
                )));
            }
            match v {
                EnvValue::Plain(s) => plain_env.push(format!("{k}={s}")),
                EnvValue::Secret(s) => {
                    if s.expose().contains('\n') {
                        return Err(Error::invalid(format!("secret for {k} contains a newline")));
                    }
                    script.push_str(&format!("IFS= read -r {k} && export {k} && "));
                    secret_lines.push_str(s.expose());
                    secret_lines.push('\n');
                }
            }
        }
        if let Some(d) = cmd.get_cwd() {
            script.push_str(&format!("cd {} && ", sh_quote(&d.display().to_string())));
        }
        script.push_str("exec ");
        if !plain_env.is_empty() {
            script.push_str("env ");
            for e in &plain_env {
                script.push_str(&sh_quote(e));
                script.push(' ');
            }
        }
        script.push_str(&super::quote::sh_join(&cmd.argv()));
        args.push(script);

        // Secret env values go first on stdin, each line read by the remote
        // shell; the command's own stdin follows.
        let stdin = if secret_lines.is_empty() {
            cmd.stdin_data().cloned()
        } else {
            let mut parts = vec![StdinPart::Secret(Secret::new(secret_lines))];
            match cmd.stdin_data() {
                None => {}
                Some(StdinData::Plain(b)) => {
                    parts.push(StdinPart::Plain(String::from_utf8_lossy(b).into_owned()))
                }
                Some(StdinData::Parts(p)) => parts.extend(p.iter().cloned()),
            }
            Some(StdinData::Parts(parts))
        };
        // `with_parts` keeps the original secrets for redaction.
        Ok(cmd.with_parts("ssh".into(), args, Vec::new(), stdin))
    }
}

#[async_trait]
impl CommandRunner for SshRunner {
    fn describe(&self) -> String {
        format!("ssh {}", self.target.destination)
    }

    async fn run_with(
        &self,
        cmd: &Command,
        on_line: Option<&mut LineSink<'_>>,
    ) -> Result<Output, CommandError> {
        let wrapped = self.wrap(cmd).map_err(|e| CommandError::Spawn {
            argv: super::DisplayArgv(cmd.argv()),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e.message().to_string()),
        })?;
        LocalRunner.run_with(&wrapped, on_line).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_words_of_a_target() {
        let mut t = SshTarget::new("root@node-b").unwrap();
        assert_eq!(
            t.ssh_options(),
            ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
        );
        t.port = Some(2222);
        t.identity = Some("/etc/wspare/id_ed25519".into());
        t.options = vec![
            "StrictHostKeyChecking=yes".into(),
            "ControlPersist=60".into(),
        ];
        t.connect_timeout = Duration::from_millis(200);
        assert_eq!(
            t.ssh_options(),
            [
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=1",
                "-p",
                "2222",
                "-i",
                "/etc/wspare/id_ed25519",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "ControlPersist=60"
            ]
        );
    }

    #[test]
    fn wraps_argv_quoted_with_secrets_on_stdin() {
        let mut t = SshTarget::new("root@node-b").unwrap();
        t.port = Some(2222);
        let r = SshRunner::new(t);
        let cmd = Command::new("ipmitool")
            .args(["-E", "chassis", "power", "status; reboot"])
            .env("LANG", "C")
            .secret_env("IPMI_PASSWORD", Secret::new("pw"));
        let w = r.wrap(&cmd).unwrap();
        let argv = w.argv();
        assert_eq!(
            &argv[..9],
            [
                "ssh",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=10",
                "-p",
                "2222",
                "--",
                "root@node-b"
            ]
        );
        assert_eq!(
            argv[9],
            "IFS= read -r IPMI_PASSWORD && export IPMI_PASSWORD && exec env LANG=C ipmitool -E chassis power 'status; reboot'"
        );
        assert!(!argv.iter().any(|a| a.contains("pw\n") || a == "pw"));
        assert_eq!(&*w.stdin_exposed().unwrap(), b"pw\n");
        assert_eq!(w.stdin_redacted().unwrap(), "<redacted>");
    }

    #[test]
    fn rejects_option_like_destinations() {
        for d in ["-oProxyCommand=x", "a b", "", "host;x"] {
            assert!(SshTarget::new(d).is_err(), "{d}");
        }
    }

    /// The wrapped remote script, run by a real local shell in place of ssh,
    /// receives the secret and the argv intact.
    #[tokio::test]
    async fn remote_script_runs_in_a_real_shell() {
        let r = SshRunner::new(SshTarget::new("h").unwrap());
        let cmd = Command::new("sh")
            .args([
                "-c",
                "printf '%s|%s|' \"$PW\" \"$1\"; cat",
                "x",
                "a'b $(id)",
            ])
            .secret_env("PW", Secret::new("p w"))
            .stdin("rest");
        let w = r.wrap(&cmd).unwrap();
        let script = w.argv().last().unwrap().clone();
        let local = w.with_parts(
            "sh".into(),
            vec!["-c".into(), script],
            vec![],
            w.stdin_data().cloned(),
        );
        let out = LocalRunner.run(&local).await.unwrap();
        // The secret arrived (and was redacted from the output on the way back).
        assert_eq!(out.stdout, "<redacted>|a'b $(id)|rest");
    }
}
