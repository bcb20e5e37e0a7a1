//! The command runner: every external tool (rsync, drbdadm, xl, PowerShell,
//! ipmitool, ssh) runs through a [`CommandRunner`].
//!
//! - A [`Command`] is an argv, never a shell string, with a deadline.
//! - The child (and its process group) is killed when the deadline passes or
//!   the future is dropped.
//! - A failure carries the argv, the exit status and the tail of stderr.
//! - Secrets ([`Secret`]) go only through the environment or stdin, and are
//!   redacted from any output that reaches an error.
//! - [`ScriptedRunner`] replays recorded replies in tests, asserting the
//!   exact argv and that every reply was used.

mod command;
mod local;
pub mod quote;
mod scripted;
mod secret;
mod ssh;

use async_trait::async_trait;

pub use command::{tail, Command, CommandError, DisplayArgv, Output, StdinPart, STDERR_TAIL_BYTES};
pub use local::LocalRunner;
pub use scripted::{Reply, ScriptedRunner};
pub use secret::{redact, Secret};
pub use ssh::{SshRunner, SshTarget};

/// A sink for a command's stdout, one line at a time (lines end at `\n` or
/// `\r`, so progress meters that redraw a line arrive as they change).
pub type LineSink<'a> = dyn FnMut(&str) + Send + 'a;

/// Runs commands somewhere: here, or on a host over ssh.
#[async_trait]
pub trait CommandRunner: Send + Sync {
    /// Where commands run ("local", "ssh root@node-b").
    fn describe(&self) -> String;

    /// Runs `cmd` to completion or its deadline, feeding stdout lines to
    /// `on_line` as they arrive.
    async fn run_with(
        &self,
        cmd: &Command,
        on_line: Option<&mut LineSink<'_>>,
    ) -> Result<Output, CommandError>;

    /// Runs `cmd` to completion or its deadline.
    async fn run(&self, cmd: &Command) -> Result<Output, CommandError> {
        self.run_with(cmd, None).await
    }
}

/// Splits a byte stream into lines at `\n` and `\r`, keeping a partial line
/// between calls.
#[derive(Default)]
pub(crate) struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    pub(crate) fn feed(&mut self, chunk: &[u8], sink: &mut LineSink<'_>) {
        for &b in chunk {
            if b == b'\n' || b == b'\r' {
                if !self.partial.is_empty() {
                    sink(&String::from_utf8_lossy(&self.partial));
                    self.partial.clear();
                }
            } else {
                self.partial.push(b);
            }
        }
    }

    pub(crate) fn finish(&mut self, sink: &mut LineSink<'_>) {
        if !self.partial.is_empty() {
            sink(&String::from_utf8_lossy(&self.partial));
            self.partial.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitter_handles_cr_and_partial_lines() {
        let mut lines = Vec::new();
        let mut s = LineSplitter::default();
        let mut sink = |l: &str| lines.push(l.to_string());
        s.feed(b"  10%\r  20", &mut sink);
        s.feed(b"%\rdone\nlast", &mut sink);
        s.finish(&mut sink);
        assert_eq!(lines, ["  10%", "  20%", "done", "last"]);
    }
}
