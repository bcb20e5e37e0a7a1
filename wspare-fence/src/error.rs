//! [`FenceError`]: what went wrong with which device, for which node, what
//! was asked and what came back. Maps onto the core kinds through
//! [`BackendError`].
//!
//! No text stored here holds a secret: a tool's output was redacted by the
//! command runner (every secret of the command: its env and stdin), and an
//! HTTP reply is redacted by the Redfish fencer, so a password a device
//! echoes never reaches an error, a log line or the journal.

use std::fmt;
use std::time::Duration;

use wspare_core::runner::CommandError;
use wspare_core::{BackendError, ErrorKind, NodeId, PowerState};

/// What a fencer asked a device to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Cut the power (hard off).
    PowerOff,
    /// Restore the power.
    PowerOn,
    /// Read the power state.
    PowerStatus,
    /// Open a session or find the node's system on the device.
    Connect,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::PowerOff => "power off",
            Op::PowerOn => "power on",
            Op::PowerStatus => "power status",
            Op::Connect => "connect",
        })
    }
}

/// One exchange with a device that did not go as asked: which device, which
/// node, what was asked (an argv or an HTTP request line, never a secret)
/// and what came back (redacted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    /// The device, as the fencer describes it ("ipmi bmc-a (10.0.0.5:623)").
    pub device: String,
    /// The node the request was about.
    pub node: NodeId,
    /// The operation.
    pub op: Op,
    /// The request: the command line or `POST https://.../ComputerSystem.Reset`.
    pub asked: String,
    /// What came back: exit status and the meaningful part of the tool's
    /// output, or the HTTP status and the Redfish error message.
    pub reply: String,
}

impl fmt::Display for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} of node {}: asked `{}`, got: {}",
            self.device, self.op, self.node, self.asked, self.reply
        )
    }
}

/// A fencing failure. Converts into [`wspare_core::Error`] with `?`.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The fencer has no device for this node.
    #[error("{device}: no fence device for node {node}")]
    UnknownNode {
        /// The fencer.
        device: String,
        /// The node asked for.
        node: NodeId,
    },
    /// The device refused the credentials or the privilege level. Retrying
    /// with the same credentials cannot help.
    #[error(
        "credentials refused: {0}; check the user, password and privilege level configured for the device"
    )]
    CredentialsRefused(Exchange),
    /// The device never answered; nothing was done.
    #[error("no answer: {0}; check the device's address and port, and that it is up and reachable from here")]
    NoAnswer(Exchange),
    /// The request may have reached the device but its answer did not come
    /// back in time; it may or may not have acted.
    #[error("answer lost: {0}")]
    AnswerLost(Exchange),
    /// The device could not be reached at all (connection refused, no route,
    /// name lookup failed); nothing was done.
    #[error("device unreachable: {0}; check the device's address and port")]
    Unreachable(Exchange),
    /// The device answered with an error.
    #[error("device reported failure: {0}")]
    Refused(Exchange),
    /// The device answered something the parser does not understand.
    #[error("unexpected reply: {0}")]
    BadReply(Exchange),
    /// The device cannot do this (a Redfish system without `ForceOff`).
    #[error("not supported: {0}")]
    Unsupported(Exchange),
    /// The configuration does not match the device (cipher suite, TLS trust,
    /// an agent's options); retrying cannot help.
    #[error("configuration does not fit the device: {0}")]
    Misconfigured(Exchange),
    /// The tool could not be started (not installed).
    #[error("cannot run the tool: {0}; install it where the fencer runs it, or name its path in the device's config")]
    ToolMissing(Exchange),
    /// The power-off (or power-on) was sent, accepted or not, but the power
    /// never read back as wanted before the deadline. After a power-off:
    /// no receipt.
    #[error(
        "{device}: {op} of node {node} {op_result}, but the power did not read back {wanted} within \
         {waited:.1?} ({readings} readings, last: {last}){}",
        if *.wanted == PowerState::Off { "; no receipt" } else { "" }
    )]
    NotConfirmed {
        /// The device.
        device: String,
        /// The node.
        node: NodeId,
        /// What was asked.
        op: Op,
        /// The state wanted.
        wanted: PowerState,
        /// How the request itself ended ("was accepted", or its failure).
        op_result: String,
        /// The last reading or status error.
        last: String,
        /// Status readings taken.
        readings: u32,
        /// How long the read-back waited.
        waited: Duration,
    },
    /// A config value is wrong. `field` is the dotted path in the config.
    #[error("invalid fence config: {field}: {why}")]
    Config {
        /// Where (`devices.bmc-a.port`).
        field: String,
        /// What is wrong.
        why: String,
    },
    /// Every level of a node's topology failed.
    #[error("node {node}: {what} failed at every fence level: {}", .failures.join("; "))]
    AllLevelsFailed {
        /// The node.
        node: NodeId,
        /// "fencing", "power status" or "unfencing".
        what: &'static str,
        /// One line per level: `level N: <error>`.
        failures: Vec<String>,
        /// The kind: shared by every level's error, else the last level's.
        kind: ErrorKind,
        /// Whether any level's error was retryable.
        retryable: bool,
    },
}

