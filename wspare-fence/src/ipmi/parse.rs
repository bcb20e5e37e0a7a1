//! Pure parsers for `ipmitool -I lanplus -v ... power {status,off,on}`
//! output, tested on output recorded from ipmitool 1.8.19 against
//! virtualbmc 3.3.0 (`testdata/ipmitool/`, see its README).

use wspare_core::PowerState;

/// Reads `power status` stdout: `Chassis Power is on` / `off`. Any other
/// word after "is" is [`PowerState::Unknown`]; no such line is an error
/// carrying the text.
pub fn power_status(stdout: &str) -> Result<PowerState, String> {
    for line in stdout.lines() {
        if let Some(rest) = line.trim().strip_prefix("Chassis Power is ") {
            return Ok(match rest.trim() {
                "on" => PowerState::On,
                "off" => PowerState::Off,
                _ => PowerState::Unknown,
            });
        }
    }
    Err(format!(
        "no \"Chassis Power is\" line in {:?}",
        stdout.trim()
    ))
}

/// Checks `power off` / `power on` stdout: `Chassis Power Control: Down/Off`
/// (`Up/On`). `expected` is the part after the colon.
pub fn power_control(stdout: &str, expected: &str) -> Result<(), String> {
    for line in stdout.lines() {
        if let Some(rest) = line.trim().strip_prefix("Chassis Power Control:") {
            return if rest.trim() == expected {
                Ok(())
            } else {
                Err(format!(
                    "expected \"Chassis Power Control: {expected}\", got {:?}",
                    line.trim()
                ))
            };
        }
    }
    Err(format!(
        "no \"Chassis Power Control\" line in {:?}",
        stdout.trim()
    ))
}

/// Why an ipmitool call failed, read from its `-v` stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The BMC refused the user name, the password or the privilege level.
    Credentials,
    /// The BMC and ipmitool disagree on the cipher suite (configuration).
    Cipher,
    /// The BMC's name did not resolve or no socket could be opened.
    Unreachable,
    /// The BMC never answered the session setup: nothing was done.
    NoAnswer,
    /// A session was up, the command was sent, its answer was lost: the BMC
    /// may have acted.
    AnswerLost,
    /// The BMC answered the command with an error, or something else.
    Other,
}

/// Lines of stderr that `-v` prints on every call and that say nothing
/// about a failure.
const NOISE: &[&str] = &[
    "Loading IANA PEN Registry",
    "Using best available cipher suite",
    "Running Get VSO Capabilities",
    "Running Get PICMG Properties",
    "Invalid completion code received: Invalid command",
    "Discovered IPMB address",
    "Discovered Target IPMB",
];

