//! The suite's report.

use std::fmt;
use std::time::Duration;

/// How one case ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaseOutcome {
    /// The invariant held.
    Passed,
    /// The invariant was violated; the message names it and what the
    /// backend answered.
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
        self.cases.iter().filter(|c| matches!(c.outcome, CaseOutcome::Failed(_)))
    }

    /// Cases that were skipped.
    pub fn skipped(&self) -> impl Iterator<Item = &CaseResult> {
        self.cases.iter().filter(|c| matches!(c.outcome, CaseOutcome::Skipped(_)))
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
                .map(|c| match &c.outcome {
                    CaseOutcome::Failed(m) => format!("{}: {m}", c.name),
                    _ => unreachable!(),
                })
                .collect();
            panic!("{} of {} conformance cases failed:\n{}", failed.len(), self.cases.len(), msgs.join("\n"));
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "conformance: {}", self.title)?;
        for c in &self.cases {
            let (tag, detail) = match &c.outcome {
                CaseOutcome::Passed => ("pass", String::new()),
                CaseOutcome::Failed(m) => ("FAIL", format!(": {m}")),
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
