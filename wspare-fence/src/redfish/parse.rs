//! Pure parsers for the Redfish resources a fencer reads, tested on JSON
//! recorded from sushy-tools 2.2.0's emulator (libvirt driver) over TLS
//! (`testdata/redfish/`, see its README).

use serde_json::Value;
use wspare_core::PowerState;

/// What the service root links to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRoot {
    /// The `ComputerSystemCollection` path.
    pub systems: String,
    /// The session collection (`Links.Sessions`), if the root names one.
    pub sessions: Option<String>,
}

/// The parts of a `ComputerSystem` a fencer uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct System {
    /// `@odata.id`.
    pub path: String,
    /// `Id`.
    pub id: String,
    /// `Name`, if any.
    pub name: Option<String>,
    /// `UUID`, if any.
    pub uuid: Option<String>,
    /// `PowerState` as read.
    pub power: PowerState,
    /// `PowerState` as the device spelled it (`PoweringOff`...).
    pub power_raw: String,
    /// `Actions.#ComputerSystem.Reset.target`.
    pub reset_target: Option<String>,
    /// `ResetType@Redfish.AllowableValues`, if the system lists them.
    pub reset_types: Option<Vec<String>>,
}

impl System {
    /// Whether the system says it takes `reset_type` (true when it does not
    /// list its allowed values).
    pub fn allows(&self, reset_type: &str) -> bool {
        self.reset_types
            .as_ref()
            .is_none_or(|v| v.iter().any(|t| t == reset_type))
    }

    /// Whether `wanted` names this system: its `Id`, `Name` or `UUID`
    /// (case-insensitive for the UUID).
    pub fn is_named(&self, wanted: &str) -> bool {
        self.id == wanted
            || self.name.as_deref() == Some(wanted)
            || self
                .uuid
                .as_deref()
                .is_some_and(|u| u.eq_ignore_ascii_case(wanted))
    }
}

fn parse(body: &str) -> Result<Value, String> {
    serde_json::from_str(body).map_err(|e| format!("not JSON ({e}): {:?}", head(body)))
}

fn head(body: &str) -> &str {
    let t = body.trim();
    match t.char_indices().nth(200) {
        Some((i, _)) => &t[..i],
        None => t,
    }
}

fn odata_id<'a>(v: &'a Value, what: &str) -> Result<&'a str, String> {
    v.get("@odata.id")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{what} has no \"@odata.id\""))
}

/// Reads the service root (`/redfish/v1/`).
pub fn service_root(body: &str) -> Result<ServiceRoot, String> {
    let v = parse(body)?;
    let systems = odata_id(
        v.get("Systems")
            .ok_or("the service root has no \"Systems\" link")?,
        "Systems",
    )?
    .to_string();
    let sessions = v
        .pointer("/Links/Sessions/@odata.id")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(ServiceRoot { systems, sessions })
}

/// Reads a collection's member paths.
pub fn members(body: &str) -> Result<Vec<String>, String> {
    let v = parse(body)?;
    let m = v
        .get("Members")
        .and_then(Value::as_array)
        .ok_or("the collection has no \"Members\" array")?;
    m.iter()
        .map(|e| odata_id(e, "a member").map(str::to_string))
        .collect()
}

/// Maps a Redfish `PowerState` onto the core's: `On`, `Off`; anything else
/// (`PoweringOn`, `PoweringOff`, `Paused`) is [`PowerState::Unknown`].
pub fn power_state(s: &str) -> PowerState {
    match s {
        "On" => PowerState::On,
        "Off" => PowerState::Off,
        _ => PowerState::Unknown,
    }
}

/// Reads a `ComputerSystem`.
pub fn system(body: &str) -> Result<System, String> {
    let v = parse(body)?;
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let power_raw = text("PowerState").ok_or("the system has no \"PowerState\"")?;
    let reset = v.pointer("/Actions/#ComputerSystem.Reset");
    Ok(System {
        path: odata_id(&v, "the system")?.to_string(),
        id: text("Id").ok_or("the system has no \"Id\"")?,
        name: text("Name"),
        uuid: text("UUID"),
        power: power_state(&power_raw),
        power_raw,
        reset_target: reset
            .and_then(|r| r.get("target"))
            .and_then(Value::as_str)
            .map(str::to_string),
        reset_types: reset
            .and_then(|r| r.get("ResetType@Redfish.AllowableValues"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            }),
    })
}