/// Stderr without `-v` noise, lines joined with "; ", for an error message.
pub fn meaningful(stderr: &str) -> String {
    stderr
        .lines()
        .map(|l| l.trim().trim_start_matches('>').trim())
        .filter(|l| !l.is_empty() && !NOISE.iter().any(|n| l.starts_with(n)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Classifies a failed call by its `-v` stderr.
///
/// Refused credentials and a dead BMC both end in "Unable to establish IPMI
/// v2 / RMCP+ session"; `-v` adds what happened before: `RAKP 2 HMAC is
/// invalid` (wrong password), `RAKP 2 message indicates an error :
/// unauthorized name` (unknown user on real BMCs), `no response from RAKP 1
/// message` (unknown user on virtualbmc/pyghmi, which drops the RAKP 1 of a
/// user it does not know, after answering the session open), `Get Auth
/// Capabilities error` (nothing answered at all).
pub fn classify(stderr: &str) -> Failure {
    let has = |s: &str| stderr.contains(s);
    if has("RAKP 2 HMAC is invalid")
        || has("unauthorized name")
        || has("RAKP 2 message indicates an error")
        || has("RAKP 4 message indicates an error")
        || has("no response from RAKP 1 message")
        || has("Invalid user name")
        || has("nsufficient privilege")
        || has("Set Session Privilege Level to")
        || has("password is too long")
        || has("Password is too long")
    {
        Failure::Credentials
    } else if has("is not what we requested")
        || has("Unsupported cipher suite")
        || has("Invalid cipher suite")
    {
        Failure::Cipher
    } else if has("Address lookup for") || has("Could not open socket") {
        Failure::Unreachable
    } else if has("Unable to establish IPMI v2 / RMCP+ session")
        || has("Get Auth Capabilities error")
        || has("Error issuing Get Channel Authentication Capabilities")
    {
        Failure::NoAnswer
    } else if has("IPMI Request Match NOT FOUND") || has("No response from remote controller") {
        Failure::AnswerLost
    } else {
        Failure::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! rec {
        ($name:literal) => {
            include_str!(concat!("../../testdata/ipmitool/", $name))
        };
    }

    #[test]
    fn status_on_and_off() {
        assert_eq!(power_status(rec!("status_on.stdout")), Ok(PowerState::On));
        assert_eq!(power_status(rec!("status_off.stdout")), Ok(PowerState::Off));
        assert_eq!(
            power_status(rec!("status_after_lost_answer.stdout")),
            Ok(PowerState::Off)
        );
        assert_eq!(
            power_status(rec!("stuck_status.stdout")),
            Ok(PowerState::On)
        );
        assert_eq!(
            power_status("Chassis Power is cycling\n"),
            Ok(PowerState::Unknown)
        );
        assert!(power_status("")
            .unwrap_err()
            .contains("no \"Chassis Power is\" line"));
        // -v writes only to stderr: stdout stays one clean line.
        assert_eq!(rec!("status_on.stdout"), "Chassis Power is on\n");
    }

    #[test]
    fn control_replies() {
        assert_eq!(power_control(rec!("off_ok.stdout"), "Down/Off"), Ok(()));
        assert_eq!(
            power_control(rec!("off_already_off.stdout"), "Down/Off"),
            Ok(())
        );
        assert_eq!(power_control(rec!("stuck_off.stdout"), "Down/Off"), Ok(()));
        assert_eq!(power_control(rec!("on_ok.stdout"), "Up/On"), Ok(()));
        assert!(power_control(rec!("on_ok.stdout"), "Down/Off").is_err());
        assert!(power_control(rec!("off_answer_lost.stdout"), "Down/Off").is_err());
    }

    #[test]
    fn classifies_recorded_failures() {
        assert_eq!(
            classify(rec!("wrong_password.stderr")),
            Failure::Credentials
        );
        assert_eq!(classify(rec!("unknown_user.stderr")), Failure::Credentials);
        assert_eq!(classify(rec!("cipher_mismatch.stderr")), Failure::Cipher);
        assert_eq!(classify(rec!("no_answer.stderr")), Failure::NoAnswer);
        assert_eq!(classify(rec!("unknown_host.stderr")), Failure::Unreachable);
        assert_eq!(
            classify(rec!("off_answer_lost.stderr")),
            Failure::AnswerLost
        );
        assert_eq!(
            classify("Set Chassis Power Control to Down/Off failed: Node busy\n"),
            Failure::Other
        );
        // A real BMC's answer to an unknown user (not producible with vbmc).
        assert_eq!(
            classify("> RAKP 2 message indicates an error : unauthorized name\nError: Unable to establish IPMI v2 / RMCP+ session\n"),
            Failure::Credentials
        );
    }

    #[test]
    fn meaningful_drops_verbose_noise() {
        assert_eq!(
            meaningful(rec!("wrong_password.stderr")),
            "RAKP 2 HMAC is invalid; Error: Unable to establish IPMI v2 / RMCP+ session"
        );
        assert_eq!(
            meaningful(rec!("off_answer_lost.stderr")),
            "Unable to set Chassis Power Control to Down/Off; IPMI Request Match NOT FOUND"
        );
        assert_eq!(meaningful(rec!("status_on.stderr")), "");
    }
}
