//! Property test: random interleavings of inputs, outcomes, operator
//! commands and driver crashes never make one machine break an invariant it
//! can break on its own (2 to 7; invariant 1 needs a world: the simulator).

use proptest::prelude::*;

use crate::machine::model::{self, Model, Step};

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => any::<u16>().prop_map(Step::Advance),
        3 => (any::<bool>(), any::<bool>(), any::<u8>(), any::<bool>())
            .prop_map(|(e, a, g, h)| Step::Heartbeat { epoch_up: e, active_b: a, gen: g, handover: h }),
        1 => (any::<bool>(), any::<u8>()).prop_map(|(local, state)| Step::VmObserved { local, state }),
        1 => (any::<u8>(), any::<u16>()).prop_map(|(gen, age)| Step::Replica { gen, age }),
        1 => any::<bool>().prop_map(Step::Witness),
        8 => (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(pick, how, detail)| Step::Answer { pick, how, detail }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(c, x)| Step::Command(c, x)),
        1 => Just(Step::Crash),
    ]
}

fn run(local: &str, steps: Vec<Step>) {
    Model::run(local, model::policy(), steps)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn spare_machine_never_breaks_an_invariant(steps in prop::collection::vec(step(), 1..250)) {
        run("b", steps);
    }

    #[test]
    fn active_machine_never_breaks_an_invariant(steps in prop::collection::vec(step(), 1..250)) {
        run("a", steps);
    }
}

/// The property is not vacuous: with a deliberate defect switched on, it
/// finds a violating sequence. (Defects that need a second node or ground
/// truth, `ignore-generation` and `trust-lying-fencer`, are caught by the
/// simulator in wspare-testkit.)
#[cfg(feature = "inject-bugs")]
#[test]
fn the_property_catches_injected_defects() {
    use proptest::test_runner::{Config, TestError, TestRunner};
    // The runner catches each violation's panic; keep their messages quiet.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for (bug, local) in [
        ("skip-fence", "b"),
        ("start-before-promote", "b"),
        ("repeat-unknown-action", "b"),
        ("start-stale-primary", "a"),
    ] {
        let mut policy = model::policy();
        policy.bugs.enable(bug).unwrap();
        let mut runner = TestRunner::new(Config {
            cases: 2000,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&prop::collection::vec(step(), 1..250), |steps| {
            let p = policy.clone();
            std::panic::catch_unwind(move || Model::run(local, p, steps))
                .map_err(|_| proptest::test_runner::TestCaseError::fail("violation"))
        });
        match result {
            Err(TestError::Fail(_, steps)) => eprintln!("{bug}: caught with {} steps", steps.len()),
            other => {
                std::panic::set_hook(hook);
                panic!("{bug}: the property did not catch it: {other:?}")
            }
        }
    }
    std::panic::set_hook(hook);
}
