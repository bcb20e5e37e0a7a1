//! Redfish fencing over HTTPS (rustls).
//!
//! `fence` posts `ComputerSystem.Reset` with `ResetType: ForceOff` to the
//! node's system, then reads the system's `PowerState` until it is `Off` or
//! the confirm deadline passes; only a reading of `Off` makes a receipt.
//! `unfence` resets with `On` and reads back `On`.
//!
//! **Authentication**: [`RedfishAuth::Session`] (the default) logs in once
//! per call (`POST` to the service root's `Links.Sessions`, or
//! `/redfish/v1/SessionService/Sessions`), sends the `X-Auth-Token` on every
//! request of that call, and deletes the session at the end;
//! [`RedfishAuth::Basic`] sends HTTP basic auth on every request. Tokens and
//! the basic-auth header are marked sensitive; neither appears in errors.
//!
//! **TLS**: certificates are verified by default against the built-in web
//! roots. A BMC with a self-signed certificate is trusted by naming its CA
//! (or the certificate itself) in [`RedfishDevice::ca_cert`]: then only that
//! CA is trusted for this device. [`RedfishDevice::tls_verify`]` = false`
//! turns verification off for that one device (an explicit, per-device
//! opt-out, logged as a warning when the fencer is built). Plain `http://`
//! is refused: the password would cross the network in clear.
//!
//! Paths the BMC returns (`@odata.id`, the reset target, the session
//! location) must be absolute paths on the same host; credentials are never
//! sent anywhere else, and redirects are not followed.

pub mod parse;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderValue, ACCEPT};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde_json::json;
use wspare_core::runner::{redact, Secret};
use wspare_core::{FenceReceipt, FenceScope, Fencer, FencerCaps, NodeId, PowerState, Result};

use crate::confirm::{confirm_off, confirm_on, Timing};
use crate::error::{Exchange, FenceError, Op};

/// The session collection when the service root does not link one.
const DEFAULT_SESSIONS: &str = "/redfish/v1/SessionService/Sessions";

/// How the fencer authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RedfishAuth {
    /// A Redfish session per call: the password crosses the wire once.
    #[default]
    Session,
    /// HTTP basic auth on every request.
    Basic,
}

/// One Redfish service (a BMC, or a chassis manager serving several systems).
#[derive(Clone, Debug)]
pub struct RedfishDevice {
    /// `https://host[:port]`, nothing after the authority.
    pub url: String,
    /// User name.
    pub username: String,
    /// Password.
    pub password: Secret,
    /// Session or basic auth.
    pub auth: RedfishAuth,
    /// Verify the BMC's certificate (default `true`).
    pub tls_verify: bool,
    /// PEM file with the CA (or self-signed certificate) to trust for this
    /// device instead of the built-in roots.
    pub ca_cert: Option<PathBuf>,
    /// Deadlines and pacing; `command_timeout` bounds each HTTP request.
    pub timing: Timing,
}

impl RedfishDevice {
    /// A device at `url` with session auth, verification against the
    /// built-in roots and [`Timing::default`] (20 s per request).
    pub fn new(url: impl Into<String>, username: impl Into<String>, password: Secret) -> Self {
        RedfishDevice {
            url: url.into(),
            username: username.into(),
            password,
            auth: RedfishAuth::Session,
            tls_verify: true,
            ca_cert: None,
            timing: Timing::default(),
        }
    }
}

/// Which system of the service is the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SystemRef {
    /// The service's only system.
    Only,
    /// A system whose `Id`, `Name` or `UUID` is this.
    Named(String),
    /// The system at this path (`/redfish/v1/Systems/1`).
    Path(String),
}

/// What a node's system resolved to.
#[derive(Clone, Debug)]
struct Resolved {
    path: String,
    reset_target: String,
    allows_force_off: bool,
    allows_on: bool,
}

/// Authentication state of one call.
enum Auth {
    Basic,
    Token {
        token: Secret,
        location: Option<String>,
    },
}

/// Fences nodes through one Redfish service. See the module docs.
pub struct RedfishFencer {
    name: String,
    device: RedfishDevice,
    base: Url,
    client: reqwest::Client,
    systems: BTreeMap<NodeId, SystemRef>,
    resolved: Mutex<BTreeMap<NodeId, Resolved>>,
}

