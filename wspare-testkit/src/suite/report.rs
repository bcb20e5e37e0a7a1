//! The suite's report.

use std::fmt;
use std::time::Duration;

/// How one case ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaseOutcome {
    /// The invariant held.
    Passed,
    /// The invariant was violated; the message starts with the case's
    /// name ("H4 idempotent start: ...") and shows what the backend
    /// answered.
    Failed(String),
    /// The case does not apply; the reason says why (a capability the
    /// backend lacks, a fixture that cannot produce the condition).
    Skipped(String),
}

/// One case's result.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// The invariant's id and name, as in the trait docs ("H4 idempotent start").
    pub name: &'static str,
    /// The outcome.
    pub outcome: CaseOutcome,
    /// How long it took.
    pub elapsed: Duration,
}

/// All cases of one suite run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Which suite ("hypervisor: libvirt test:///default").
    pub title: String,
    /// The cases, in the order they ran.
    pub cases: Vec<CaseResult>,
}

impl Report {
    /// Cases that failed.
    pub fn failed(&self) -> impl Iterator<Item = &CaseResult> {
        self.cases
            .iter()
            .filter(|c| matches!(c.outcome, CaseOutcome::Failed(_)))
    }

    /// Cases that were skipped.
    pub fn skipped(&self) -> impl Iterator<Item = &CaseResult> {
        self.cases
            .iter()
            .filter(|c| matches!(c.outcome, CaseOutcome::Skipped(_)))
    }

    /// The result of the case whose name starts with `id` ("H4").
    pub fn case(&self, id: &str) -> Option<&CaseResult> {
        self.cases
            .iter()
            .find(|c| c.name.split_whitespace().next() == Some(id))
    }

    /// Prints the report and panics if any case failed.
    pub fn assert_passed(&self) {
        println!("{self}");
        let failed: Vec<_> = self.failed().collect();
        if !failed.is_empty() {
            let msgs: Vec<String> = failed
                .iter()
                .filter_map(|c| match &c.outcome {
                    CaseOutcome::Failed(m) => Some(m.clone()),
                    _ => None,
                })
                .collect();
            panic!(
                "{} of {} conformance cases failed:\n{}",
                failed.len(),
                self.cases.len(),
                msgs.join("\n")
            );
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "conformance: {}", self.title)?;
        for c in &self.cases {
            let (tag, detail) = match &c.outcome {
                CaseOutcome::Passed => ("pass", String::new()),
                // The message names the case already.
                CaseOutcome::Failed(m) => {
                    let m = m
                        .strip_prefix(c.name)
                        .and_then(|m| m.strip_prefix(": "))
                        .unwrap_or(m);
                    ("FAIL", format!(": {m}"))
                }
                CaseOutcome::Skipped(r) => ("skip", format!(": {r}")),
            };
            writeln!(f, "  {tag} {} ({:.1?}){detail}", c.name, c.elapsed)?;
        }
        let n = |o: fn(&CaseOutcome) -> bool| self.cases.iter().filter(|c| o(&c.outcome)).count();
        write!(
            f,
            "  {} passed, {} failed, {} skipped",
            n(|o| matches!(o, CaseOutcome::Passed)),
            n(|o| matches!(o, CaseOutcome::Failed(_))),
            n(|o| matches!(o, CaseOutcome::Skipped(_)))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let case = |name, outcome| CaseResult {
            name,
            outcome,
            elapsed: Duration::from_millis(2),
        };
        Report {
            title: "hypervisor: toy".into(),
            cases: vec![
                case("H1 missing", CaseOutcome::Passed),
                case(
                    "H4 idempotent start",
                    CaseOutcome::Failed(
                        "H4 idempotent start: start(a) failed: busy (conflict)".into(),
                    ),
                ),
                case(
                    "H8 freeze",
                    CaseOutcome::Skipped("backend lacks capability freeze".into()),
                ),
            ],
        }
    }

    #[test]
    fn display_names_each_case_once() {
        assert_eq!(
            report().to_string(),
            "conformance: hypervisor: toy\n  \
             pass H1 missing (2.0ms)\n  \
             FAIL H4 idempotent start (2.0ms): start(a) failed: busy (conflict)\n  \
             skip H8 freeze (2.0ms): backend lacks capability freeze\n  \
             1 passed, 1 failed, 1 skipped"
        );
    }

    #[test]
    fn assert_passed_panics_with_each_failure() {
        let r = report();
        assert_eq!(r.case("H4").unwrap().name, "H4 idempotent start");
        assert!(r.case("H44").is_none());
        let p = std::panic::catch_unwind(|| r.assert_passed()).unwrap_err();
        let msg = p.downcast_ref::<String>().unwrap();
        assert_eq!(
            msg,
            "1 of 3 conformance cases failed:\nH4 idempotent start: start(a) failed: busy (conflict)"
        );
        let ok = Report {
            cases: r.cases[..1].to_vec(),
            ..r.clone()
        };
        ok.assert_passed();
    }
}