impl FenceError {
    /// A config error for `field`.
    pub fn config(field: impl Into<String>, why: impl Into<String>) -> Self {
        FenceError::Config {
            field: field.into(),
            why: why.into(),
        }
    }

    /// Whether the failed request may have changed the power (so the power
    /// must be read back before giving up); `false` when the device surely
    /// did nothing (refused credentials, no answer, not reachable, not
    /// started).
    pub fn may_have_acted(&self) -> bool {
        matches!(
            self,
            FenceError::AnswerLost(_) | FenceError::Refused(_) | FenceError::BadReply(_)
        )
    }

    /// The exchange, for the variants that carry one.
    pub fn exchange(&self) -> Option<&Exchange> {
        match self {
            FenceError::CredentialsRefused(x)
            | FenceError::NoAnswer(x)
            | FenceError::AnswerLost(x)
            | FenceError::Unreachable(x)
            | FenceError::Refused(x)
            | FenceError::BadReply(x)
            | FenceError::Unsupported(x)
            | FenceError::Misconfigured(x)
            | FenceError::ToolMissing(x) => Some(x),
            _ => None,
        }
    }
}

/// Maps a failed run of a fence tool (ipmitool, a fence agent) onto a
/// [`FenceError`]: not started is [`FenceError::ToolMissing`], killed at its
/// deadline or an I/O error is [`FenceError::AnswerLost`] (it may have
/// acted), and an exit with a failure code is whatever `classify` makes of
/// its output (stdout, stderr). The reply carries the exit status and what
/// `said` reads as meaningful in the output (stdout, stderr). The runner has
/// already redacted the command's secrets from both.
pub(crate) fn tool_failure(
    e: CommandError,
    exchange: impl FnOnce(String) -> Exchange,
    said: impl Fn(&str, &str) -> String,
    classify: impl FnOnce(&str, &str) -> fn(Exchange) -> FenceError,
) -> FenceError {
    let tool = e.argv().0.first().cloned().unwrap_or_default();
    let (variant, reply): (fn(Exchange) -> FenceError, String) = match e {
        CommandError::Spawn { source, .. } => (
            FenceError::ToolMissing,
            format!("cannot start {tool}: {source}"),
        ),
        CommandError::Io { source, .. } => (
            FenceError::AnswerLost,
            format!("I/O error talking to {tool}: {source}"),
        ),
        CommandError::Timeout {
            after, stderr_tail, ..
        } => {
            let said = said("", &stderr_tail);
            let mut reply = format!("no answer within {after:?}; {tool} was killed");
            if !said.is_empty() {
                reply.push_str(&format!("; stderr: {said}"));
            }
            (FenceError::AnswerLost, reply)
        }
        CommandError::Exit {
            code,
            stderr_tail,
            stdout,
            ..
        } => {
            let code = code.map_or("a signal".to_string(), |c| format!("exit code {c}"));
            (
                classify(&stdout, &stderr_tail),
                format!("{code}: {}", said(&stdout, &stderr_tail)),
            )
        }
    };
    variant(exchange(reply))
}

