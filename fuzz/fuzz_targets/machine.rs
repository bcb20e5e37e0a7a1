//! Arbitrary input sequences to one failover machine: the model of
//! `wspare_core::machine::model` (shared with the property test in
//! `wspare-core/src/machine/tests/properties.rs`), driven by fuzz bytes. A
//! broken invariant or a panic is a crash.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wspare_core::machine::model::{policy, Model, Step};

/// Reads the fuzz input byte by byte; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) << 8 | u16::from(self.u8())
    }
    fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }

    /// The next step, with the property test's weights (out of 20).
    fn step(&mut self) -> Step {
        match self.u8() % 20 {
            0..=3 => Step::Advance(self.u16()),
            4..=6 => Step::Heartbeat {
                epoch_up: self.bool(),
                active_b: self.bool(),
                gen: self.u8(),
                handover: self.bool(),
            },
            7 => Step::VmObserved {
                local: self.bool(),
                state: self.u8(),
            },
            8 => Step::Replica {
                gen: self.u8(),
                age: self.u16(),
            },
            9 => Step::Witness(self.bool()),
            10..=17 => Step::Answer {
                pick: self.u8(),
                how: self.u8(),
                detail: self.u8(),
            },
            18 => Step::Command(self.u8(), self.u8()),
            _ => Step::Crash,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let local = if b.bool() { "a" } else { "b" };
    let mut w = Model::new(local, policy());
    let mut steps = 0;
    while !b.done() && steps < 400 {
        w.step(b.step());
        steps += 1;
    }
});
