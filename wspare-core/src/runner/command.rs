//! [`Command`]: what to run, as an argv; and [`Output`] / [`CommandError`].

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{BackendError, ErrorKind};
use crate::runner::secret::{redact, Secret};

/// How much of stderr an error keeps.
pub const STDERR_TAIL_BYTES: usize = 2048;

/// A command: program, arguments, environment, stdin, deadline. Never a
/// shell string.
#[derive(Clone)]
pub struct Command {
    program: String,
    args: Vec<String>,
    env: Vec<(String, EnvValue)>,
    stdin: Option<StdinData>,
    timeout: Duration,
    cwd: Option<PathBuf>,
    ok_codes: Vec<i32>,
    /// Secrets that travel inside stdin or env in another form (the ssh
    /// wrapper's stdin) but must still be redacted one by one.
    also_redact: Vec<Secret>,
}

#[derive(Clone)]
pub(crate) enum EnvValue {
    Plain(String),
    Secret(Secret),
}

#[derive(Clone)]
pub(crate) enum StdinData {
    Plain(Vec<u8>),
    Parts(Vec<StdinPart>),
}

/// A piece of a command's stdin: plain text, or a secret (redacted when
/// shown, and redacted on its own from any output).
#[derive(Clone, Debug)]
pub enum StdinPart {
    /// Shown as is.
    Plain(String),
    /// Shown as `<redacted>`.
    Secret(Secret),
}

impl Command {
    /// `program` with no arguments, a 60 s deadline, exit code 0 as success.
    pub fn new(program: impl Into<String>) -> Self {
        Command {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            stdin: None,
            timeout: Duration::from_secs(60),
            cwd: None,
            ok_codes: vec![0],
            also_redact: Vec::new(),
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.push((k.into(), EnvValue::Plain(v.into())));
        self
    }

    /// Sets an environment variable holding a secret (ipmitool's
    /// `IPMI_PASSWORD`, say).
    pub fn secret_env(mut self, k: impl Into<String>, v: Secret) -> Self {
        self.env.push((k.into(), EnvValue::Secret(v)));
        self
    }

    /// Feeds `data` on stdin.
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(StdinData::Plain(data.into()));
        self
    }

    /// Feeds a secret on stdin (fence agents' `key=value` protocol).
    pub fn secret_stdin(mut self, data: Secret) -> Self {
        self.stdin = Some(StdinData::Parts(vec![StdinPart::Secret(data)]));
        self
    }

    /// Feeds stdin made of plain and secret parts (a fence agent's
    /// `key=value` lines with a password among them): each secret is
    /// redacted on its own from output, and tests see the plain parts.
    pub fn stdin_parts(mut self, parts: Vec<StdinPart>) -> Self {
        self.stdin = Some(StdinData::Parts(parts));
        self
    }

    /// Also redacts `s` from any output that reaches an error.
    pub fn redact_also(mut self, s: Secret) -> Self {
        self.also_redact.push(s);
        self
    }

    /// The deadline: the child is killed when it passes.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Working directory.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Exit codes that count as success besides 0 (rsync's 24, a fence
    /// agent's 2 for "off").
    pub fn ok_exit_codes(mut self, codes: &[i32]) -> Self {
        self.ok_codes = codes.to_vec();
        if !self.ok_codes.contains(&0) {
            self.ok_codes.push(0);
        }
        self
    }

    /// The program.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// The arguments.
    pub fn get_args(&self) -> &[String] {
        &self.args
    }

