//! `check-config`: every error of a config file, each with its field and
//! line, and warnings; never a panic.
//!
//! The core's loader stops at the first error serde meets (an unknown key,
//! a wrong type) and reports it without a field name. So this check first
//! walks the TOML itself, key by key:
//!
//! 1. syntax (one error: nothing else can be read);
//! 2. every key of every table is decoded alone into the type that owns
//!    it, which reports unknown keys (with a suggestion), wrong types and
//!    bad values one by one; required keys that are absent are listed; a
//!    pair whose primary and spare are the same node, or name an undefined
//!    node, is reported here too, so that it shows beside the typos;
//! 3. when the structure is sound, the core's validation (policies,
//!    addresses, duplicates...), the agent's backend tables and the
//!    fencing topology are checked as the agent would build them.
//!
//! Lines come from a small scanner of the file's table headers and keys
//! (`LineIndex`), which knows `[[node]]`, `[node.hypervisor]`, dotted keys
//! and values spanning lines.

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use wspare_core::config::{line_of, ClusterConfig, Config, ConfigError};
use wspare_core::detector::DetectorConfig;
use wspare_core::driver::Deadlines;
use wspare_core::machine::Policy;
use wspare_core::{NodeId, PairId, VmName};
use wspare_fence::config::{AgentConfig, IpmiConfig, RedfishConfig};

use crate::settings::{
    self, AgentSection, LibvirtSection, RsyncSection, SshSection, WitnessSection,
};

/// What `check-config` found.
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Errors, in line order.
    pub(crate) errors: Vec<ConfigError>,
    /// Things that work but are probably not meant.
    pub(crate) warnings: Vec<String>,
    /// Nodes and pairs, when the file is sound.
    pub(crate) summary: Option<String>,
}

/// Checks config text. `path` is only used in messages and to resolve
/// nothing: files it names (keys, passwords) are checked where they are.
pub(crate) fn check(text: &str, path: &Path) -> Report {
    let mut r = Report::default();
    let doc: toml::Table = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            r.errors.push(ConfigError {
                field: String::new(),
                line: e.span().map(|s| line_of(text, s.start)),
                message: e
                    .message()
                    .trim_end()
                    .lines()
                    .collect::<Vec<_>>()
                    .join("; "),
            });
            return r;
        }
    };
    let idx = LineIndex::new(text);
    let mut c = Checker {
        idx: &idx,
        errors: Vec::new(),
    };
    c.structure(&doc);
    semantic(text, path, &mut r);
    if !c.errors.is_empty() {
        // The structural errors, and those of the later checks that are
        // about other fields (a syntax-level error there has no field: it
        // is one of the structural ones, seen again).
        let later = std::mem::take(&mut r.errors);
        r.errors = c.errors;
        for e in later {
            let related =
                |x: &ConfigError| x.field.starts_with(&e.field) || e.field.starts_with(&x.field);
            if !e.field.is_empty() && !r.errors.iter().any(related) {
                r.errors.push(e);
            }
        }
        r.summary = None;
        r.warnings.clear();
    }
    r.errors.sort_by_key(|e| e.line.unwrap_or(0));
    r.errors.dedup();
    r
}

/// Step 3: the core's validation and the agent's decoding, as at startup.
fn semantic(text: &str, path: &Path, r: &mut Report) {
    let core = match Config::parse(text) {
        Ok(c) => c,
        Err(e) => {
            r.errors.extend(e.errors);
            return;
        }
    };
    match settings::decode(&core, path) {
        Ok(d) => {
            r.warnings.extend(d.warnings);
            if let Err(e) = crate::fencing::topology(&d.nodes, &core) {
                r.errors.push(e);
            }
            if r.errors.is_empty() {
                r.summary = Some(format!(
                    "{} node(s), {} pair(s)",
                    core.nodes.len(),
                    core.pairs.len()
                ));
            }
        }
        Err(e) => r.errors.extend(e.errors),
    }
}

struct Checker<'a> {
    idx: &'a LineIndex,
    errors: Vec<ConfigError>,
}

/// `[[node]]` keys, for the per-key check.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[allow(dead_code)]
struct NodeProbe {
    name: Option<NodeId>,
    address: Option<String>,
    #[serde(default, with = "humantime_serde")]
    fence_delay: Option<std::time::Duration>,
    hypervisor: Option<toml::Table>,
    fence: Option<toml::Value>,
}

