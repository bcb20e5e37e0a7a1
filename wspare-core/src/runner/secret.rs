//! [`Secret`]: a value that never prints.

use std::fmt;

/// A password or key. `Debug` and `Display` print `<redacted>`; the value
/// is only reachable through [`Secret::expose`], and it is overwritten when
/// dropped. It cannot be passed as a command argument: commands take secrets
/// only through the environment or stdin.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// Reads a secret from a file, trimming one trailing newline. The error
    /// names the file, never the content.
    pub fn from_file(path: &std::path::Path) -> crate::Result<Self> {
        let mut s = std::fs::read_to_string(path).map_err(|e| {
            crate::Error::invalid(format!("cannot read secret file {}: {e}", path.display()))
        })?;
        if s.ends_with('\n') {
            s.pop();
            if s.ends_with('\r') {
                s.pop();
            }
        }
        Ok(Secret(s))
    }

    /// The value. Call sites are the places to audit.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // Best effort: overwrite the heap bytes before they are freed.
        let bytes = std::mem::take(&mut self.0).into_bytes();
        let mut bytes = bytes;
        for b in bytes.iter_mut() {
            // A volatile-free overwrite may be elided; black_box keeps it.
            *b = std::hint::black_box(0);
        }
        drop(bytes);
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Replaces every occurrence of each secret in `text` with `<redacted>`.
/// Used on tool output before it goes into an error.
pub fn redact(text: &str, secrets: &[&Secret]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if s.0.len() >= 3 {
            out = out.replace(&s.0, "<redacted>");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "<redacted> <redacted>");
        assert_eq!(s.expose(), "hunter2");
        assert_eq!(
            redact("auth failed for hunter2!", &[&s]),
            "auth failed for <redacted>!"
        );
    }

    #[test]
    fn from_file_trims_newline_and_hides_content_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        assert_eq!(Secret::from_file(&p).unwrap().expose(), "s3cret");
        let e = Secret::from_file(&dir.path().join("none")).unwrap_err();
        assert!(e.to_string().contains("cannot read secret file"));
    }
}