    /// Program and arguments. Safe to log: secrets never go here.
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(self.program.clone())
            .chain(self.args.iter().cloned())
            .collect()
    }

    /// The deadline.
    pub fn get_timeout(&self) -> Duration {
        self.timeout
    }

    /// The working directory.
    pub fn get_cwd(&self) -> Option<&PathBuf> {
        self.cwd.as_ref()
    }

    /// Environment, with secret values exposed: only for the runner that
    /// spawns the child.
    pub(crate) fn env_exposed(&self) -> impl Iterator<Item = (&str, &str)> {
        self.env.iter().map(|(k, v)| {
            (
                k.as_str(),
                match v {
                    EnvValue::Plain(s) => s.as_str(),
                    EnvValue::Secret(s) => s.expose(),
                },
            )
        })
    }

    /// Environment variable names with values, secret values redacted.
    pub fn env_redacted(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    match v {
                        EnvValue::Plain(s) => s.clone(),
                        EnvValue::Secret(_) => "<redacted>".into(),
                    },
                )
            })
            .collect()
    }

    /// Stdin bytes, secrets exposed: only for the runner.
    pub(crate) fn stdin_exposed(&self) -> Option<std::borrow::Cow<'_, [u8]>> {
        use std::borrow::Cow;
        self.stdin.as_ref().map(|s| match s {
            StdinData::Plain(b) => Cow::Borrowed(b.as_slice()),
            StdinData::Parts(parts) => {
                let mut v = Vec::new();
                for p in parts {
                    match p {
                        StdinPart::Plain(t) => v.extend_from_slice(t.as_bytes()),
                        StdinPart::Secret(s) => v.extend_from_slice(s.expose().as_bytes()),
                    }
                }
                Cow::Owned(v)
            }
        })
    }

    /// Stdin as a test may assert it: plain data as text, a secret as
    /// `<redacted>`.
    pub fn stdin_redacted(&self) -> Option<String> {
        self.stdin.as_ref().map(|s| match s {
            StdinData::Plain(b) => String::from_utf8_lossy(b).into_owned(),
            StdinData::Parts(parts) => parts
                .iter()
                .map(|p| match p {
                    StdinPart::Plain(t) => t.as_str(),
                    StdinPart::Secret(_) => "<redacted>",
                })
                .collect(),
        })
    }

    pub(crate) fn secrets(&self) -> Vec<&Secret> {
        let mut v: Vec<&Secret> = self
            .env
            .iter()
            .filter_map(|(_, v)| match v {
                EnvValue::Secret(s) => Some(s),
                EnvValue::Plain(_) => None,
            })
            .collect();
        if let Some(StdinData::Parts(parts)) = &self.stdin {
            v.extend(parts.iter().filter_map(|p| match p {
                StdinPart::Secret(s) => Some(s),
                StdinPart::Plain(_) => None,
            }));
        }
        v.extend(self.also_redact.iter());
        v
    }

    pub(crate) fn env_entries(&self) -> &[(String, EnvValue)] {
        &self.env
    }

    pub(crate) fn stdin_data(&self) -> Option<&StdinData> {
        self.stdin.as_ref()
    }

    pub(crate) fn with_parts(
        &self,
        program: String,
        args: Vec<String>,
        env: Vec<(String, EnvValue)>,
        stdin: Option<StdinData>,
    ) -> Command {
        Command {
            program,
            args,
            env,
            stdin,
            timeout: self.timeout,
            cwd: None,
            ok_codes: self.ok_codes.clone(),
            also_redact: self.secrets().into_iter().cloned().collect(),
        }
    }

    /// Turns a finished child's results into `Ok(Output)` or the error,
    /// by the accepted exit codes. Every runner ends here.
    pub fn finish(
        &self,
        code: Option<i32>,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
    ) -> Result<Output, CommandError> {
        let secrets = self.secrets();
        let stdout = redact(&String::from_utf8_lossy(&stdout), &secrets);
        let stderr = redact(&String::from_utf8_lossy(&stderr), &secrets);
        match code {
            Some(c) if self.ok_codes.contains(&c) => Ok(Output {
                code: c,
                stdout,
                stderr,
            }),
            _ => Err(CommandError::Exit {
                argv: DisplayArgv(self.argv()),
                code,
                stderr_tail: tail(&stderr, STDERR_TAIL_BYTES),
                stdout,
            }),
        }
    }

    pub(crate) fn timed_out(&self, stderr: &[u8]) -> CommandError {
        let stderr = redact(&String::from_utf8_lossy(stderr), &self.secrets());
        CommandError::Timeout {
            argv: DisplayArgv(self.argv()),
            after: self.timeout,
            stderr_tail: tail(&stderr, STDERR_TAIL_BYTES),
        }
    }

    pub(crate) fn spawn_failed(&self, e: std::io::Error) -> CommandError {
        CommandError::Spawn {
            argv: DisplayArgv(self.argv()),
            source: e,
        }
    }
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Command")
            .field("argv", &self.argv())
            .field("env", &self.env_redacted())
            .field("stdin", &self.stdin_redacted())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        DisplayArgv(self.argv()).fmt(f)
    }
}

/// An argv shown as a shell would need it quoted, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DisplayArgv(pub Vec<String>);

impl fmt::Display for DisplayArgv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let quoted: Vec<String> = self
            .0
            .iter()
            .map(|a| crate::runner::quote::sh_quote(a))
            .collect();
        f.write_str(&quoted.join(" "))
    }
}

/// What a finished command printed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// Exit code (one of the accepted ones).
    pub code: i32,
    /// Standard output (lossy UTF-8, secrets redacted).
    pub stdout: String,
    /// Standard error (lossy UTF-8, secrets redacted).
    pub stderr: String,
}

