//! The `agora` command line: subcommands and the JSON-lines replay edge of the matching engine.

pub mod admin;
pub mod bench;
pub mod bench_api;
pub mod bench_queue;
pub mod bench_ws;
pub mod journal;
pub mod replay;
pub mod serve;
pub mod watch;