/// `[[pair]]` keys.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[allow(dead_code)]
struct PairProbe {
    name: Option<PairId>,
    vm: Option<VmName>,
    primary: Option<NodeId>,
    spare: Option<NodeId>,
    policy: Option<toml::Table>,
    replication: Option<toml::Table>,
}

/// Top-level keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct TopProbe {
    cluster: Option<toml::Value>,
    defaults: Option<toml::Value>,
    node: Option<toml::Value>,
    pair: Option<toml::Value>,
    agent: Option<toml::Value>,
}

impl Checker<'_> {
    fn err(&mut self, path: &str, key: Option<&str>, field: String, message: String) {
        let line = self.idx.line(path, key);
        self.errors.push(ConfigError {
            field,
            line,
            message,
        });
    }

    /// Decodes each key of `t` alone into `T`; `path` is where `t` is in
    /// the file (index form), `label` how errors name it.
    fn keys<T: DeserializeOwned>(&mut self, t: &toml::Table, path: &str, label: &str) {
        for (k, v) in t {
            if let Some(m) = probe::<T>(k, v) {
                let field = join(label, k);
                self.err(path, Some(k), field, m);
            }
        }
    }

    fn required(&mut self, t: &toml::Table, keys: &[&str], path: &str, label: &str, what: &str) {
        for k in keys {
            if !t.contains_key(*k) {
                self.err(
                    path,
                    None,
                    join(label, k),
                    format!("missing field `{k}` ({what})"),
                );
            }
        }
    }

    fn table<'t>(
        &mut self,
        v: &'t toml::Value,
        path: &str,
        label: &str,
    ) -> Option<&'t toml::Table> {
        match v {
            toml::Value::Table(t) => Some(t),
            other => {
                let (p, k) = split_last(path);
                self.err(
                    p,
                    k,
                    label.to_string(),
                    format!("expected a table, found {}", other.type_str()),
                );
                None
            }
        }
    }

    /// The table under `key` of `parent` (at `path`, named `label`), with
    /// its own path and label; an error if it is there but not a table.
    fn sub<'t>(
        &mut self,
        parent: &'t toml::Table,
        key: &str,
        path: &str,
        label: &str,
    ) -> Option<(&'t toml::Table, String, String)> {
        let (p, l) = (join(path, key), join(label, key));
        let t = self.table(parent.get(key)?, &p, &l)?;
        Some((t, p, l))
    }

    fn structure(&mut self, doc: &toml::Table) {
        self.keys::<TopProbe>(doc, "", "");
        if let Some((t, p, l)) = self.sub(doc, "cluster", "", "") {
            self.keys::<ClusterConfig>(t, &p, &l);
        }
        if let Some((t, p, l)) = self.sub(doc, "defaults", "", "") {
            self.policy(t, &p, &l);
        }
        if let Some((t, p, l)) = self.sub(doc, "agent", "", "") {
            self.agent(t, &p, &l);
        }
        let nodes = array_of_tables(doc.get("node"));
        let mut names = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let path = format!("node[{i}]");
            let label = match n.get("name").and_then(|v| v.as_str()) {
                Some(s) => {
                    names.push(s.to_string());
                    format!("node[{s}]")
                }
                None => path.clone(),
            };
            self.keys::<NodeProbe>(n, &path, &label);
            self.required(
                n,
                &["name", "address"],
                &path,
                &label,
                "every node needs it",
            );
            if let Some((t, p, l)) = self.sub(n, "hypervisor", &path, &label) {
                self.hypervisor(t, &p, &l);
            }
            if let Some(v) = n.get("fence") {
                self.fence(v, &format!("{path}.fence"), &format!("{label}.fence"));
            }
        }
        for (i, p) in array_of_tables(doc.get("pair")).iter().enumerate() {
            let path = format!("pair[{i}]");
            let label = match p.get("name").and_then(|v| v.as_str()) {
                Some(s) => format!("pair[{s}]"),
                None => path.clone(),
            };
            self.keys::<PairProbe>(p, &path, &label);
            self.required(
                p,
                &["name", "vm", "primary", "spare"],
                &path,
                &label,
                "every pair needs it",
            );
            let prim = p.get("primary").and_then(|v| v.as_str());
            let spare = p.get("spare").and_then(|v| v.as_str());
            if let (Some(a), Some(b)) = (prim, spare) {
                if a == b {
                    self.err(
                        &path,
                        Some("spare"),
                        format!("{label}.spare"),
                        format!("primary and spare are both {a}: a spare on the same host protects nothing"),
                    );
                }
            }
            for (key, n) in [("primary", prim), ("spare", spare)] {
                if let Some(n) = n {
                    if !names.iter().any(|x| x == n) {
                        self.err(
                            &path,
                            Some(key),
                            format!("{label}.{key}"),
                            format!("node {n} is not defined"),
                        );
                    }
                }
            }
            if let Some((t, pp, l)) = self.sub(p, "policy", &path, &label) {
                self.policy(t, &pp, &l);
            }
            if let Some((t, pp, l)) = self.sub(p, "replication", &path, &label) {
                self.replication(t, &pp, &l);
            }
        }
    }

    /// A backend table whose `type` was checked: its other keys decoded
    /// into `T`, its required ones present.
    fn typed<T: DeserializeOwned>(
        &mut self,
        t: &toml::Table,
        path: &str,
        label: &str,
        required: &[&str],
        what: &str,
    ) {
        self.keys::<T>(&without(t, &["type"]), path, label);
        self.required(t, required, path, label, what);
    }

    fn policy(&mut self, t: &toml::Table, path: &str, label: &str) {
        self.keys::<Policy>(&without(t, &["detector"]), path, label);
        if let Some((d, p, l)) = self.sub(t, "detector", path, label) {
            self.keys::<DetectorConfig>(d, &p, &l);
        }
    }

    fn agent(&mut self, t: &toml::Table, path: &str, label: &str) {
        let plain = without(t, &["ssh", "witness", "deadlines"]);
        self.keys::<AgentSection>(&plain, path, label);
        self.required(t, &["key-file"], path, label, "the shared heartbeat key");
        if let Some((s, p, l)) = self.sub(t, "ssh", path, label) {
            self.keys::<SshSection>(&without(s, &["hosts"]), &p, &l);
            if let Some((h, p, l)) = self.sub(s, "hosts", &p, &l) {
                for (k, v) in h {
                    if !v.is_str() {
                        self.err(
                            &p,
                            Some(k),
                            join(&l, k),
                            format!("expected a host name, found {}", v.type_str()),
                        );
                    }
                }
            }
        }
        if let Some((w, p, l)) = self.sub(t, "witness", path, label) {
            self.keys::<WitnessSection>(w, &p, &l);
            self.required(w, &["command"], &p, &l, "the witness's argv");
        }
        if let Some((d, p, l)) = self.sub(t, "deadlines", path, label) {
            self.keys::<Deadlines>(d, &p, &l);
        }
    }

    /// The `type` of a backend table, checked against `known`.
    fn backend_type<'t>(
        &mut self,
        t: &'t toml::Table,
        path: &str,
        label: &str,
        known: &[&str],
    ) -> Option<&'t str> {
        match t.get("type") {
            None => {
                self.err(
                    path,
                    None,
                    format!("{label}.type"),
                    format!(
                        "missing field `type` (which backend: {})",
                        quoted_list(known)
                    ),
                );
                None
            }
            Some(toml::Value::String(s)) if known.contains(&s.as_str()) => Some(s),
            Some(toml::Value::String(s)) => {
                self.err(
                    path,
                    Some("type"),
                    format!("{label}.type"),
                    format!(
                        "unknown backend `{s}`, expected {}{}",
                        quoted_list(known),
                        suggest(s, known)
                    ),
                );
                None
            }
            Some(other) => {
                self.err(
                    path,
                    Some("type"),
                    format!("{label}.type"),
                    format!("expected a string, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn hypervisor(&mut self, t: &toml::Table, path: &str, label: &str) {
        if self.backend_type(t, path, label, &["libvirt"]).is_some() {
            let required = ["uri", "peer-uri"];
            self.typed::<LibvirtSection>(t, path, label, &required, "libvirt needs it");
        }
    }

    fn replication(&mut self, t: &toml::Table, path: &str, label: &str) {
        if self.backend_type(t, path, label, &["rsync"]).is_some() {
            self.typed::<RsyncSection>(t, path, label, &["dir"], "the replica directory");
        }
    }

    fn fence(&mut self, v: &toml::Value, path: &str, label: &str) {
        match v {
            toml::Value::Table(t) => self.fence_device(t, path, label),
            toml::Value::Array(levels) => {
                if levels.is_empty() {
                    let (p, k) = split_last(path);
                    self.err(p, k, label.into(), "needs at least one level".into());
                }
                for (i, l) in levels.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    let lb = format!("{label}[{i}]");
                    if let Some(t) = self.table(l, &p, &lb) {
                        self.fence_device(t, &p, &lb);
                    }
                }
            }
            other => {
                let (p, k) = split_last(path);
                self.err(
                    p,
                    k,
                    label.into(),
                    format!(
                        "expected a device table ([node.fence]) or levels ([[node.fence]]), found {}",
                        other.type_str()
                    ),
                )
            }
        }
    }

    fn fence_device(&mut self, t: &toml::Table, path: &str, label: &str) {
        let known = ["ipmi", "redfish", "fence-agent"];
        let Some(kind) = self.backend_type(t, path, label, &known) else {
            return;
        };
        match kind {
            "ipmi" => {
                let required = ["host", "username", "password-file"];
                self.typed::<IpmiConfig>(t, path, label, &required, "IPMI needs it");
            }
            "redfish" => {
                let required = ["url", "username", "password-file"];
                self.typed::<RedfishConfig>(t, path, label, &required, "Redfish needs it");
            }
            _ => self.typed::<AgentConfig>(t, path, label, &["agent"], "the fence agent to run"),
        }
    }
}

/// Decodes `{key = value}` into `T`: the error for this key alone, if any
/// (a missing field is another key's business).
fn probe<T: DeserializeOwned>(key: &str, value: &toml::Value) -> Option<String> {
    let mut t = toml::Table::new();
    t.insert(key.to_string(), value.clone());
    match T::deserialize(toml::Value::Table(t)) {
        Ok(_) => None,
        Err(e) => {
            let m = e.message().trim_end().to_string();
            if m.starts_with("missing field") {
                return None;
            }
            if m.starts_with("unknown field") {
                let expected = backticked(m.split_once("expected").map_or("", |x| x.1));
                let refs: Vec<&str> = expected.iter().map(String::as_str).collect();
                return Some(format!("{m}{}", suggest(key, &refs)));
            }
            Some(m)
        }
    }
}

fn backticked(s: &str) -> Vec<String> {
    s.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, w)| w.to_string())
        .collect()
}

