//! `agora journal verify`: checks the journal's chain, the snapshots, recovery against a replay
//! from zero, and the state's invariants, and prints a short report.

use std::fmt::Write as _;

use agora_core::codec::decode_all;
use agora_core::projector::{PROJECTION, Projector, command_digest};
use agora_core::sequencer::{RecoverFrom, recover};
use store::{Store, StoreOptions};

/// The outcome: the report's lines and whether everything held.
pub struct Report {
    /// Human-readable lines.
    pub lines: Vec<String>,
    /// True when no problem was found.
    pub ok: bool,
}

fn short(hash: &[u8; 32]) -> String {
    hash.iter().take(8).fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Verifies the store at `url` without changing it.
pub async fn verify(url: &str) -> anyhow::Result<Report> {
    if let Some(path) = url.strip_prefix("sqlite://")
        && !std::path::Path::new(path).exists()
    {
        anyhow::bail!("no database at {path}");
    }
    let store = std::sync::Arc::new(Store::open(url, &StoreOptions::default()).await?);
    let mut lines = vec![format!("database: {} ({})", url, store.backend_name())];
    let mut ok = true;

    let journal = store.verify_journal().await?;
    match &journal.problem {
        None => lines.push(format!(
            "journal: {} batches, {} commands, checksum chain intact",
            journal.batches, journal.commands
        )),
        Some((batch, problem)) => {
            ok = false;
            lines.push(format!(
                "journal: PROBLEM at batch {batch} after {} good batches ({} commands): {problem}",
                journal.batches, journal.commands
            ));
        }
    }

    let (snapshot, skipped) = store.latest_valid_snapshot().await?;
    match &snapshot {
        Some(snapshot) => lines.push(format!(
            "snapshots: newest valid after command {}",
            snapshot.seq
        )),
        None => lines.push("snapshots: none".into()),
    }
    for (seq, problem) in &skipped {
        ok = false;
        lines.push(format!(
            "snapshots: PROBLEM with the one after command {seq}: {problem}"
        ));
    }

    if journal.problem.is_none() {
        match (
            recover(&store, RecoverFrom::LatestSnapshot).await,
            recover(&store, RecoverFrom::Zero).await,
        ) {
            (Ok((state, from_snapshot)), Ok((_, from_zero))) => {
                lines.push(format!(
                    "recovery: snapshot {} + {} commands replayed, state hash {}",
                    from_snapshot
                        .snapshot_seq
                        .map_or("none".into(), |s| s.to_string()),
                    from_snapshot.replayed_commands,
                    short(&from_snapshot.state_hash)
                ));
                if from_snapshot.state_hash == from_zero.state_hash {
                    lines.push(format!(
                        "replay from zero: {} commands, same state hash",
                        from_zero.replayed_commands
                    ));
                } else {
                    ok = false;
                    lines.push(format!(
                        "replay from zero: PROBLEM: state hash {} differs",
                        short(&from_zero.state_hash)
                    ));
                }
                match state.verify() {
                    Ok(()) => lines.push("invariants: hold".into()),
                    Err(problem) => {
                        ok = false;
                        lines.push(format!("invariants: PROBLEM: {problem}"));
                    }
                }
            }
            (Err(error), _) | (_, Err(error)) => {
                ok = false;
                lines.push(format!("recovery: PROBLEM: {error}"));
            }
        }
    }
    if journal.problem.is_none() {
        // The audit trail: its own chain, and each entry tied to the journaled command.
        let mut digests = Vec::new();
        let mut from = 1;
        loop {
            let batches = store.read(from, 256).await?;
            let Some(last) = batches.last() else { break };
            from = last.batch + 1;
            for batch in &batches {
                let commands = decode_all(&batch.payload)?;
                digests.extend(commands.iter().map(command_digest));
            }
        }
        let audit = store.verify_audit(Some(&digests)).await?;
        let projected = store.projection_offset(PROJECTION).await?;
        match audit.problem {
            None if audit.entries != projected => {
                ok = false;
                lines.push(format!(
                    "audit: PROBLEM: {} entries but the read models are at command {projected}",
                    audit.entries
                ));
            }
            None => lines.push(format!(
                "audit: {} entries, hash chain intact and matching the journal (read models at command {projected} of {})",
                audit.entries,
                digests.len()
            )),
            Some((seq, problem)) => {
                ok = false;
                lines.push(format!("audit: PROBLEM at entry {seq}: {problem}"));
            }
        }
    }
    lines.push(format!(
        "result: {}",
        if ok { "OK" } else { "PROBLEMS FOUND" }
    ));
    store.close().await;
    Ok(Report { lines, ok })
}

/// Projects the journal into the read models, after emptying them when `rebuild` is set.
/// Returns the commands projected.
pub async fn project(url: &str, rebuild: bool) -> anyhow::Result<u64> {
    if let Some(path) = url.strip_prefix("sqlite://")
        && !std::path::Path::new(path).exists()
    {
        anyhow::bail!("no database at {path}");
    }
    let store = std::sync::Arc::new(Store::open(url, &StoreOptions::default()).await?);
    if rebuild {
        store.reset_projection(PROJECTION).await?;
    }
    let mut projector = Projector::start(store.clone()).await?;
    let projected = projector.catch_up().await?;
    store.close().await;
    Ok(projected)
}
