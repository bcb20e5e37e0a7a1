//! Quoting for the places where an argv must become a string: a remote
//! shell (ssh), and PowerShell.

/// Quotes `s` for a POSIX shell: bare if it is made only of safe
/// characters, else in single quotes with each `'` written as `'\''`.
/// The result is one word, whatever `s` holds.
pub fn sh_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./_-".contains(&b));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Quotes `s` as a PowerShell single-quoted string literal: every `'` (and
/// the typographic quotes PowerShell also treats as quotes) is doubled, so
/// nothing in `s` is interpreted.
pub fn ps_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if matches!(c, '\'' | '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}') {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Joins an argv into one POSIX shell command line, each word quoted.
pub fn sh_join<S: AsRef<str>>(argv: &[S]) -> String {
    argv.iter()
        .map(|a| sh_quote(a.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sh_quote_cases() {
        assert_eq!(sh_quote("abc-1.2/x"), "abc-1.2/x");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote("$(reboot)"), "'$(reboot)'");
        assert_eq!(sh_join(&["echo", "a;b", "c"]), "echo 'a;b' c");
    }

    #[test]
    fn sh_quote_survives_a_real_shell() {
        let hostile = [
            "a'b", "$(id)", "`x`", "a\nb", "\\", "'", "\"", "*", "~", "-rf /",
        ];
        for h in hostile {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", sh_quote(h)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), h);
        }
    }

    #[test]
    fn ps_quote_doubles_quotes() {
        assert_eq!(ps_quote("web"), "'web'");
        assert_eq!(ps_quote("a'b"), "'a''b'");
        assert_eq!(
            ps_quote("x\u{2019}; Stop-Computer"),
            "'x\u{2019}\u{2019}; Stop-Computer'"
        );
        assert_eq!(ps_quote("$env:PATH"), "'$env:PATH'");
    }
}