/// "; did you mean `x`?" for the closest known name, if close.
fn suggest(word: &str, known: &[&str]) -> String {
    let best = known
        .iter()
        .map(|k| (distance(word, k), *k))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((d, k)) if d > 0 && d <= 1 + word.len() / 4 => format!("; did you mean `{k}`?"),
        _ => String::new(),
    }
}

/// Levenshtein distance.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn quoted_list(v: &[&str]) -> String {
    v.iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn join(label: &str, key: &str) -> String {
    if label.is_empty() {
        key.to_string()
    } else {
        format!("{label}.{key}")
    }
}

/// `a.b[2].c` into (`a.b[2]`, Some(`c`)); `x[3]` into (`x[3]`, None).
fn split_last(path: &str) -> (&str, Option<&str>) {
    if path.ends_with(']') {
        return (path, None);
    }
    match path.rsplit_once('.') {
        Some((p, k)) => (p, Some(k)),
        None => ("", Some(path)),
    }
}

/// `t` without `keys` (the sub-tables checked on their own).
fn without(t: &toml::Table, keys: &[&str]) -> toml::Table {
    let mut t = t.clone();
    for k in keys {
        t.remove(*k);
    }
    t
}

fn array_of_tables(v: Option<&toml::Value>) -> Vec<toml::Table> {
    match v {
        Some(toml::Value::Array(a)) => a.iter().filter_map(|x| x.as_table().cloned()).collect(),
        _ => Vec::new(),
    }
}

