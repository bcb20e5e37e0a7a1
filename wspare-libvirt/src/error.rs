//! [`LibvirtError`]: this backend's errors, mapped onto the core kinds.
//!
//! Every error names the connection URI, the domain when there is one, the
//! operation, and for a failed libvirt call its error code by name and
//! number ("VIR_ERR_NO_DOMAIN, code 42"), so a log line is enough to find
//! the call in libvirt's own logs.

use std::fmt;

use wspare_core::{BackendError, ErrorKind};

/// Where an error happened: the connection and, if any, the domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct At {
    /// The connection URI (`qemu+ssh://node-a/system`).
    pub uri: String,
    /// The domain the call was about.
    pub domain: Option<String>,
}

impl At {
    pub(crate) fn new(uri: &str, domain: Option<&str>) -> At {
        At {
            uri: uri.to_owned(),
            domain: domain.map(str::to_owned),
        }
    }
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.domain {
            Some(d) => write!(f, "libvirt {}, domain {d}", self.uri),
            None => write!(f, "libvirt {}", self.uri),
        }
    }
}

/// An error of the libvirt backend.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// A libvirt call failed; `code` is libvirt's `virErrorNumber`.
    #[error("{at}: {op}: {message} (libvirt error {}, code {code}{})", code_name(*.code), if *.conn_lost { ", connection lost" } else { "" })]
    Call {
        /// Where.
        at: At,
        /// What we were doing ("starting", "reading the XML").
        op: String,
        /// libvirt's error number.
        code: i32,
        /// libvirt's message.
        message: String,
        /// The connection was found dead after the failure; the next call
        /// reconnects.
        conn_lost: bool,
    },
    /// The object does not exist (a disk slot that is not attached).
    #[error("{at}: {op}: {what}")]
    NotFound {
        /// Where.
        at: At,
        /// What we were doing.
        op: String,
        /// What is missing.
        what: String,
    },
    /// The call conflicts with the domain's state.
    #[error("{at}: {op}: {what}")]
    Conflict {
        /// Where.
        at: At,
        /// What we were doing.
        op: String,
        /// Why.
        what: String,
    },
    /// A deadline passed.
    #[error("{at}: {op}: {what}")]
    Timeout {
        /// Where.
        at: At,
        /// What we were doing.
        op: String,
        /// What did not happen in time.
        what: String,
    },
    /// This connection's driver cannot do it.
    #[error("{at}: {op}: {what}")]
    Unsupported {
        /// Where.
        at: At,
        /// What we were doing.
        op: String,
        /// What is missing.
        what: String,
    },
    /// The request or the configuration is wrong.
    #[error("{at}: {op}: {what}")]
    InvalidInput {
        /// Where.
        at: At,
        /// What we were doing.
        op: String,
        /// What is wrong.
        what: String,
    },
    /// libvirt answered with something this backend cannot use (XML it
    /// cannot parse or describe as a `VmSpec`), or a worker thread failed.
    #[error("{at}: {op}: {what}")]
    Backend {
        /// Where.
        at: At,
        /// What we were doing.
        op: String,
        /// What went wrong.
        what: String,
    },
}

impl LibvirtError {
    /// Wraps a failed libvirt call.
    pub(crate) fn call(at: At, op: impl Into<String>, e: &virt::error::Error) -> LibvirtError {
        LibvirtError::Call {
            at,
            op: op.into(),
            code: e.code().to_raw() as i32,
            message: e.message().to_owned(),
            conn_lost: false,
        }
    }

