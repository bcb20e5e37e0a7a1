//! Pure parsers for ClusterLabs fence agent output, tested on output
//! recorded from `fence_ipmilan` (fence-agents 4.12.1, Debian 12) against
//! virtualbmc 3.3.0 (`testdata/fence_ipmilan/`, see its README).
//!
//! The agents share `fencing.py`: `status` prints `Status: ON` (exit 0) or
//! `Status: OFF` (exit 2); `off`/`on` print `Success: Powered OFF` or
//! `Success: Already OFF` (exit 0); failures log `ERROR: Failed: ...` on
//! stderr and exit 1.

use wspare_core::PowerState;

/// Reads a `status` answer from stdout and the exit code.
pub fn status(stdout: &str, code: i32) -> Result<PowerState, String> {
    let line = stdout
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("Status:"))
        .map(str::trim);
    let state = match line {
        Some(s) if s.eq_ignore_ascii_case("on") => PowerState::On,
        Some(s) if s.eq_ignore_ascii_case("off") => PowerState::Off,
        Some(_) => PowerState::Unknown,
        None => {
            return Err(format!(
                "exit code {code} and no \"Status:\" line in {:?}",
                stdout.trim()
            ))
        }
    };
    match (state, code) {
        (PowerState::On, 0) | (PowerState::Off, 2) | (PowerState::Unknown, _) => Ok(state),
        _ => Err(format!(
            "\"Status: {}\" contradicts exit code {code} (0 means on, 2 off)",
            line.unwrap_or_default()
        )),
    }
}

/// Checks an `off`/`on` answer: a `Success:` line.
pub fn success(stdout: &str) -> Result<(), String> {
    if stdout.lines().any(|l| l.trim().starts_with("Success:")) {
        Ok(())
    } else {
        Err(format!("no \"Success:\" line in {:?}", stdout.trim()))
    }
}

/// Why an agent run failed, read from its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The device refused the credentials or the privileges.
    Credentials,
    /// The agent's options are wrong (missing password, bad action, usage).
    Usage,
    /// The agent could not connect or log in (fencing.py cannot tell which:
    /// its `Unable to connect/login` covers both).
    Unreachable,
    /// The device never answered.
    NoAnswer,
    /// The connection dropped mid-way: the device may have acted.
    AnswerLost,
    /// The device took the command but the power did not change in the
    /// agent's own wait (`Timed out waiting to power OFF`).
    NotChanged,
    /// Anything else.
    Other,
}

/// Classifies a failed run by everything it printed. With fence_ipmilan's
/// `verbose_level=2` the underlying `ipmitool -v` output is logged too, so a
/// refused password (`RAKP 2 HMAC is invalid`) is recognised; without it,
/// fence_ipmilan says only "Unable to obtain correct plug status".
pub fn classify(output: &str) -> Failure {
    use crate::ipmi::parse::{classify as ipmi_classify, Failure as IpmiFailure};
    let has = |s: &str| output.contains(s);
    let lower = output.to_ascii_lowercase();
    let has_lower = |s: &str| lower.contains(s);
    let ipmi = ipmi_classify(output);
    if ipmi == IpmiFailure::Credentials
        || has("The user does not have the correct privileges")
        || has("401 Unauthorized")
        || has_lower("authentication failed")
        || has_lower("invalid credentials")
        || has_lower("login failed")
        || has_lower("permission denied")
    {
        Failure::Credentials
    } else if has("You have to set login password")
        || has("Please use '-h' for usage")
        || has("Unrecognised action")
        || has("Failed: Unable to parse")
    {
        Failure::Usage
    } else if has("Timed out waiting to power") {
        Failure::NotChanged
    } else if has("Connection timed out") || ipmi == IpmiFailure::NoAnswer {
        Failure::NoAnswer
    } else if has("Connection lost") {
        Failure::AnswerLost
    } else if has("Unable to connect/login to fencing device") || has("Connection refused") {
        Failure::Unreachable
    } else {
        Failure::Other
    }
}