impl fmt::Debug for RedfishFencer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedfishFencer")
            .field("device", &self.describe())
            .field("systems", &self.systems)
            .finish()
    }
}

/// Checks that `p` is an absolute path on the same host.
fn is_local_path(p: &str) -> bool {
    p.starts_with('/') && !p.starts_with("//") && !p.contains(['\\', '\r', '\n'])
}

impl RedfishFencer {
    /// A fencer named `name` (from the config) for the service `device`.
    /// It serves no node until [`RedfishFencer::node`] adds one.
    pub fn new(name: impl Into<String>, device: RedfishDevice) -> Result<Self, FenceError> {
        let name = name.into();
        let field = format!("devices.{name}");
        let base = Url::parse(&device.url).map_err(|e| {
            FenceError::config(format!("{field}.url"), format!("{:?}: {e}", device.url))
        })?;
        if base.scheme() != "https" {
            return Err(FenceError::config(
                format!("{field}.url"),
                "Redfish needs https:// (the password must not cross the network in clear)",
            ));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(FenceError::config(
                format!("{field}.url"),
                "no credentials in the URL: use username and password-file",
            ));
        }
        if !matches!(base.path(), "" | "/") || base.query().is_some() || base.fragment().is_some() {
            return Err(FenceError::config(
                format!("{field}.url"),
                "only scheme, host and port: https://host[:port]",
            ));
        }
        if device.username.is_empty() || device.username.chars().any(char::is_control) {
            return Err(FenceError::config(
                format!("{field}.username"),
                "empty or not printable",
            ));
        }
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(device.timing.command_timeout)
            .connect_timeout(device.timing.command_timeout.min(Duration::from_secs(10)));
        match (&device.ca_cert, device.tls_verify) {
            (Some(_), false) => {
                return Err(FenceError::config(
                    format!("{field}.ca-cert"),
                    "a CA to trust makes no sense with tls-verify = false",
                ))
            }
            (Some(p), true) => {
                let pem = std::fs::read(p).map_err(|e| {
                    FenceError::config(
                        format!("{field}.ca-cert"),
                        format!("cannot read {}: {e}", p.display()),
                    )
                })?;
                let not_pem = |why: String| {
                    FenceError::config(
                        format!("{field}.ca-cert"),
                        format!("{} holds no PEM certificate{why}", p.display()),
                    )
                };
                let certs = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| not_pem(format!(": {e}")))?;
                if certs.is_empty() {
                    return Err(not_pem(String::new()));
                }
                b = b.tls_built_in_root_certs(false);
                for cert in certs {
                    b = b.add_root_certificate(cert);
                }
            }
            (None, false) => {
                tracing::warn!(device = %name, url = %device.url, "TLS certificate verification is OFF for this device");
                b = b.danger_accept_invalid_certs(true);
            }
            (None, true) => {}
        }
        let client = b.build().map_err(|e| {
            FenceError::config(field, format!("cannot build the HTTPS client: {e}"))
        })?;
        Ok(RedfishFencer {
            name,
            device,
            base,
            client,
            systems: BTreeMap::new(),
            resolved: Mutex::new(BTreeMap::new()),
        })
    }

    /// Serves `node`: the service's system `system`.
    pub fn node(mut self, node: NodeId, system: SystemRef) -> Result<Self, FenceError> {
        let bad = match &system {
            SystemRef::Path(p) => !is_local_path(p),
            SystemRef::Named(n) => n.is_empty() || n.chars().any(char::is_control),
            SystemRef::Only => false,
        };
        if bad {
            return Err(FenceError::config(
                format!("nodes.{node}.system"),
                format!("{system:?} is not a system name or an absolute path"),
            ));
        }
        self.systems.insert(node, system);
        Ok(self)
    }

    fn system_ref(&self, node: &NodeId) -> Result<&SystemRef, FenceError> {
        self.systems
            .get(node)
            .ok_or_else(|| FenceError::UnknownNode {
                device: self.describe(),
                node: node.clone(),
            })
    }

    fn redact(&self, text: &str, auth: Option<&Auth>) -> String {
        let mut secrets = vec![&self.device.password];
        if let Some(Auth::Token { token, .. }) = auth {
            secrets.push(token);
        }
        redact(text, &secrets)
    }

    fn exchange(
        &self,
        node: &NodeId,
        op: Op,
        asked: String,
        reply: &str,
        auth: Option<&Auth>,
    ) -> Exchange {
        Exchange {
            device: self.describe(),
            node: node.clone(),
            op,
            asked,
            reply: self.redact(reply, auth),
        }
    }

    fn url(&self, path: &str) -> Result<Url, String> {
        if !is_local_path(path) {
            return Err(format!("{path:?} is not an absolute path on this service"));
        }
        self.base.join(path).map_err(|e| format!("{path:?}: {e}"))
    }

    /// Sends one request and returns the body of a 2xx answer, or the error.
    async fn send(
        &self,
        node: &NodeId,
        op: Op,
        auth: Option<&Auth>,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(reqwest::header::HeaderMap, String), FenceError> {
        let url = self.url(path).map_err(|why| {
            FenceError::BadReply(self.exchange(node, op, format!("{method} {path}"), &why, auth))
        })?;
        let asked = format!("{method} {url}");
        let mut rb = self
            .client
            .request(method.clone(), url)
            .header(ACCEPT, "application/json")
            .header("OData-Version", "4.0");
        match auth {
            None => {}
            Some(Auth::Basic) => {
                rb = rb.basic_auth(&self.device.username, Some(self.device.password.expose()))
            }
            Some(Auth::Token { token, .. }) => {
                let mut v = HeaderValue::from_str(token.expose()).map_err(|_| {
                    FenceError::BadReply(self.exchange(
                        node,
                        op,
                        asked.clone(),
                        "unusable X-Auth-Token",
                        auth,
                    ))
                })?;
                v.set_sensitive(true);
                rb = rb.header("X-Auth-Token", v);
            }
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        tracing::debug!(device = %self.name, %node, %asked, "redfish request");
        let resp = rb
            .send()
            .await
            .map_err(|e| self.transport_error(node, op, &asked, &e, auth))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp
            .text()
            .await
            .map_err(|e| self.transport_error(node, op, &asked, &e, auth))?;
        if status.is_success() {
            return Ok((headers, text));
        }
        let reply = format!("HTTP {status}: {}", parse::describe_body(&text));
        let x = self.exchange(node, op, asked, &reply, auth);
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => FenceError::CredentialsRefused(x),
            StatusCode::NOT_FOUND
            | StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::NOT_IMPLEMENTED => FenceError::Unsupported(x),
            _ => FenceError::Refused(x),
        })
    }

    fn transport_error(
        &self,
        node: &NodeId,
        op: Op,
        asked: &str,
        e: &reqwest::Error,
        auth: Option<&Auth>,
    ) -> FenceError {
        let mut chain = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            let t = s.to_string();
            if !chain.contains(&t) {
                chain.push_str(": ");
                chain.push_str(&t);
            }
            src = s.source();
        }
        let lower = chain.to_ascii_lowercase();
        if lower.contains("certificate")
            || lower.contains("unknownissuer")
            || lower.contains("notvalidforname")
        {
            let hint = "; trust the BMC's CA with ca-cert, or turn verification off for this device with tls-verify = false";
            return FenceError::Misconfigured(self.exchange(
                node,
                op,
                asked.into(),
                &format!("TLS: {chain}{hint}"),
                auth,
            ));
        }
        let x = self.exchange(node, op, asked.into(), &chain, auth);
        if e.is_timeout() && e.is_connect() {
            FenceError::NoAnswer(x)
        } else if e.is_timeout() {
            FenceError::AnswerLost(x)
        } else if e.is_connect() {
            FenceError::Unreachable(x)
        } else {
            FenceError::AnswerLost(x)
        }
    }

    async fn get_json(
        &self,
        node: &NodeId,
        op: Op,
        auth: Option<&Auth>,
        path: &str,
    ) -> Result<String, FenceError> {
        Ok(self.send(node, op, auth, Method::GET, path, None).await?.1)
    }

    async fn root(
        &self,
        node: &NodeId,
        op: Op,
        auth: Option<&Auth>,
    ) -> Result<parse::ServiceRoot, FenceError> {
        let body = self.get_json(node, op, auth, "/redfish/v1/").await?;
        parse::service_root(&body).map_err(|why| {
            FenceError::BadReply(self.exchange(node, op, "GET /redfish/v1/".into(), &why, auth))
        })
    }

    /// Starts a call: logs in for session auth.
    async fn open(&self, node: &NodeId) -> Result<Auth, FenceError> {
        if self.device.auth == RedfishAuth::Basic {
            return Ok(Auth::Basic);
        }
        let sessions = self
            .root(node, Op::Connect, None)
            .await?
            .sessions
            .unwrap_or_else(|| DEFAULT_SESSIONS.to_string());
        let body =
            json!({"UserName": self.device.username, "Password": self.device.password.expose()});
        let (headers, text) = self
            .send(node, Op::Connect, None, Method::POST, &sessions, Some(body))
            .await
            .map_err(|e| match e {
                FenceError::Unsupported(x) => FenceError::Unsupported(Exchange {
                    reply: format!(
                        "{}; this service has no Redfish sessions: set auth = \"basic\"",
                        x.reply
                    ),
                    ..x
                }),
                e => e,
            })?;
        let token = headers
            .get("X-Auth-Token")
            .and_then(|v| v.to_str().ok())
            .map(|t| Secret::new(t.to_string()))
            .ok_or_else(|| {
                FenceError::BadReply(self.exchange(
                    node,
                    Op::Connect,
                    format!("POST {sessions}"),
                    &format!(
                        "session created without an X-Auth-Token header: {}",
                        parse::describe_body(&text)
                    ),
                    None,
                ))
            })?;
        let location = headers
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(|l| match Url::parse(l) {
                // An absolute URL: keep its path only if it is on this service.
                Ok(u) if u.origin() == self.base.origin() => u.path().to_string(),
                Ok(_) => String::new(),
                Err(_) => l.to_string(),
            })
            .filter(|l| is_local_path(l));
        Ok(Auth::Token { token, location })
    }

    /// Ends a call: logs out of a session (best effort).
    async fn close(&self, node: &NodeId, auth: Auth) {
        if let Auth::Token {
            location: Some(loc),
            ..
        } = &auth
        {
            if let Err(e) = self
                .send(node, Op::Connect, Some(&auth), Method::DELETE, loc, None)
                .await
            {
                tracing::warn!(device = %self.name, error = %e, "could not delete the Redfish session");
            }
        }
    }

    /// Finds the node's system, once.
    async fn resolve(&self, node: &NodeId, op: Op, auth: &Auth) -> Result<Resolved, FenceError> {
        if let Some(r) = self.resolved.lock().expect("resolved lock").get(node) {
            return Ok(r.clone());
        }
        let system = match self.system_ref(node)? {
            SystemRef::Path(p) => self.system(node, op, auth, p).await?,
            wanted => self.find_system(node, op, auth, wanted).await?,
        };
        let reset_target = system.reset_target.clone().ok_or_else(|| {
            FenceError::Unsupported(self.exchange(
                node,
                op,
                format!("GET {}", system.path),
                "the system has no #ComputerSystem.Reset action",
                Some(auth),
            ))
        })?;
        let r = Resolved {
            path: system.path.clone(),
            reset_target,
            allows_force_off: system.allows("ForceOff"),
            allows_on: system.allows("On"),
        };
        self.resolved
            .lock()
            .expect("resolved lock")
            .insert(node.clone(), r.clone());
        Ok(r)
    }

    /// Walks the service's Systems collection for `wanted`: a system's name,
    /// or the only system.
    async fn find_system(
        &self,
        node: &NodeId,
        op: Op,
        auth: &Auth,
        wanted: &SystemRef,
    ) -> Result<parse::System, FenceError> {
        let root = self.root(node, op, Some(auth)).await?;
        let body = self.get_json(node, op, Some(auth), &root.systems).await?;
        let members = parse::members(&body).map_err(|why| {
            let asked = format!("GET {}", root.systems);
            FenceError::BadReply(self.exchange(node, op, asked, &why, Some(auth)))
        })?;
        let mut seen = Vec::new();
        for m in &members {
            let s = self.system(node, op, auth, m).await?;
            let hit = match wanted {
                SystemRef::Named(n) => s.is_named(n),
                _ => members.len() == 1,
            };
            if hit {
                return Ok(s);
            }
            seen.push(s.name.unwrap_or(s.id));
        }
        let what = match wanted {
            SystemRef::Named(n) => format!("no system named {n:?}"),
            _ => format!(
                "{} systems, so the node must name one (system = ...)",
                members.len()
            ),
        };
        Err(FenceError::Misconfigured(self.exchange(
            node,
            op,
            format!("GET {}", root.systems),
            &format!("{what}; the service has: {}", seen.join(", ")),
            Some(auth),
        )))
    }

    /// Reads the system at `path`.
    async fn system(
        &self,
        node: &NodeId,
        op: Op,
        auth: &Auth,
        path: &str,
    ) -> Result<parse::System, FenceError> {
        let body = self.get_json(node, op, Some(auth), path).await?;
        parse::system(&body).map_err(|why| {
            FenceError::BadReply(self.exchange(node, op, format!("GET {path}"), &why, Some(auth)))
        })
    }

    async fn read_power(
        &self,
        node: &NodeId,
        auth: &Auth,
        path: &str,
    ) -> Result<PowerState, FenceError> {
        Ok(self.system(node, Op::PowerStatus, auth, path).await?.power)
    }

    async fn reset(
        &self,
        node: &NodeId,
        op: Op,
        auth: &Auth,
        sys: &Resolved,
        reset_type: &str,
    ) -> Result<(), FenceError> {
        self.send(
            node,
            op,
            Some(auth),
            Method::POST,
            &sys.reset_target,
            Some(json!({ "ResetType": reset_type })),
        )
        .await
        .map(|_| ())
    }

    async fn fence_in(&self, node: &NodeId, auth: &Auth) -> Result<FenceReceipt, FenceError> {
        let sys = self.resolve(node, Op::PowerOff, auth).await?;
        if !sys.allows_force_off {
            return Err(FenceError::Unsupported(self.exchange(
                node,
                Op::PowerOff,
                format!("GET {}", sys.path),
                "ForceOff is not among the system's ResetType@Redfish.AllowableValues",
                Some(auth),
            )));
        }
        let off = self.reset(node, Op::PowerOff, auth, &sys, "ForceOff").await;
        let status = || self.read_power(node, auth, &sys.path);
        confirm_off(&self.describe(), node, &self.device.timing, off, status).await
    }

    async fn unfence_in(&self, node: &NodeId, auth: &Auth) -> Result<(), FenceError> {
        let sys = self.resolve(node, Op::PowerOn, auth).await?;
        let kind = if sys.allows_on { "On" } else { "ForceOn" };
        let on = self.reset(node, Op::PowerOn, auth, &sys, kind).await;
        let status = || self.read_power(node, auth, &sys.path);
        confirm_on(&self.describe(), node, &self.device.timing, on, status).await
    }

    async fn status_in(&self, node: &NodeId, auth: &Auth) -> Result<PowerState, FenceError> {
        let sys = self.resolve(node, Op::PowerStatus, auth).await?;
        self.read_power(node, auth, &sys.path).await
    }
}

