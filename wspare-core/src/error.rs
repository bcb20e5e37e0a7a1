//! Errors as values callers branch on: a [`ErrorKind`] and whether a retry
//! can help, never a string to match.
//!
//! Each backend keeps its own `thiserror` enum, implements [`BackendError`]
//! for it, and converts into [`Error`] with `?` (the blanket `From`).

use std::error::Error as StdError;
use std::fmt;

use serde::{Deserialize, Serialize};

/// What went wrong, at the level a caller decides on.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The VM, node, generation or device does not exist.
    NotFound,
    /// The host, daemon or device could not be reached.
    Unreachable,
    /// The operation did not finish before its deadline.
    Timeout,
    /// The operation conflicts with the current state (a VM running where it
    /// must be stopped, a replica in the wrong direction, a lock held).
    Conflict,
    /// The backend cannot do this at all (see its capabilities).
    Unsupported,
    /// The request itself is wrong: a hostile name, a malformed spec or config.
    InvalidInput,
    /// Credentials were refused. Retrying with the same ones cannot help.
    PermissionDenied,
    /// The backend failed in a way the other kinds do not describe; the
    /// message carries its own words.
    Backend,
}

impl ErrorKind {
    /// Whether a retry of the same call may succeed, when the backend has no
    /// better knowledge.
    pub fn default_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Unreachable | ErrorKind::Timeout | ErrorKind::Conflict | ErrorKind::Backend
        )
    }

    /// Kebab-case name, as in configs, logs and events.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::InvalidInput => "invalid-input",
            ErrorKind::PermissionDenied => "permission-denied",
            ErrorKind::Backend => "backend",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A backend's own error type, mapped onto the core kinds.
pub trait BackendError: StdError + Send + Sync + 'static {
    /// The kind a caller branches on.
    fn kind(&self) -> ErrorKind;
    /// Whether retrying the same call can help.
    fn retryable(&self) -> bool {
        self.kind().default_retryable()
    }
}

/// The error every trait method and core function returns.
pub struct Error {
    kind: ErrorKind,
    retryable: bool,
    message: String,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

/// `Result` with the core [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind`, retryable as the kind's default.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            retryable: kind.default_retryable(),
            message: message.into(),
            source: None,
        }
    }

    /// Overrides whether a retry can help.
    pub fn retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Prefixes the message with context ("starting VM web on node-b: ...").
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The kind to branch on.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether retrying the same call can help.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The serializable summary that travels in [`crate::machine::Outcome`]
    /// and the journal.
    pub fn to_failure(&self) -> Failure {
        let mut message = self.message.clone();
        let mut src = self
            .source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static));
        while let Some(e) = src {
            let s = e.to_string();
            if !message.contains(&s) {
                message.push_str(": ");
                message.push_str(&s);
            }
            src = e.source();
        }
        Failure {
            kind: self.kind,
            retryable: self.retryable,
            message,
        }
    }

    /// Shorthand for [`ErrorKind::InvalidInput`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, message)
    }

    /// Shorthand for [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::NotFound, message)
    }

    /// Shorthand for [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unsupported, message)
    }

    /// Shorthand for [`ErrorKind::Timeout`].
    pub fn timeout(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Timeout, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.kind)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind)
            .field("retryable", &self.retryable)
            .field("message", &self.message);
        if let Some(s) = &self.source {
            d.field("source", &s.to_string());
        }
        d.finish()
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

impl<E: BackendError> From<E> for Error {
    fn from(e: E) -> Self {
        Error {
            kind: e.kind(),
            retryable: e.retryable(),
            message: e.to_string(),
            source: e.source().map(|s| Box::new(SourceText(s.to_string())) as _),
        }
    }
}

/// A source kept as text: backend error sources are often not `Send`.
#[derive(Debug)]
struct SourceText(String);

impl fmt::Display for SourceText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for SourceText {}

/// A failed action's outcome as the machine and the journal keep it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Failure {
    /// The error kind.
    pub kind: ErrorKind,
    /// Whether a retry can help.
    pub retryable: bool,
    /// The error's message with its causes.
    pub message: String,
}

impl Failure {
    /// A failure of `kind` with the kind's default retryability.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            retryable: kind.default_retryable(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.kind)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        e.to_failure()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum MyBackendError {
        #[error("domain {0} not found")]
        NoDomain(String),
        #[error("bad password for {0}")]
        Auth(String),
        #[error("io")]
        Io(#[source] std::io::Error),
    }

    impl BackendError for MyBackendError {
        fn kind(&self) -> ErrorKind {
            match self {
                MyBackendError::NoDomain(_) => ErrorKind::NotFound,
                MyBackendError::Auth(_) => ErrorKind::PermissionDenied,
                MyBackendError::Io(_) => ErrorKind::Unreachable,
            }
        }
    }

    fn call(e: MyBackendError) -> Result<()> {
        Err(e)?
    }

    #[test]
    fn backend_errors_map_to_kinds() {
        let e = call(MyBackendError::NoDomain("web".into())).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(!e.is_retryable());
        assert_eq!(e.to_string(), "domain web not found (not-found)");
        let e = call(MyBackendError::Auth("bmc-a".into())).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(!e.is_retryable());
        let e = call(MyBackendError::Io(std::io::Error::other("reset"))).unwrap_err();
        assert!(e.is_retryable());
        assert_eq!(e.to_failure().message, "io: reset");
    }

    #[test]
    fn context_and_failure() {
        let e = Error::timeout("no answer").context("fencing node-a");
        let f = e.to_failure();
        assert_eq!(f.kind, ErrorKind::Timeout);
        assert!(f.retryable);
        assert_eq!(f.message, "fencing node-a: no answer");
        assert!(Error::invalid("x").retryable(true).is_retryable());
    }
}
