//! # wspare-testkit
//!
//! - [`suite`]: the backend conformance suite. A backend author implements a
//!   fixture for their backend and calls one function per trait.
//!
//! (The simulator, sim backends and mocks join this crate in the testkit issue.)

pub mod suite;