impl BackendError for FenceError {
    fn kind(&self) -> ErrorKind {
        match self {
            FenceError::UnknownNode { .. } => ErrorKind::NotFound,
            FenceError::CredentialsRefused(_) => ErrorKind::PermissionDenied,
            FenceError::NoAnswer(_)
            | FenceError::AnswerLost(_)
            | FenceError::NotConfirmed { .. } => ErrorKind::Timeout,
            FenceError::Unreachable(_) => ErrorKind::Unreachable,
            FenceError::Refused(_) | FenceError::BadReply(_) | FenceError::ToolMissing(_) => {
                ErrorKind::Backend
            }
            FenceError::Unsupported(_) => ErrorKind::Unsupported,
            FenceError::Misconfigured(_) | FenceError::Config { .. } => ErrorKind::InvalidInput,
            FenceError::AllLevelsFailed { kind, .. } => *kind,
        }
    }

    fn retryable(&self) -> bool {
        match self {
            FenceError::ToolMissing(_) => false,
            FenceError::AllLevelsFailed { retryable, .. } => *retryable,
            e => e.kind().default_retryable(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wspare_core::Error;

    fn x() -> Exchange {
        Exchange {
            device: "ipmi bmc-a (10.0.0.5:623)".into(),
            node: NodeId::new("node-a").unwrap(),
            op: Op::PowerOff,
            asked: "ipmitool -I lanplus -H 10.0.0.5 power off".into(),
            reply: "exit code 1: RAKP 2 HMAC is invalid".into(),
        }
    }

    #[test]
    fn kinds_and_retry() {
        let e = Error::from(FenceError::CredentialsRefused(x()));
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(!e.is_retryable());
        assert_eq!(
            e.message(),
            "credentials refused: ipmi bmc-a (10.0.0.5:623): power off of node node-a: asked \
             `ipmitool -I lanplus -H 10.0.0.5 power off`, got: exit code 1: RAKP 2 HMAC is invalid; \
             check the user, password and privilege level configured for the device"
        );
        assert_eq!(
            Error::from(FenceError::NoAnswer(x())).kind(),
            ErrorKind::Timeout
        );
        assert!(Error::from(FenceError::NoAnswer(x())).is_retryable());
        assert!(!Error::from(FenceError::ToolMissing(x())).is_retryable());
        assert_eq!(
            Error::from(FenceError::Misconfigured(x())).kind(),
            ErrorKind::InvalidInput
        );
        let e = Error::from(FenceError::UnknownNode {
            device: "ipmi bmc-a".into(),
            node: NodeId::new("node-z").unwrap(),
        });
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(
            e.to_string(),
            "ipmi bmc-a: no fence device for node node-z (not-found)"
        );
    }

    #[test]
    fn not_confirmed_off_names_everything() {
        let e = FenceError::NotConfirmed {
            device: "ipmi bmc-a".into(),
            node: NodeId::new("node-a").unwrap(),
            op: Op::PowerOff,
            wanted: PowerState::Off,
            op_result: "was accepted".into(),
            last: "on".into(),
            readings: 5,
            waited: Duration::from_secs(4),
        };
        assert_eq!(
            e.to_string(),
            "ipmi bmc-a: power off of node node-a was accepted, but the power did not read back off \
             within 4.0s (5 readings, last: on); no receipt"
        );
        assert_eq!(Error::from(e).kind(), ErrorKind::Timeout);
    }

    #[test]
    fn which_failures_may_have_acted() {
        assert!(FenceError::AnswerLost(x()).may_have_acted());
        assert!(FenceError::Refused(x()).may_have_acted());
        assert!(!FenceError::CredentialsRefused(x()).may_have_acted());
        assert!(!FenceError::NoAnswer(x()).may_have_acted());
        assert!(!FenceError::Unreachable(x()).may_have_acted());
    }
}