/// Where tables and keys are in the file. Table paths use indices for
/// arrays of tables (`node[1].hypervisor`).
struct LineIndex {
    /// Table path to its header line.
    tables: BTreeMap<String, usize>,
    /// (table path, key) to the key's line.
    keys: BTreeMap<(String, String), usize>,
}

impl LineIndex {
    fn new(text: &str) -> LineIndex {
        let mut idx = LineIndex {
            tables: BTreeMap::new(),
            keys: BTreeMap::new(),
        };
        // Count of each array of tables, by its indexed parent path.
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut current = String::new();
        let mut depth: i32 = 0;
        let mut in_multiline: Option<&str> = None;
        for (n, raw) in text.lines().enumerate() {
            let line_no = n + 1;
            let line = strip_comment(raw);
            if let Some(delim) = in_multiline {
                if line.contains(delim) {
                    in_multiline = None;
                }
                continue;
            }
            if depth > 0 {
                depth += bracket_balance(line);
                continue;
            }
            let t = line.trim();
            if t.is_empty() {
                continue;
            }
            if let Some(inner) = t.strip_prefix("[[").and_then(|s| s.strip_suffix("]]")) {
                let parts = dotted(inner.trim());
                let parent = resolve(&parts[..parts.len() - 1], &counts);
                let name = join(&parent, &parts[parts.len() - 1]);
                let c = counts.entry(name.clone()).or_insert(0);
                current = format!("{name}[{c}]");
                *c += 1;
                idx.tables.insert(current.clone(), line_no);
                continue;
            }
            if let Some(inner) = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                let parts = dotted(inner.trim());
                current = resolve(&parts, &counts);
                idx.tables.entry(current.clone()).or_insert(line_no);
                continue;
            }
            if let Some((k, v)) = split_key(t) {
                let parts = dotted(k);
                let mut table = current.clone();
                for p in &parts[..parts.len() - 1] {
                    idx.keys
                        .entry((table.clone(), p.clone()))
                        .or_insert(line_no);
                    table = join(&table, p);
                    idx.tables.entry(table.clone()).or_insert(line_no);
                }
                idx.keys
                    .entry((table, parts[parts.len() - 1].clone()))
                    .or_insert(line_no);
                let v = v.trim_start();
                for delim in ["\"\"\"", "'''"] {
                    if let Some(rest) = v.strip_prefix(delim) {
                        if !rest.contains(delim) {
                            in_multiline = Some(delim);
                        }
                    }
                }
                if in_multiline.is_none() {
                    depth = bracket_balance(v).max(0);
                }
            }
        }
        idx
    }

    /// The line of `key` in the table at `path`, else of the table, else of
    /// the nearest enclosing table.
    fn line(&self, path: &str, key: Option<&str>) -> Option<usize> {
        if let Some(k) = key {
            if let Some(l) = self.keys.get(&(path.to_string(), k.to_string())) {
                return Some(*l);
            }
        }
        let mut p = path.to_string();
        loop {
            if let Some(l) = self.tables.get(&p) {
                return Some(*l);
            }
            // An inline table: the key that holds it.
            let (parent, k) = split_last(&p);
            if let Some(k) = k {
                if let Some(l) = self.keys.get(&(parent.to_string(), k.to_string())) {
                    return Some(*l);
                }
            }
            match p.rfind(['.', '[']) {
                Some(i) if i > 0 => p.truncate(i),
                _ => return None,
            }
        }
    }
}

