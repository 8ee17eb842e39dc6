//! The seeded generator of the reference crate ([`dsv3_reference::rng`]), re-exported so input
//! generators, simulations and the reference's data transforms share one definition.

pub use dsv3_reference::rng::Rng;
