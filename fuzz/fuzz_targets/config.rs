//! Arbitrary text to the config parser: it answers a config or errors that
//! name the field and line, and never panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wspare_core::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(c) => {
            // A config that parses yields machines for each of its nodes.
            for n in &c.nodes {
                let _ = c.machines_for(n.name.get_ref());
            }
        }
        Err(e) => {
            // Every error renders (with its line, which must lie in the text).
            let lines = text.matches('\n').count() + 1;
            let _ = e.to_string();
            for err in &e.errors {
                if let Some(l) = err.line {
                    assert!((1..=lines).contains(&l), "line {l} of a {lines}-line text");
                }
            }
        }
    }
});