/// A command that could not run or did not succeed. Carries the argv, the
/// exit status and the tail of stderr; never a secret.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program could not be started.
    #[error("cannot run `{argv}`: {source}")]
    Spawn {
        /// The command.
        argv: DisplayArgv,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The deadline passed; the child was killed.
    #[error("`{argv}` did not finish within {after:?} and was killed{}", fmt_tail(.stderr_tail))]
    Timeout {
        /// The command.
        argv: DisplayArgv,
        /// The deadline.
        after: Duration,
        /// The end of its stderr.
        stderr_tail: String,
    },
    /// It exited with a code that does not count as success, or by a signal.
    #[error("`{argv}` failed with {}{}", fmt_code(.code), fmt_tail(.stderr_tail))]
    Exit {
        /// The command.
        argv: DisplayArgv,
        /// Exit code, `None` if killed by a signal.
        code: Option<i32>,
        /// The end of its stderr.
        stderr_tail: String,
        /// Its whole stdout, for parsers that read error details there.
        stdout: String,
    },
    /// Reading its output failed.
    #[error("I/O error talking to `{argv}`: {source}")]
    Io {
        /// The command.
        argv: DisplayArgv,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn fmt_code(code: &Option<i32>) -> String {
    match code {
        Some(c) => format!("exit code {c}"),
        None => "a signal".into(),
    }
}

fn fmt_tail(t: &str) -> String {
    let t = t.trim();
    if t.is_empty() {
        String::new()
    } else {
        format!("; stderr: {t}")
    }
}

impl CommandError {
    /// The exit code, if it exited.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            CommandError::Exit { code, .. } => *code,
            _ => None,
        }
    }

    /// The stderr tail (empty for spawn and I/O errors).
    pub fn stderr_tail(&self) -> &str {
        match self {
            CommandError::Exit { stderr_tail, .. } | CommandError::Timeout { stderr_tail, .. } => {
                stderr_tail
            }
            _ => "",
        }
    }

    /// The argv.
    pub fn argv(&self) -> &DisplayArgv {
        match self {
            CommandError::Spawn { argv, .. }
            | CommandError::Timeout { argv, .. }
            | CommandError::Exit { argv, .. }
            | CommandError::Io { argv, .. } => argv,
        }
    }
}

impl BackendError for CommandError {
    fn kind(&self) -> ErrorKind {
        match self {
            CommandError::Timeout { .. } => ErrorKind::Timeout,
            // ssh's own failures (connection refused, no route) exit 255.
            CommandError::Exit {
                code: Some(255),
                argv,
                ..
            } if argv.0.first().is_some_and(|p| p == "ssh") => ErrorKind::Unreachable,
            CommandError::Spawn { .. } | CommandError::Exit { .. } | CommandError::Io { .. } => {
                ErrorKind::Backend
            }
        }
    }

    fn retryable(&self) -> bool {
        !matches!(self, CommandError::Spawn { .. })
    }
}

/// The last `max` bytes of `s`, cut at a character boundary, whole lines
/// where possible.
pub fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    let cut = &s[start..];
    match cut.find('\n') {
        Some(i) if i + 1 < cut.len() => format!("...{}", &cut[i + 1..]),
        _ => format!("...{cut}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_maps_exit_codes_and_redacts() {
        let c = Command::new("fence_x")
            .arg("-o")
            .secret_stdin(Secret::new("pw123"))
            .ok_exit_codes(&[2]);
        assert_eq!(c.finish(Some(2), b"off".to_vec(), vec![]).unwrap().code, 2);
        let e = c
            .finish(Some(1), vec![], b"bad password pw123\n".to_vec())
            .unwrap_err();
        let msg = e.to_string();
        assert_eq!(
            msg,
            "`fence_x -o` failed with exit code 1; stderr: bad password <redacted>"
        );
        assert_eq!(e.exit_code(), Some(1));
        assert!(format!("{c:?}").contains("<redacted>"));
        assert!(!format!("{c:?}").contains("pw123"));
        let e = c.finish(None, vec![], vec![]).unwrap_err();
        assert!(e.to_string().ends_with("failed with a signal"), "{e}");
    }

    #[test]
    fn stdin_parts_redact_each_secret() {
        let c = Command::new("fence_ipmilan").stdin_parts(vec![
            StdinPart::Plain("action=off\npassword=".into()),
            StdinPart::Secret(Secret::new("hunter22")),
            StdinPart::Plain("\n".into()),
        ]);
        assert_eq!(
            c.stdin_redacted().unwrap(),
            "action=off\npassword=<redacted>\n"
        );
        assert_eq!(
            &*c.stdin_exposed().unwrap(),
            b"action=off\npassword=hunter22\n"
        );
        let e = c
            .finish(Some(1), vec![], b"Failed: bad password hunter22".to_vec())
            .unwrap_err();
        assert!(e.to_string().ends_with("bad password <redacted>"), "{e}");
        let c = Command::new("x").redact_also(Secret::new("s3cr3t"));
        let e = c.finish(Some(1), b"s3cr3t".to_vec(), vec![]).unwrap_err();
        let CommandError::Exit { stdout, .. } = e else {
            panic!()
        };
        assert_eq!(stdout, "<redacted>");
    }

    #[test]
    fn tail_keeps_whole_lines() {
        let s = "line one\nline two\nline three\n";
        assert_eq!(tail(s, 100), s);
        assert_eq!(tail(s, 14), "...line three\n");
        assert_eq!(tail("ééé", 3), "...é");
    }

    #[test]
    fn display_quotes_arguments() {
        let c = Command::new("virsh").args(["-c", "qemu:///system", "start", "my vm"]);
        assert_eq!(c.to_string(), "virsh -c qemu:///system start 'my vm'");
    }
}