/// The line of the output that tells why credentials were refused, if
/// there is one (`RAKP 2 HMAC is invalid` from the ipmitool log of
/// `verbose_level=2`, an HTTP 401...).
pub fn cause(output: &str) -> Option<String> {
    const CAUSES: &[&str] = &[
        "RAKP",
        "unauthorized name",
        "nsufficient privilege",
        "correct privileges",
        "401 Unauthorized",
        "uthentication failed",
    ];
    output
        .lines()
        .map(|l| l.trim().trim_start_matches('>').trim())
        .find(|l| CAUSES.iter().any(|c| l.contains(c)))
        .map(str::to_string)
}

/// The agent's `ERROR` lines without their timestamps, joined with "; ";
/// if there are none, the last three lines that are not Python warnings.
pub fn summary(stderr: &str) -> String {
    let errors: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.find("ERROR: ").map(|i| l[i + "ERROR: ".len()..].trim()))
        .filter(|l| !l.is_empty())
        .collect();
    if !errors.is_empty() {
        return errors.join("; ");
    }
    let rest: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.contains("DeprecationWarning")
                && !l.starts_with("from pipes import")
        })
        .collect();
    rest[rest.len().saturating_sub(3)..].join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! rec {
        ($name:literal) => {
            include_str!(concat!("../../testdata/fence_ipmilan/", $name))
        };
    }

    #[test]
    fn status_answers() {
        assert_eq!(status(rec!("status_on.stdout"), 0), Ok(PowerState::On));
        assert_eq!(status(rec!("status_off.stdout"), 2), Ok(PowerState::Off));
        assert_eq!(status(rec!("stuck_status.stdout"), 0), Ok(PowerState::On));
        assert!(status(rec!("status_on.stdout"), 2)
            .unwrap_err()
            .contains("contradicts exit code 2"));
        assert!(status(rec!("status_off.stdout"), 0).is_err());
        assert!(status("", 1).unwrap_err().contains("no \"Status:\" line"));
        assert_eq!(status("Status: UNKNOWN\n", 1), Ok(PowerState::Unknown));
    }

    #[test]
    fn success_answers() {
        assert_eq!(success(rec!("off_ok.stdout")), Ok(()));
        assert_eq!(success(rec!("off_already_off.stdout")), Ok(()));
        assert_eq!(success(rec!("on_ok.stdout")), Ok(()));
        assert!(success(rec!("stuck_off.stdout")).is_err());
    }

    #[test]
    fn classifies_recorded_failures() {
        assert_eq!(
            classify(rec!("wrong_password.stderr")),
            Failure::Credentials
        );
        assert_eq!(classify(rec!("no_answer.stderr")), Failure::NoAnswer);
        assert_eq!(classify(rec!("stuck_off.stderr")), Failure::NotChanged);
        // fencing.py's messages for the other exits.
        assert_eq!(
            classify("ERROR: Unable to connect/login to fencing device\n"),
            Failure::Unreachable
        );
        assert_eq!(
            classify("ERROR: Failed: You have to set login password\n"),
            Failure::Usage
        );
        assert_eq!(classify("ERROR: Connection lost\n"), Failure::AnswerLost);
        assert_eq!(
            classify(
                "ERROR: Failed: Unable to obtain correct plug status or plug is not available\n"
            ),
            Failure::Other
        );
    }

    #[test]
    fn summaries_keep_the_error_lines() {
        assert_eq!(
            summary(rec!("wrong_password.stderr")),
            "Failed: Unable to obtain correct plug status or plug is not available"
        );
        assert_eq!(summary(rec!("no_answer.stderr")), "Connection timed out");
        assert_eq!(
            summary(rec!("stuck_off.stderr")),
            "Failed: Timed out waiting to power OFF"
        );
        assert_eq!(summary("a\nb\nc\nd\n"), "b; c; d");
    }
}
