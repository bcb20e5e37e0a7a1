//! Identifiers: nodes, pairs, VMs and actions.
//!
//! Names travel into libvirt XML, `xl` configs, PowerShell and remote shells,
//! so they are validated once, at construction: a `NodeId`, `PairId` or
//! `VmName` that exists is safe to quote into any of them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind};

/// Longest name accepted. libvirt allows more, but Hyper-V and `xl` are
/// stricter, and a spare must be startable on any of them.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a name: 1..=64 bytes of ASCII letters, digits, `.`, `_` and `-`,
/// starting with a letter or digit. `what` names the field in the error.
pub fn validate_name(what: &str, name: &str) -> Result<(), Error> {
    let bad = |why: String| {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!("invalid {what} {name:?}: {why}"),
        ))
    };
    if name.is_empty() {
        return bad("it is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return bad(format!(
            "it is {} bytes long, at most {MAX_NAME_LEN} are allowed",
            name.len()
        ));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("it must start with a letter or a digit".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(format!(
            "character {c:?} is not allowed (only letters, digits, '.', '_' and '-')"
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps a name (see [`validate_name`]).
            pub fn new(name: impl Into<String>) -> Result<Self, Error> {
                let name = name.into();
                validate_name($what, &name)?;
                Ok(Self(name))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A host with a hypervisor.
    NodeId,
    "node name"
);
name_type!(
    /// One protected VM: an active copy on one node, a spare on another.
    PairId,
    "pair name"
);
name_type!(
    /// The name of a VM as its hypervisor knows it.
    VmName,
    "VM name"
);

/// The id of one action a machine asked for; unique within its pair, for the
/// life of the pair (it survives restarts through the journal).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
#[serde(transparent)]
pub struct ActionId(pub u64);

impl fmt::Display for ActionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["web", "node-a", "db_01.prod", "0vm", &"a".repeat(64)] {
            VmName::new(n).unwrap();
        }
    }

    #[test]
    fn rejects_hostile_names_with_reason() {
        let cases = [
            ("", "empty"),
            ("-rf", "start with"),
            ("a;reboot", "';'"),
            ("$(id)", "start with"),
            ("a b", "' '"),
            ("vm'x", "'\\''"),
            ("é", "start with"),
            ("a/b", "'/'"),
        ];
        for (n, why) in cases {
            let e = VmName::new(n).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            let msg = e.to_string();
            assert!(msg.contains("VM name"), "{msg}");
            assert!(msg.contains(why), "{n:?}: {msg}");
        }
        let long = "a".repeat(65);
        assert!(NodeId::new(long)
            .unwrap_err()
            .to_string()
            .contains("65 bytes"));
    }

    #[test]
    fn deserialize_validates() {
        let ok: NodeId = serde_json::from_str("\"node-a\"").unwrap();
        assert_eq!(ok.as_str(), "node-a");
        let err = serde_json::from_str::<NodeId>("\"node a\"").unwrap_err();
        assert!(err.to_string().contains("invalid node name"), "{err}");
    }
}