#[async_trait]
impl Fencer for RedfishFencer {
    fn describe(&self) -> String {
        format!(
            "redfish {} ({})",
            self.name,
            self.base.as_str().trim_end_matches('/')
        )
    }

    fn capabilities(&self) -> FencerCaps {
        FencerCaps {
            scope: FenceScope::Host,
            unfence: true,
        }
    }

    async fn fence(&self, node: &NodeId) -> Result<FenceReceipt> {
        self.system_ref(node)?;
        let auth = self.open(node).await?;
        let r = self.fence_in(node, &auth).await;
        self.close(node, auth).await;
        Ok(r?)
    }

    async fn power_status(&self, node: &NodeId) -> Result<PowerState> {
        self.system_ref(node)?;
        let auth = self.open(node).await?;
        let r = self.status_in(node, &auth).await;
        self.close(node, auth).await;
        Ok(r?)
    }

    async fn unfence(&self, node: &NodeId) -> Result<()> {
        self.system_ref(node)?;
        let auth = self.open(node).await?;
        let r = self.unfence_in(node, &auth).await;
        self.close(node, auth).await;
        Ok(r?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wspare_core::ErrorKind;

    fn dev(url: &str) -> RedfishDevice {
        RedfishDevice::new(url, "admin", Secret::new("s3cretpw"))
    }

    #[test]
    fn urls_are_checked() {
        for (url, why) in [
            ("http://10.0.0.6", "needs https://"),
            ("https://admin:pw@10.0.0.6", "no credentials in the URL"),
            ("https://10.0.0.6/redfish/v1", "only scheme, host and port"),
            ("https://10.0.0.6/?x=1", "only scheme, host and port"),
            ("10.0.0.6", "relative URL"),
        ] {
            let e = RedfishFencer::new("bmc-r", dev(url)).unwrap_err();
            assert!(e.to_string().contains("devices.bmc-r.url"), "{e}");
            assert!(e.to_string().contains(why), "{url}: {e}");
        }
        let f = RedfishFencer::new("bmc-r", dev("https://10.0.0.6:8443")).unwrap();
        assert_eq!(f.describe(), "redfish bmc-r (https://10.0.0.6:8443)");
        assert_eq!(
            f.url("/redfish/v1/Systems/1").unwrap().as_str(),
            "https://10.0.0.6:8443/redfish/v1/Systems/1"
        );
        assert!(f.url("//evil.example/x").is_err());
        assert!(f.url("https://evil.example/x").is_err());
    }

    #[test]
    fn tls_options_are_checked() {
        let mut d = dev("https://10.0.0.6");
        d.ca_cert = Some("/nonexistent/ca.pem".into());
        let e = RedfishFencer::new("bmc-r", d.clone()).unwrap_err();
        assert!(
            e.to_string()
                .contains("devices.bmc-r.ca-cert: cannot read /nonexistent/ca.pem"),
            "{e}"
        );
        d.tls_verify = false;
        let e = RedfishFencer::new("bmc-r", d.clone()).unwrap_err();
        assert!(
            e.to_string()
                .contains("makes no sense with tls-verify = false"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("junk.pem");
        std::fs::write(&p, "not a certificate").unwrap();
        d.tls_verify = true;
        d.ca_cert = Some(p);
        let e = RedfishFencer::new("bmc-r", d).unwrap_err();
        assert!(
            e.to_string().contains("junk.pem holds no PEM certificate"),
            "{e}"
        );
    }

    #[test]
    fn nodes_and_systems() {
        let f = RedfishFencer::new("bmc-r", dev("https://10.0.0.6"))
            .unwrap()
            .node(NodeId::new("node-a").unwrap(), SystemRef::Named("1".into()))
            .unwrap();
        assert!(f.system_ref(&NodeId::new("node-a").unwrap()).is_ok());
        let e =
            wspare_core::Error::from(f.system_ref(&NodeId::new("node-b").unwrap()).unwrap_err());
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = RedfishFencer::new("bmc-r", dev("https://10.0.0.6"))
            .unwrap()
            .node(
                NodeId::new("node-a").unwrap(),
                SystemRef::Path("https://x/redfish".into()),
            )
            .unwrap_err();
        assert!(e.to_string().contains("nodes.node-a.system"), "{e}");
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable_and_names_everything() {
        // Bind then drop: nothing listens on the port.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut d = dev(&format!("https://127.0.0.1:{port}"));
        d.auth = RedfishAuth::Basic;
        let node = NodeId::new("node-a").unwrap();
        let f = RedfishFencer::new("bmc-r", d)
            .unwrap()
            .node(node.clone(), SystemRef::Only)
            .unwrap();
        let e = f.fence(&node).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unreachable, "{e}");
        let m = e.message();
        assert!(
            m.starts_with(&format!(
                "device unreachable: redfish bmc-r (https://127.0.0.1:{port}): power off of node node-a: asked `GET https://127.0.0.1:{port}/redfish/v1/`"
            )),
            "{m}"
        );
        assert!(!m.contains("s3cretpw"));
    }
}
