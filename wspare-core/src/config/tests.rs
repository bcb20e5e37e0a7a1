use super::*;

const GOOD: &str = r#"
[cluster]
name = "prod"
heartbeat-interval = "500ms"

[defaults]
data-loss-bound = "10m"
sync-interval = "1m"

[[node]]
name = "node-a"
address = "10.0.0.1:7400"
fence-delay = "15s"

[[node]]
name = "node-b"
address = "10.0.0.2:7400"

[[pair]]
name = "web"
vm = "web"
primary = "node-a"
spare = "node-b"
policy = { sync-interval = "10s", detector = { threshold = 10.0 } }

[[pair]]
name = "db"
vm = "db"
primary = "node-b"
spare = "node-a"
"#;

fn errs(text: &str) -> Vec<String> {
    Config::parse(text)
        .unwrap_err()
        .errors
        .iter()
        .map(|e| e.to_string())
        .collect()
}

#[test]
fn a_good_config_yields_machines_for_each_node() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.cluster.heartbeat_interval, Duration::from_millis(500));
    let a = c.machines_for(&NodeId::new("node-a").unwrap());
    assert_eq!(a.len(), 2);
    let web = &a[0];
    assert_eq!(
        (web.pair.as_str(), web.local.as_str(), web.peer().as_str()),
        ("web", "node-a", "node-b")
    );
    // node-b has no fence delay: node-a fences it at once.
    assert_eq!(web.peer_fence_delay, Duration::ZERO);
    assert_eq!(web.policy.sync_interval, Duration::from_secs(10));
    assert_eq!(web.policy.data_loss_bound, Duration::from_secs(600));
    assert_eq!(web.policy.detector.threshold, 10.0);
    let b = c.machines_for(&NodeId::new("node-b").unwrap());
    let db = b.iter().find(|p| p.pair.as_str() == "db").unwrap();
    assert_eq!(db.policy.sync_interval, Duration::from_secs(60));
    assert_eq!(
        b[0].peer_fence_delay,
        Duration::from_secs(15),
        "node-b waits before fencing node-a"
    );
}

#[test]
fn same_node_as_primary_and_spare_is_rejected_with_field_and_line() {
    let bad = GOOD.replace("spare = \"node-b\"", "spare = \"node-a\"");
    assert_eq!(
        errs(&bad),
        ["line 23: pair[web].spare: primary and spare are both node-a: a spare on the same host protects nothing"]
    );
}

#[test]
fn unknown_fields_are_rejected_with_their_line() {
    let bad = GOOD.replace("fence-delay = \"15s\"", "fence-dealy = \"15s\"");
    let e = errs(&bad);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("line 13: unknown field `fence-dealy`, expected one of"),
        "{e:?}"
    );
}

#[test]
fn wrong_types_and_bad_durations_name_the_line() {
    let e = errs(&GOOD.replace("heartbeat-interval = \"500ms\"", "heartbeat-interval = 5"));
    assert!(
        e[0].starts_with("line 4: invalid type: integer `5`"),
        "{e:?}"
    );
    let e = errs(&GOOD.replace("fence-delay = \"15s\"", "fence-delay = \"15 parsecs\""));
    assert_eq!(
        e[0],
        "line 13: invalid value: string \"15 parsecs\", expected a duration"
    );
}

#[test]
fn missing_keys_are_named() {
    let e = errs(&GOOD.replace("vm = \"db\"\n", ""));
    assert!(e[0].contains("missing field `vm`"), "{e:?}");
}

#[test]
fn hostile_names_are_rejected() {
    let e = errs(&GOOD.replace("vm = \"web\"", "vm = \"web; reboot\""));
    assert!(
        e[0].contains("invalid VM name \"web; reboot\": character ';' is not allowed"),
        "{e:?}"
    );
}