    /// libvirt's error number, for a failed call.
    pub fn code(&self) -> Option<i32> {
        match self {
            LibvirtError::Call { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Where it happened.
    pub fn at(&self) -> &At {
        match self {
            LibvirtError::Call { at, .. }
            | LibvirtError::NotFound { at, .. }
            | LibvirtError::Conflict { at, .. }
            | LibvirtError::Timeout { at, .. }
            | LibvirtError::Unsupported { at, .. }
            | LibvirtError::InvalidInput { at, .. }
            | LibvirtError::Backend { at, .. } => at,
        }
    }

    /// Whether this is a failed call with libvirt error `code`.
    pub(crate) fn is_code(&self, want: u32) -> bool {
        matches!(self, LibvirtError::Call { code, .. } if *code == want as i32)
    }

    pub(crate) fn mark_conn_lost(mut self) -> LibvirtError {
        if let LibvirtError::Call { conn_lost, .. } = &mut self {
            *conn_lost = true;
        }
        self
    }
}

impl BackendError for LibvirtError {
    fn kind(&self) -> ErrorKind {
        match self {
            LibvirtError::Call {
                conn_lost: true, ..
            } => ErrorKind::Unreachable,
            LibvirtError::Call { code, .. } => kind_of_code(*code),
            LibvirtError::NotFound { .. } => ErrorKind::NotFound,
            LibvirtError::Conflict { .. } => ErrorKind::Conflict,
            LibvirtError::Timeout { .. } => ErrorKind::Timeout,
            LibvirtError::Unsupported { .. } => ErrorKind::Unsupported,
            LibvirtError::InvalidInput { .. } => ErrorKind::InvalidInput,
            LibvirtError::Backend { .. } => ErrorKind::Backend,
        }
    }
}

/// The core kind for a libvirt error number.
pub fn kind_of_code(code: i32) -> ErrorKind {
    use virt::sys::*;
    let Ok(code) = u32::try_from(code) else {
        return ErrorKind::Backend;
    };
    match code {
        VIR_ERR_NO_DOMAIN
        | VIR_ERR_NO_NETWORK
        | VIR_ERR_NO_STORAGE_POOL
        | VIR_ERR_NO_STORAGE_VOL
        | VIR_ERR_NO_NODE_DEVICE
        | VIR_ERR_NO_INTERFACE
        | VIR_ERR_NO_NWFILTER
        | VIR_ERR_NO_SECRET
        | VIR_ERR_NO_DOMAIN_SNAPSHOT
        | VIR_ERR_NO_DOMAIN_CHECKPOINT
        | VIR_ERR_NO_DOMAIN_METADATA
        | VIR_ERR_DEVICE_MISSING => ErrorKind::NotFound,
        VIR_ERR_NO_CONNECT
        | VIR_ERR_INVALID_CONN
        | VIR_ERR_UNKNOWN_HOST
        | VIR_ERR_RPC
        | VIR_ERR_SSH
        | VIR_ERR_LIBSSH
        | VIR_ERR_GNUTLS_ERROR
        | VIR_ERR_NO_SERVER
        | VIR_ERR_AGENT_UNRESPONSIVE
        | VIR_ERR_AGENT_UNSYNCED => ErrorKind::Unreachable,
        VIR_ERR_OPERATION_TIMEOUT | VIR_ERR_AGENT_COMMAND_TIMEOUT => ErrorKind::Timeout,
        VIR_ERR_OPERATION_INVALID
        | VIR_ERR_DOM_EXIST
        | VIR_ERR_RESOURCE_BUSY
        | VIR_ERR_BLOCK_COPY_ACTIVE
        | VIR_ERR_STORAGE_VOL_EXIST
        | VIR_ERR_MULTIPLE_DOMAINS => ErrorKind::Conflict,
        VIR_ERR_NO_SUPPORT
        | VIR_ERR_OPERATION_UNSUPPORTED
        | VIR_ERR_ARGUMENT_UNSUPPORTED
        | VIR_ERR_CONFIG_UNSUPPORTED => ErrorKind::Unsupported,
        VIR_ERR_INVALID_ARG
        | VIR_ERR_XML_ERROR
        | VIR_ERR_XML_DETAIL
        | VIR_ERR_XML_INVALID_SCHEMA
        | VIR_ERR_INVALID_MAC
        | VIR_ERR_NO_NAME
        | VIR_ERR_NO_SOURCE
        | VIR_ERR_NO_TARGET
        | VIR_ERR_NO_OS
        | VIR_ERR_NO_KERNEL
        | VIR_ERR_OS_TYPE
        | VIR_ERR_INVALID_DOMAIN_SNAPSHOT => ErrorKind::InvalidInput,
        VIR_ERR_AUTH_FAILED
        | VIR_ERR_AUTH_CANCELLED
        | VIR_ERR_AUTH_UNAVAILABLE
        | VIR_ERR_ACCESS_DENIED
        | VIR_ERR_OPERATION_DENIED => ErrorKind::PermissionDenied,
        _ => ErrorKind::Backend,
    }
}

macro_rules! code_names {
    ($($name:ident),* $(,)?) => {
        /// libvirt's name for an error number (`VIR_ERR_NO_DOMAIN` for 42),
        /// or `VIR_ERR_UNKNOWN` for a number this build does not know.
        pub fn code_name(code: i32) -> &'static str {
            $(
                if code >= 0 && code as u32 == virt::sys::$name {
                    return stringify!($name);
                }
            )*
            "VIR_ERR_UNKNOWN"
        }
    };
}

code_names!(
    VIR_ERR_OK,
    VIR_ERR_INTERNAL_ERROR,
    VIR_ERR_NO_MEMORY,
    VIR_ERR_NO_SUPPORT,
    VIR_ERR_UNKNOWN_HOST,
    VIR_ERR_NO_CONNECT,
    VIR_ERR_INVALID_CONN,
    VIR_ERR_INVALID_DOMAIN,
    VIR_ERR_INVALID_ARG,
    VIR_ERR_OPERATION_FAILED,
    VIR_ERR_GET_FAILED,
    VIR_ERR_POST_FAILED,
    VIR_ERR_HTTP_ERROR,
    VIR_ERR_SEXPR_SERIAL,
    VIR_ERR_NO_XEN,
    VIR_ERR_XEN_CALL,
    VIR_ERR_OS_TYPE,
    VIR_ERR_NO_KERNEL,
    VIR_ERR_NO_ROOT,
    VIR_ERR_NO_SOURCE,
    VIR_ERR_NO_TARGET,
    VIR_ERR_NO_NAME,
    VIR_ERR_NO_OS,
    VIR_ERR_NO_DEVICE,
    VIR_ERR_NO_XENSTORE,
    VIR_ERR_DRIVER_FULL,
    VIR_ERR_CALL_FAILED,
    VIR_ERR_XML_ERROR,
    VIR_ERR_DOM_EXIST,
    VIR_ERR_OPERATION_DENIED,
    VIR_ERR_OPEN_FAILED,
    VIR_ERR_READ_FAILED,
    VIR_ERR_PARSE_FAILED,
    VIR_ERR_CONF_SYNTAX,
    VIR_ERR_WRITE_FAILED,
    VIR_ERR_XML_DETAIL,
    VIR_ERR_INVALID_NETWORK,
    VIR_ERR_NETWORK_EXIST,
    VIR_ERR_SYSTEM_ERROR,
    VIR_ERR_RPC,
    VIR_ERR_GNUTLS_ERROR,
    VIR_WAR_NO_NETWORK,
    VIR_ERR_NO_DOMAIN,
    VIR_ERR_NO_NETWORK,
    VIR_ERR_INVALID_MAC,
    VIR_ERR_AUTH_FAILED,
    VIR_ERR_INVALID_STORAGE_POOL,
    VIR_ERR_INVALID_STORAGE_VOL,
    VIR_WAR_NO_STORAGE,
    VIR_ERR_NO_STORAGE_POOL,
    VIR_ERR_NO_STORAGE_VOL,
    VIR_WAR_NO_NODE,
    VIR_ERR_INVALID_NODE_DEVICE,
    VIR_ERR_NO_NODE_DEVICE,
    VIR_ERR_NO_SECURITY_MODEL,
    VIR_ERR_OPERATION_INVALID,
    VIR_WAR_NO_INTERFACE,
    VIR_ERR_NO_INTERFACE,
    VIR_ERR_INVALID_INTERFACE,
    VIR_ERR_MULTIPLE_INTERFACES,
    VIR_WAR_NO_NWFILTER,
    VIR_ERR_INVALID_NWFILTER,
    VIR_ERR_NO_NWFILTER,
    VIR_ERR_BUILD_FIREWALL,
    VIR_WAR_NO_SECRET,
    VIR_ERR_INVALID_SECRET,
    VIR_ERR_NO_SECRET,
    VIR_ERR_CONFIG_UNSUPPORTED,
    VIR_ERR_OPERATION_TIMEOUT,
    VIR_ERR_MIGRATE_PERSIST_FAILED,
    VIR_ERR_HOOK_SCRIPT_FAILED,
    VIR_ERR_INVALID_DOMAIN_SNAPSHOT,
    VIR_ERR_NO_DOMAIN_SNAPSHOT,
    VIR_ERR_INVALID_STREAM,
    VIR_ERR_ARGUMENT_UNSUPPORTED,
    VIR_ERR_STORAGE_PROBE_FAILED,
    VIR_ERR_STORAGE_POOL_BUILT,
    VIR_ERR_SNAPSHOT_REVERT_RISKY,
    VIR_ERR_OPERATION_ABORTED,
    VIR_ERR_AUTH_CANCELLED,
    VIR_ERR_NO_DOMAIN_METADATA,
    VIR_ERR_MIGRATE_UNSAFE,
    VIR_ERR_OVERFLOW,
    VIR_ERR_BLOCK_COPY_ACTIVE,
    VIR_ERR_OPERATION_UNSUPPORTED,
    VIR_ERR_SSH,
    VIR_ERR_AGENT_UNRESPONSIVE,
    VIR_ERR_RESOURCE_BUSY,
    VIR_ERR_ACCESS_DENIED,
    VIR_ERR_DBUS_SERVICE,
    VIR_ERR_STORAGE_VOL_EXIST,
    VIR_ERR_CPU_INCOMPATIBLE,
    VIR_ERR_XML_INVALID_SCHEMA,
    VIR_ERR_MIGRATE_FINISH_OK,
    VIR_ERR_AUTH_UNAVAILABLE,
    VIR_ERR_NO_SERVER,
    VIR_ERR_NO_CLIENT,
    VIR_ERR_AGENT_UNSYNCED,
    VIR_ERR_LIBSSH,
    VIR_ERR_DEVICE_MISSING,
    VIR_ERR_INVALID_NWFILTER_BINDING,
    VIR_ERR_NO_NWFILTER_BINDING,
    VIR_ERR_INVALID_DOMAIN_CHECKPOINT,
    VIR_ERR_NO_DOMAIN_CHECKPOINT,
    VIR_ERR_NO_DOMAIN_BACKUP,
    VIR_ERR_INVALID_NETWORK_PORT,
    VIR_ERR_NETWORK_PORT_EXIST,
    VIR_ERR_NO_NETWORK_PORT,
    VIR_ERR_NO_HOSTNAME,
    VIR_ERR_CHECKPOINT_INCONSISTENT,
    VIR_ERR_MULTIPLE_DOMAINS,
    VIR_ERR_NO_NETWORK_METADATA,
    VIR_ERR_AGENT_COMMAND_TIMEOUT,
    VIR_ERR_AGENT_COMMAND_FAILED,
    VIR_ERR_INVALID_ENCR_KEY_SECRET,
);

#[cfg(test)]
mod tests {
    use super::*;

    fn call(code: u32, domain: Option<&str>) -> LibvirtError {
        LibvirtError::Call {
            at: At::new("qemu+ssh://node-a/system", domain),
            op: "starting".into(),
            code: code as i32,
            message: "Domain not found: no domain with matching name 'web'".into(),
            conn_lost: false,
        }
    }

    #[test]
    fn codes_map_to_kinds_and_names() {
        use virt::sys::*;
        assert_eq!(kind_of_code(VIR_ERR_NO_DOMAIN as i32), ErrorKind::NotFound);
        assert_eq!(
            kind_of_code(VIR_ERR_OPERATION_INVALID as i32),
            ErrorKind::Conflict
        );
        assert_eq!(
            kind_of_code(VIR_ERR_NO_CONNECT as i32),
            ErrorKind::Unreachable
        );
        assert_eq!(
            kind_of_code(VIR_ERR_OPERATION_TIMEOUT as i32),
            ErrorKind::Timeout
        );
        assert_eq!(
            kind_of_code(VIR_ERR_NO_SUPPORT as i32),
            ErrorKind::Unsupported
        );
        assert_eq!(
            kind_of_code(VIR_ERR_XML_ERROR as i32),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            kind_of_code(VIR_ERR_AUTH_FAILED as i32),
            ErrorKind::PermissionDenied
        );
        assert_eq!(
            kind_of_code(VIR_ERR_INTERNAL_ERROR as i32),
            ErrorKind::Backend
        );
        assert_eq!(kind_of_code(-1), ErrorKind::Backend);
        assert_eq!(code_name(42), "VIR_ERR_NO_DOMAIN");
        assert_eq!(code_name(114), "VIR_ERR_INVALID_ENCR_KEY_SECRET");
        assert_eq!(code_name(9999), "VIR_ERR_UNKNOWN");
        assert_eq!(code_name(-3), "VIR_ERR_UNKNOWN");
    }

    #[test]
    fn errors_name_uri_domain_and_code() {
        let e: wspare_core::Error = call(virt::sys::VIR_ERR_NO_DOMAIN, Some("web")).into();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(!e.is_retryable());
        let msg = e.to_string();
        for part in [
            "qemu+ssh://node-a/system",
            "domain web",
            "starting",
            "VIR_ERR_NO_DOMAIN",
            "code 42",
        ] {
            assert!(msg.contains(part), "{part:?} missing in {msg}");
        }
        let lost = call(virt::sys::VIR_ERR_INTERNAL_ERROR, None).mark_conn_lost();
        assert_eq!(lost.kind(), ErrorKind::Unreachable);
        assert!(lost.retryable());
        assert!(lost.to_string().contains("connection lost"), "{lost}");
        assert!(!lost.to_string().contains(", domain "), "{lost}");
    }
}