/// The message of a Redfish error body: `error.message` and every
/// `@Message.ExtendedInfo[].Message`, joined with "; ". `None` if the body is
/// not a Redfish error.
pub fn error_message(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body).ok()?;
    let e = v.get("error")?;
    let mut parts: Vec<String> = Vec::new();
    if let Some(m) = e.get("message").and_then(Value::as_str) {
        parts.push(m.to_string());
    }
    if let Some(infos) = e.get("@Message.ExtendedInfo").and_then(Value::as_array) {
        for i in infos {
            if let Some(m) = i.get("Message").and_then(Value::as_str) {
                if !parts.iter().any(|p| p == m) {
                    parts.push(m.to_string());
                }
            }
        }
    }
    if parts.is_empty() {
        e.get("code").and_then(Value::as_str).map(str::to_string)
    } else {
        Some(parts.join("; "))
    }
}

/// A short text for a response body in an error: the Redfish error message,
/// or the start of the body.
pub fn describe_body(body: &str) -> String {
    error_message(body).unwrap_or_else(|| head(body).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! rec {
        ($name:literal) => {
            include_str!(concat!("../../testdata/redfish/", $name))
        };
    }

    const UUID: &str = "dcb1210f-c4bb-43e9-9276-76a6705a7ed3";

    #[test]
    fn service_roots() {
        assert_eq!(
            service_root(rec!("service_root.json")).unwrap(),
            ServiceRoot {
                systems: "/redfish/v1/Systems".into(),
                sessions: None
            }
        );
        assert_eq!(
            service_root(rec!("service_root_with_sessions.json"))
                .unwrap()
                .sessions
                .as_deref(),
            Some("/redfish/v1/SessionService/Sessions")
        );
        assert!(service_root("{}")
            .unwrap_err()
            .contains("no \"Systems\" link"));
        assert!(service_root("<html>").unwrap_err().starts_with("not JSON"));
    }

    #[test]
    fn collection_members() {
        assert_eq!(
            members(rec!("systems.json")).unwrap(),
            [format!("/redfish/v1/Systems/{UUID}")]
        );
        assert_eq!(members(r#"{"Members": []}"#).unwrap(), Vec::<String>::new());
        assert!(members(r#"{"Members": [{}]}"#).is_err());
    }

    #[test]
    fn systems_on_and_off() {
        let on = system(rec!("system_on.json")).unwrap();
        assert_eq!(on.power, PowerState::On);
        assert_eq!(on.path, format!("/redfish/v1/Systems/{UUID}"));
        assert_eq!(on.id, UUID);
        assert_eq!(on.name.as_deref(), Some("wspare-fence-probe"));
        assert_eq!(
            on.reset_target.as_deref(),
            Some(format!("/redfish/v1/Systems/{UUID}/Actions/ComputerSystem.Reset").as_str())
        );
        assert!(on.allows("ForceOff") && on.allows("On") && !on.allows("PushPowerButton"));
        assert!(on.is_named("wspare-fence-probe"));
        assert!(on.is_named(&UUID.to_uppercase()));
        assert!(!on.is_named("wspare-g1"));
        let off = system(rec!("system_off.json")).unwrap();
        assert_eq!(off.power, PowerState::Off);
        assert_eq!(power_state("PoweringOff"), PowerState::Unknown);
        let bare = system(
            r#"{"@odata.id": "/redfish/v1/Systems/1", "Id": "1", "PowerState": "PoweringOff"}"#,
        )
        .unwrap();
        assert_eq!(bare.power, PowerState::Unknown);
        assert_eq!(bare.power_raw, "PoweringOff");
        assert!(
            bare.allows("ForceOff"),
            "no list: assume allowed, the POST will tell"
        );
        assert!(system(r#"{"@odata.id": "/x", "Id": "1"}"#)
            .unwrap_err()
            .contains("no \"PowerState\""));
    }

    #[test]
    fn error_bodies() {
        assert_eq!(
            error_message(rec!("wrong_password.json")).unwrap(),
            "Incorrect username or password"
        );
        assert_eq!(
            error_message(rec!("no_auth.json")).unwrap(),
            "Authorization required"
        );
        assert_eq!(
            error_message(rec!("unknown_system.json")).unwrap(),
            "'function' object has no attribute 'NotFound'"
        );
        assert_eq!(
            error_message(
                r#"{"error":{"code":"Base.1.8.GeneralError","message":"A general error has occurred.",
                "@Message.ExtendedInfo":[{"MessageId":"Base.1.8.ActionParameterNotSupported",
                "Message":"The parameter ForceOff for the action ComputerSystem.Reset is not supported."}]}}"#
            )
            .unwrap(),
            "A general error has occurred.; The parameter ForceOff for the action ComputerSystem.Reset is not supported."
        );
        assert_eq!(error_message(rec!("system_on.json")), None);
        assert_eq!(
            describe_body("<html>Bad Gateway</html>"),
            "<html>Bad Gateway</html>"
        );
    }
}
