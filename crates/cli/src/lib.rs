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

/// Turns transparent huge pages off for this process and the processes it starts.
///
/// mimalloc asks for huge pages on the memory it maps, and the kernel then zeroes 2 MiB (and,
/// under `defrag=madvise`, may compact memory first) at the first touch of each. On the
/// virtual machines Agora was measured on, those first touches took over a third of a slow
/// recovery's CPU samples, more in some runs than in others: with 4 KiB pages recovery
/// replayed a third to a half faster on average, with far less spread (docs/performance.md). A kernel without the
/// setting keeps its default.
pub fn without_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        let _ = rustix::thread::disable_transparent_huge_pages(true);
    }
}
