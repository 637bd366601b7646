//! The `agora` command line: subcommands and the JSON-lines replay edge of the matching engine.

pub mod bench;
pub mod bench_api;
pub mod bench_queue;
pub mod journal;
pub mod replay;
pub mod serve;
pub mod watch;