/// `a.b` parts to an indexed path, using the latest element of arrays of
/// tables (`node.hypervisor` is `node[1].hypervisor` after two `[[node]]`).
fn resolve(parts: &[String], counts: &BTreeMap<String, usize>) -> String {
    let mut path = String::new();
    for p in parts {
        path = join(&path, p);
        if let Some(c) = counts.get(&path) {
            path = format!("{path}[{}]", c.saturating_sub(1));
        }
    }
    path
}

/// Splits a dotted key, honouring quotes.
fn dotted(k: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    for c in k.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => quote = Some(c),
            (None, '.') => out.push(std::mem::take(&mut cur).trim().to_string()),
            (None, c) => cur.push(c),
        }
    }
    out.push(cur.trim().to_string());
    out
}

/// `key = value` to (key, value), outside quotes.
fn split_key(line: &str) -> Option<(&str, &str)> {
    let mut quote: Option<char> = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '=') => return Some((line[..i].trim(), &line[i + 1..])),
            _ => {}
        }
    }
    None
}

/// Drops a `#` comment that is outside strings.
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '#') => return &line[..i],
            _ => {}
        }
    }
    line
}

/// Opening minus closing brackets and braces, outside strings.
fn bracket_balance(s: &str) -> i32 {
    let mut quote: Option<char> = None;
    let mut n = 0;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => n += 1,
            (None, ']' | '}') => n -= 1,
            _ => {}
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(text: &str) -> Vec<String> {
        check(text, Path::new("t.toml"))
            .errors
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    /// Shared with the end-to-end check-config test.
    const BASE: &str = include_str!("../../../tests/data/two-nodes.toml");

    #[test]
    fn a_sound_config_passes() {
        let r = check(BASE, Path::new("t.toml"));
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.summary.as_deref(), Some("2 node(s), 1 pair(s)"));
    }

    #[test]
    fn the_line_index_knows_arrays_of_tables_and_dotted_keys() {
        let idx = LineIndex::new(BASE);
        assert_eq!(idx.line("node[1]", Some("address")), Some(25));
        assert_eq!(idx.line("node[1].hypervisor", Some("peer-uri")), Some(29));
        assert_eq!(idx.line("node[0].fence", None), Some(17));
        assert_eq!(idx.line("pair[0].replication", Some("nope")), Some(42));
        let idx =
            LineIndex::new("[[pair]]\npolicy.sync-interval = 3\nlevels = [\n  [ 1 ],\n]\nx = 1\n");
        assert_eq!(idx.line("pair[0].policy", Some("sync-interval")), Some(2));
        assert_eq!(idx.line("pair[0]", Some("x")), Some(6));
    }

    #[test]
    fn every_error_is_reported_with_field_and_line() {
        let text = BASE
            .replace("address = \"10.0.0.1:7400\"", "adress = \"10.0.0.1:7400\"")
            .replace("heartbeat-interval = \"500ms\"", "heartbeat-interval = 5")
            .replace("spare = \"node-b\"", "spare = \"node-a\"")
            .replace(
                "dir = \"/srv/wspare/web\"",
                "dir = \"/srv/wspare/web\"\nbwlimit-kib = \"fast\"",
            );
        let e = errs(&text);
        let want = [
            "line 4: cluster.heartbeat-interval: invalid type: integer `5`",
            "line 11: node[node-a].adress: unknown field `adress`",
            "did you mean `address`?",
            "line 9: node[node-a].address: missing field `address`",
            "line 40: pair[web].spare: primary and spare are both node-a",
            "line 45: pair[web].replication.bwlimit-kib: invalid type: string \"fast\"",
        ];
        for w in want {
            assert!(e.iter().any(|x| x.contains(w)), "wanted {w:?} in {e:#?}");
        }
        assert_eq!(e.len(), 5, "{e:#?}");
    }

    #[test]
    fn semantic_errors_come_from_the_core_and_the_backends() {
        let text = BASE
            .replace("address = \"10.0.0.2:7400\"", "address = \"10.0.0.2\"")
            .replace(
                "type = \"rsync\"",
                "type = \"rsync\"\nblock-size = \"huge\"",
            );
        let e = errs(&text);
        assert!(
            e.iter()
                .any(|x| x.contains("node[node-b].address: \"10.0.0.2\" is not host:port")),
            "{e:#?}"
        );
        let text = BASE.replace("sync-interval = \"10s\"", "sync-interval = \"0s\"");
        let e = errs(&text);
        assert!(e.iter().any(|x| x.contains("pair[web].policy")), "{e:#?}");
    }

    #[test]
    fn backends_are_named_explicitly() {
        let text = BASE.replacen("type = \"libvirt\"", "type = \"libvirtt\"", 1);
        let e = errs(&text);
        assert!(
            e.iter().any(|x| x
                .contains("line 14: node[node-a].hypervisor.type: unknown backend `libvirtt`")
                && x.contains("did you mean `libvirt`?")),
            "{e:#?}"
        );
        let text = BASE.replacen("type = \"ipmi\"\n", "", 1);
        let e = errs(&text);
        assert!(
            e.iter()
                .any(|x| x.contains("node[node-a].fence.type: missing field `type`")),
            "{e:#?}"
        );
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let e = errs("[cluster\nname = 1\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("line 1:"), "{e:?}");
    }

    /// Mangled configs never panic the checker.
    #[test]
    fn never_panics() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let junk = [
            "=", "[", "]", "[[", "\"", "'''", "{", "}", ".", "#", "\n", "x", "1", "-", " ",
        ];
        for _ in 0..400 {
            let mut t: Vec<char> = BASE.chars().collect();
            for _ in 0..(1 + next() % 6) {
                let at = (next() as usize) % t.len();
                match next() % 3 {
                    0 => {
                        t.remove(at);
                    }
                    1 => {
                        let j = junk[(next() as usize) % junk.len()];
                        for (k, c) in j.chars().enumerate() {
                            t.insert(at + k, c);
                        }
                    }
                    _ => {
                        let end = (at + (next() as usize) % 40).min(t.len());
                        t.drain(at..end);
                    }
                }
            }
            let text: String = t.into_iter().collect();
            let _ = check(&text, Path::new("t.toml"));
        }
    }
}