#[test]
fn every_validation_error_is_reported_at_once() {
    let bad = GOOD
        .replace("address = \"10.0.0.2:7400\"", "address = \"10.0.0.2\"")
        .replace("primary = \"node-b\"", "primary = \"node-c\"")
        .replace(
            "policy = { sync-interval = \"10s\"",
            "policy = { sync-interval = \"0s\"",
        );
    let e = errs(&bad);
    assert_eq!(e.len(), 3, "{e:#?}");
    assert_eq!(
        e[0],
        "line 17: node[node-b].address: \"10.0.0.2\" is not host:port"
    );
    assert_eq!(
        e[1],
        "line 24: pair[web].policy: sync-interval must be greater than zero"
    );
    assert_eq!(
        e[2],
        "line 29: pair[db].primary: node node-c is not defined"
    );
}

#[test]
fn policy_overrides_are_strict_and_validated() {
    let e = errs(&GOOD.replace("sync-interval = \"10s\"", "sync-intervall = \"10s\""));
    assert!(
        e[0].starts_with("line 24: pair[web].policy: unknown field `sync-intervall`"),
        "{e:?}"
    );
    let e = errs(&GOOD.replace("data-loss-bound = \"10m\"", "data-loss-bound = \"5s\""));
    assert!(
        e.iter()
            .any(|l| l.contains("data-loss-bound (5s) is below sync-interval (1m)")),
        "{e:?}"
    );
}

#[test]
fn duplicates_are_rejected() {
    let dup = format!("{GOOD}\n[[node]]\nname = \"node-a\"\naddress = \"x:1\"\n");
    assert!(errs(&dup)
        .iter()
        .any(|e| e.contains("node node-a is defined twice")));
    let dup = GOOD.replace("name = \"db\"\nvm = \"db\"", "name = \"web\"\nvm = \"db\"");
    assert!(errs(&dup)
        .iter()
        .any(|e| e.contains("pair web is defined twice")));
    let dup = GOOD.replace("vm = \"db\"", "vm = \"web\"");
    assert!(errs(&dup)
        .iter()
        .any(|e| e.contains("VM web on node-b already belongs to another pair")));
}

#[test]
fn syntax_errors_have_lines_and_the_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("wspare.toml");
    std::fs::write(&p, "[cluster\nname = 1\n").unwrap();
    let e = Config::load(&p).unwrap_err();
    let s = e.to_string();
    assert!(
        s.starts_with(&format!("{}: 1 error(s)\n  line 1:", p.display())),
        "{s}"
    );
    let e = Config::load(&dir.path().join("nope.toml")).unwrap_err();
    assert!(e.to_string().contains("cannot read"), "{e}");
}

#[test]
fn extensions_are_decoded_strictly() {
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Hv {
        uri: String,
    }
    let text = GOOD.replace(
        "fence-delay = \"15s\"",
        "fence-delay = \"15s\"\nhypervisor = { urii = \"qemu:///system\" }",
    );
    let c = Config::parse(&text).unwrap();
    let t = c.nodes[0].hypervisor.as_ref().unwrap();
    let e = c.extension::<Hv>("node[node-a].hypervisor", t).unwrap_err();
    assert!(
        e.errors[0]
            .to_string()
            .starts_with("line 14: node[node-a].hypervisor: unknown field `urii`"),
        "{e}"
    );
}

#[test]
fn arbitrary_text_never_panics() {
    for s in [
        "",
        "=",
        "[[pair]]\n",
        "[[node]]\nname=\"\"",
        "\u{0}",
        "[defaults]\ndetector = 3",
        "x = [[[[[[[",
    ] {
        let _ = Config::parse(s);
    }
}

#[test]
fn offsets_map_to_lines() {
    assert_eq!(line_of("", 0), 1);
    assert_eq!(line_of("a\nb\n", 0), 1);
    assert_eq!(line_of("a\nb\n", 2), 2);
    assert_eq!(line_of("a\nb\n", 99), 3);
    let c = Config::parse(GOOD).unwrap();
    // GOOD starts with a newline: `name = "node-a"` is on line 11,
    // `name = "node-b"` on line 16, the second pair's name on line 27.
    assert_eq!(c.line_at(c.nodes[0].name.span().start), 11);
    assert_eq!(c.line_at(c.nodes[1].name.span().start), 16);
    assert_eq!(c.line_at(c.pairs[1].name.span().start), 27);
}
