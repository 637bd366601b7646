//! Integration tests of the matching engine: scenarios, the reference model and properties.

mod model;
mod properties;
mod scenarios;
mod snapshots;
