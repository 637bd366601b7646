//! Table-driven scenarios.
