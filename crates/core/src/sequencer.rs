//! The sequencer: one writer that orders commands, applies them to the [`State`], journals the
//! accepted ones in batches (group commit: one store transaction per batch) and acknowledges
//! each only after its batch is durable.
//!
//! Two tasks form a pipeline. The *apply* task takes commands from a bounded queue, applies
//! each to the state (a refused command is answered at once and never journaled), encodes the
//! accepted ones into a batch, and hands the batch to the *write* task, then starts the next
//! batch while that one is being written. A batch holds whatever queued up meanwhile, up to
//! [`SequencerOptions::batch_commands_max`], optionally waiting [`SequencerOptions::batch_linger`]
//! for more. The write task appends the batch, merged with any batches that queued up behind
//! it while the previous append ran (one commit and one fsync for all of them, so the batch
//! size follows the writer's pace), and only then answers their commands.
//!
//! If an append (or a snapshot write) fails, the in-memory state is ahead of the journal and
//! can no longer be trusted: the sequencer stops. Every command not yet acknowledged, and
//! every later one, gets [`SubmitError::Stopped`] with the reason; a restart recovers from the
//! journal, which holds exactly the acknowledged commands.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use store::{JournalBatch, Snapshot, Store, StoreError};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::codec::{self, DecodeError};
use crate::names;
use crate::{CoreCommand, CoreRejection, Output, SnapshotError, State};

/// How the sequencer batches and snapshots.
#[derive(Clone, Debug)]
pub struct SequencerOptions {
    /// Commands waiting to be applied; beyond it `submit` waits (backpressure).
    pub queue_commands_max: usize,
    /// Commands in one journal batch.
    pub batch_commands_max: usize,
    /// How long a batch waits for more commands after its first (zero: take what is queued).
    pub batch_linger: Duration,
    /// Batches handed to the write task and not yet written.
    pub batches_in_flight_max: usize,
    /// A snapshot is written after this many commands since the last one (0: never).
    pub snapshot_every_commands: u64,
    /// Snapshots kept in the store; older ones are pruned.
    pub snapshots_kept: u64,
}

impl Default for SequencerOptions {
    fn default() -> Self {
        SequencerOptions {
            queue_commands_max: 65_536,
            batch_commands_max: 8_192,
            batch_linger: Duration::ZERO,
            batches_in_flight_max: 2,
            snapshot_every_commands: 100_000,
            snapshots_kept: 3,
        }
    }
}

/// An acknowledged command: durable in the journal at `seq`.
#[derive(Clone, Debug)]
pub struct Ack {
    /// The command's sequence number in the journal.
    pub seq: u64,
    /// What it did.
    pub output: Output,
}

/// Why a command was not acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The core refused it; nothing changed and nothing was journaled.
    #[error("rejected: {}", .0.code())]
    Rejected(CoreRejection),
    /// The sequencer has stopped (a failed write, or shut down); the command may not have
    /// been applied. Recover by restarting.
    #[error("the sequencer has stopped: {0}")]
    Stopped(String),
}

/// Why the state could not be recovered.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The store failed, or reported corrupt data with its position.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A journal payload does not decode.
    #[error("journal batch {batch}: {error}")]
    Decode {
        /// Batch number.
        batch: u64,
        /// The decoding problem.
        error: DecodeError,
    },
    /// A journaled command was refused on replay: the state machine is not deterministic or
    /// the journal does not belong to this snapshot.
    #[error("journaled command {seq} was refused on replay: {}", .reason.code())]
    Diverged {
        /// The command's sequence number.
        seq: u64,
        /// The refusal.
        reason: CoreRejection,
    },
    /// A task of recovery (the journal's reader or its decoder) failed before the journal's
    /// end, so what was replayed may be only part of it.
    #[error("recovery's journal {task} failed: {problem}")]
    Interrupted {
        /// Which task.
        task: &'static str,
        /// How it failed.
        problem: String,
    },
    /// A snapshot passed its checksum but does not restore or match its recorded hash.
    #[error("snapshot at {seq}: {problem}")]
    BadSnapshot {
        /// Its sequence number.
        seq: u64,
        /// What is wrong.
        problem: String,
    },
}

impl From<SnapshotError> for RecoveryError {
    fn from(error: SnapshotError) -> Self {
        RecoveryError::BadSnapshot {
            seq: 0,
            problem: error.to_string(),
        }
    }
}

/// What recovery did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The snapshot it started from, if any.
    pub snapshot_seq: Option<u64>,
    /// Newer snapshots that failed their checksum and were skipped, with the reason.
    pub skipped_snapshots: Vec<(u64, String)>,
    /// Commands replayed from the journal after the snapshot.
    pub replayed_commands: u64,
    /// The last command sequence number in the state.
    pub seq: u64,
    /// The recovered state's hash.
    pub state_hash: [u8; 32],
}

/// Whether recovery may start from a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoverFrom {
    /// The newest valid snapshot, then the rest of the journal.
    LatestSnapshot,
    /// The whole journal from its first command (to check the snapshots).
    Zero,
}

/// Journal batches read from the store at a time during recovery.
const READ_AHEAD_BATCHES: usize = 64;

/// Reads of [`READ_AHEAD_BATCHES`] waiting for the decoder at most. Reading runs apart from
/// decoding, so the next read is under way while the last one is decoded and replayed, rather
/// than starting only once replay has nearly caught up with the decoder. With the read under
/// way and the one being decoded, at most four reads (256 batches) are held undecoded.
const READS_AHEAD: usize = 2;

/// Recovery's reader hands decoded commands to replay in groups of whole batches, each closed
/// once it holds this many commands (or at the end of a read).
const DECODED_GROUP_COMMANDS: usize = 4_096;

/// Decoded groups waiting for replay at most: with [`DECODED_GROUP_COMMANDS`] this bounds the
/// memory the decoder runs ahead by (one oversized batch aside).
const DECODED_GROUPS_AHEAD: usize = 4;

/// One journal batch as recovery's decoder left it: where its commands end in the group's
/// list, and the problem of the first command that did not decode, if one did not (its
/// commands before that one are in the list).
struct DecodedBatch {
    batch: u64,
    first_seq: u64,
    last_seq: u64,
    commands_end: usize,
    error: Option<DecodeError>,
}

/// Whole batches decoded for replay: their commands in one list. Replay sends each group back
/// once applied, emptied, and the decoder fills it again, so that recovery decodes into the
/// same few lists instead of touching fresh memory for every command of the journal (on this
/// kind of virtual machine, first touches of memory cost as much as decoding).
#[derive(Default)]
struct DecodedGroup {
    batches: Vec<DecodedBatch>,
    commands: Vec<CoreCommand>,
}

/// Reads the journal from `first_batch` in journal order, [`READ_AHEAD_BATCHES`] at a time;
/// stops after a store error (sent as the last item), at the journal's end, or when the
/// decoder stops listening.
async fn read_ahead(
    store: Arc<Store>,
    first_batch: u64,
    reads: mpsc::Sender<Result<Vec<JournalBatch>, StoreError>>,
) {
    let mut next = first_batch;
    loop {
        let batches = match store.read(next, READ_AHEAD_BATCHES).await {
            Ok(batches) => batches,
            Err(error) => {
                let _ = reads.send(Err(error)).await;
                return;
            }
        };
        let Some(last) = batches.last() else {
            return;
        };
        next = last.batch + 1;
        if reads.send(Ok(batches)).await.is_err() {
            return;
        }
    }
}

/// Decodes what [`read_ahead`] reads, sending groups of decoded batches in journal order;
/// stops after a store error or an undecodable batch (sent as the last item), at the
/// journal's end, or when replay stops listening. Groups come from `emptied` when replay has
/// sent one back, and are made new otherwise.
async fn decode_reads(
    mut reads: mpsc::Receiver<Result<Vec<JournalBatch>, StoreError>>,
    groups: mpsc::Sender<Result<DecodedGroup, StoreError>>,
    mut emptied: mpsc::Receiver<DecodedGroup>,
) {
    while let Some(read) = reads.recv().await {
        let batches = match read {
            Ok(batches) => batches,
            Err(error) => {
                let _ = groups.send(Err(error)).await;
                return;
            }
        };
        let mut group = emptied.try_recv().unwrap_or_default();
        for batch in batches {
            let mut error = None;
            for command in codec::decode_each(&batch.payload) {
                match command {
                    Ok(command) => group.commands.push(command),
                    Err(problem) => error = Some(problem),
                }
            }
            let failed = error.is_some();
            group.batches.push(DecodedBatch {
                batch: batch.batch,
                first_seq: batch.first_seq,
                last_seq: batch.last_seq(),
                commands_end: group.commands.len(),
                error,
            });
            if failed || group.commands.len() >= DECODED_GROUP_COMMANDS {
                let full = std::mem::replace(&mut group, emptied.try_recv().unwrap_or_default());
                if groups.send(Ok(full)).await.is_err() || failed {
                    return;
                }
            }
        }
        if !group.batches.is_empty() && groups.send(Ok(group)).await.is_err() {
            return;
        }
    }
}

/// Rebuilds the state from the store: the newest valid snapshot (its hash checked), then every
/// later journal batch, each checked against its chain before it is applied. A separate task
/// reads and decodes the batches ahead of replay, so that reading, decoding and applying
/// overlap (on two cores, decoding leaves the applying core).
pub async fn recover(
    store: &Arc<Store>,
    from: RecoverFrom,
) -> Result<(State, Recovery), RecoveryError> {
    let (snapshot, skipped) = match from {
        RecoverFrom::LatestSnapshot => store.latest_valid_snapshot().await?,
        RecoverFrom::Zero => (None, Vec::new()),
    };
    let (mut state, mut seq) = match &snapshot {
        Some(snapshot) => {
            let state =
                State::restore(&snapshot.payload).map_err(|e| RecoveryError::BadSnapshot {
                    seq: snapshot.seq,
                    problem: e.to_string(),
                })?;
            if state.state_hash_as_recorded_by(&snapshot.payload) != snapshot.state_hash {
                return Err(RecoveryError::BadSnapshot {
                    seq: snapshot.seq,
                    problem: "the restored state's hash differs from the recorded one".into(),
                });
            }
            (state, snapshot.seq)
        }
        None => (State::new(), 0),
    };
    let first_batch = if seq == 0 {
        1
    } else {
        match store.batch_containing(seq).await? {
            Some(batch) => batch + 1,
            None => {
                return Err(RecoveryError::BadSnapshot {
                    seq,
                    problem: "the journal does not reach the snapshot".into(),
                });
            }
        }
    };
    let (reads, read) = mpsc::channel(READS_AHEAD);
    let (groups, mut incoming) = mpsc::channel(DECODED_GROUPS_AHEAD);
    // Replay hands groups back without waiting; one that finds the channel full is dropped.
    let (give_back, emptied) = mpsc::channel(DECODED_GROUPS_AHEAD + 2);
    let reader = tokio::spawn(read_ahead(store.clone(), first_batch, reads));
    let decoder = tokio::spawn(decode_reads(read, groups, emptied));
    let mut replayed = 0;
    let mut out = Output::default();
    while let Some(group) = incoming.recv().await {
        let mut group = group?;
        let mut start = 0;
        for batch in group.batches.drain(..) {
            let mismatch = || {
                RecoveryError::Store(StoreError::Corrupt {
                    what: "journal batch",
                    position: batch.batch,
                    problem: "its commands do not match its header".into(),
                })
            };
            if batch.first_seq != seq + 1 {
                return Err(mismatch());
            }
            for command in &group.commands[start..batch.commands_end] {
                seq += 1;
                out.clear();
                state
                    .apply(command, &mut out)
                    .map_err(|reason| RecoveryError::Diverged { seq, reason })?;
                replayed += 1;
            }
            start = batch.commands_end;
            if let Some(error) = batch.error {
                return Err(RecoveryError::Decode {
                    batch: batch.batch,
                    error,
                });
            }
            if seq != batch.last_seq {
                return Err(mismatch());
            }
        }
        group.commands.clear();
        // Dropped when the decoder has finished or holds enough groups already.
        let _ = give_back.try_send(group);
    }
    // The journal ended for replay when the decoder's channel closed; that is its end only
    // if both tasks finished rather than failed (a panic in a test build, where panics
    // unwind; release builds abort).
    for (task, handle) in [("decoder", decoder), ("reader", reader)] {
        if let Err(error) = handle.await {
            return Err(RecoveryError::Interrupted {
                task,
                problem: error.to_string(),
            });
        }
    }
    let recovery = Recovery {
        snapshot_seq: snapshot.map(|s| s.seq),
        skipped_snapshots: skipped,
        replayed_commands: replayed,
        seq,
        state_hash: state.state_hash(),
    };
    Ok((state, recovery))
}

type Reply = oneshot::Sender<Result<Ack, SubmitError>>;
type Query = Box<dyn FnOnce(u64, &State) + Send>;

enum Request {
    Submit(CoreCommand, Reply),
    Read(Query),
}

enum Write {
    Batch {
        commands: u64,
        payload: Vec<u8>,
        acks: Vec<(Reply, Ack)>,
    },
    Snapshot(Snapshot),
}

/// Why the sequencer stopped, shared by both tasks.
#[derive(Default)]
struct Status(Mutex<Option<String>>);

impl Status {
    fn stopped(&self) -> Option<String> {
        self.0.lock().expect("status lock").clone()
    }
    fn stop(&self, reason: String) {
        self.0.lock().expect("status lock").get_or_insert(reason);
    }
}

/// A running sequencer. Cheap to clone: clones share it.
#[derive(Clone)]
pub struct Sequencer {
    requests: mpsc::Sender<Request>,
    status: Arc<Status>,
}

/// The tasks behind a sequencer, to wait for at shutdown.
pub struct Tasks {
    apply: JoinHandle<()>,
    write: JoinHandle<()>,
}

impl Tasks {
    /// Waits until both tasks have finished: every accepted command is written and answered.
    pub async fn join(self) {
        let _ = self.apply.await;
        let _ = self.write.await;
    }
}

impl Sequencer {
    /// Recovers the state from `store` and starts the sequencer on it.
    pub async fn start(
        store: Arc<Store>,
        options: SequencerOptions,
    ) -> Result<(Sequencer, Tasks, Recovery), RecoveryError> {
        let (state, recovery) = recover(&store, RecoverFrom::LatestSnapshot).await?;
        let (requests, request_rx) = mpsc::channel(options.queue_commands_max.max(1));
        let (writes, write_rx) = mpsc::channel(options.batches_in_flight_max.max(1));
        let status = Arc::new(Status::default());
        let apply = tokio::spawn(apply_loop(
            state,
            recovery.seq,
            request_rx,
            writes,
            options.clone(),
            status.clone(),
        ));
        let write = tokio::spawn(write_loop(store, write_rx, options, status.clone()));
        let sequencer = Sequencer { requests, status };
        Ok((sequencer, Tasks { apply, write }, recovery))
    }

    /// Submits a command and waits until it is durable (or refused).
    pub async fn submit(&self, command: CoreCommand) -> Result<Ack, SubmitError> {
        if let Some(reason) = self.status.stopped() {
            return Err(SubmitError::Stopped(reason));
        }
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Submit(command, reply))
            .await
            .map_err(|_| self.stopped_error())?;
        answer.await.map_err(|_| self.stopped_error())?
    }

    /// Runs `query` on the state, in order with the commands submitted before it. The state
    /// it sees may include commands whose batch is still being written.
    pub async fn read<R: Send + 'static>(
        &self,
        query: impl FnOnce(&State) -> R + Send + 'static,
    ) -> Result<R, SubmitError> {
        self.read_at(move |_, state| query(state)).await
    }

    /// Like [`Sequencer::read`], with the sequence number of the last command the state has
    /// applied (its batch may still be being written).
    pub async fn read_at<R: Send + 'static>(
        &self,
        query: impl FnOnce(u64, &State) -> R + Send + 'static,
    ) -> Result<R, SubmitError> {
        let (reply, answer) = oneshot::channel();
        let query: Query = Box::new(move |seq, state| {
            let _ = reply.send(query(seq, state));
        });
        self.requests
            .send(Request::Read(query))
            .await
            .map_err(|_| self.stopped_error())?;
        answer.await.map_err(|_| self.stopped_error())
    }

    /// Why the sequencer stopped, if it has.
    pub fn stopped(&self) -> Option<String> {
        self.status.stopped()
    }

    fn stopped_error(&self) -> SubmitError {
        SubmitError::Stopped(self.status.stopped().unwrap_or_else(|| "shut down".into()))
    }
}

async fn apply_loop(
    mut state: State,
    mut seq: u64,
    mut requests: mpsc::Receiver<Request>,
    writes: mpsc::Sender<Write>,
    options: SequencerOptions,
    status: Arc<Status>,
) {
    let mut since_snapshot = 0u64;
    let batch_commands = metrics::histogram!(names::BATCH_COMMANDS);
    let queued = metrics::gauge!(names::QUEUED);
    while let Some(first) = requests.recv().await {
        let mut payload = Vec::new();
        let mut acks: Vec<(Reply, Ack)> = Vec::new();
        handle(
            first,
            &mut state,
            &mut seq,
            &mut payload,
            &mut acks,
            &status,
        );
        let deadline = tokio::time::Instant::now() + options.batch_linger;
        while acks.len() < options.batch_commands_max {
            let next = match requests.try_recv() {
                Ok(request) => Some(request),
                Err(_) if options.batch_linger.is_zero() => None,
                Err(_) => tokio::time::timeout_at(deadline, requests.recv())
                    .await
                    .ok()
                    .flatten(),
            };
            match next {
                Some(request) => handle(
                    request,
                    &mut state,
                    &mut seq,
                    &mut payload,
                    &mut acks,
                    &status,
                ),
                None => break,
            }
        }
        queued.set(requests.len() as f64);
        if acks.is_empty() {
            continue;
        }
        batch_commands.record(acks.len() as f64);
        since_snapshot += acks.len() as u64;
        let batch = Write::Batch {
            commands: acks.len() as u64,
            payload,
            acks,
        };
        if let Err(mpsc::error::SendError(Write::Batch { acks, .. })) = writes.send(batch).await {
            let reason = status
                .stopped()
                .unwrap_or_else(|| "the writer is gone".into());
            for (reply, _) in acks {
                let _ = reply.send(Err(SubmitError::Stopped(reason.clone())));
            }
            continue;
        }
        if options.snapshot_every_commands > 0 && since_snapshot >= options.snapshot_every_commands
        {
            since_snapshot = 0;
            let snapshot = Snapshot {
                seq,
                state_hash: state.state_hash(),
                payload: state.snapshot(),
            };
            let _ = writes.send(Write::Snapshot(snapshot)).await;
        }
    }
}

/// Applies one request: a query runs on the state; a command is applied and, if accepted,
/// encoded into the batch with its pending acknowledgement, or answered with its refusal.
fn handle(
    request: Request,
    state: &mut State,
    seq: &mut u64,
    payload: &mut Vec<u8>,
    acks: &mut Vec<(Reply, Ack)>,
    status: &Status,
) {
    match request {
        // A stopped sequencer's state is ahead of its journal: drop the query unanswered.
        Request::Read(query) => {
            if status.stopped().is_none() {
                query(*seq, state);
            }
        }
        Request::Submit(command, reply) => {
            if let Some(reason) = status.stopped() {
                let _ = reply.send(Err(SubmitError::Stopped(reason)));
                return;
            }
            let mut output = Output::default();
            match state.apply(&command, &mut output) {
                Err(reason) => {
                    metrics::counter!(names::REJECTED, "code" => reason.code()).increment(1);
                    let _ = reply.send(Err(SubmitError::Rejected(reason)));
                }
                Ok(()) => {
                    *seq += 1;
                    codec::encode(&command, payload);
                    acks.push((reply, Ack { seq: *seq, output }));
                }
            }
        }
    }
}

/// Batches that queued up while the last append ran go into one append (one commit, one
/// fsync), so the batch size follows the writer's pace: `first` and the batches waiting
/// behind it, up to `commands_max` commands, in order. A snapshot behind them is left in
/// `held`, to be written next.
fn merge_waiting(
    first: Write,
    writes: &mut mpsc::Receiver<Write>,
    held: &mut Option<Write>,
    commands_max: usize,
) -> Write {
    let Write::Batch {
        mut commands,
        mut payload,
        mut acks,
    } = first
    else {
        return first;
    };
    while commands < commands_max as u64 {
        match writes.try_recv() {
            Ok(Write::Batch {
                commands: more,
                payload: more_payload,
                acks: mut more_acks,
            }) => {
                commands += more;
                payload.extend_from_slice(&more_payload);
                acks.append(&mut more_acks);
            }
            Ok(other) => {
                *held = Some(other);
                break;
            }
            Err(_) => break,
        }
    }
    Write::Batch {
        commands,
        payload,
        acks,
    }
}

async fn write_loop(
    store: Arc<Store>,
    mut writes: mpsc::Receiver<Write>,
    options: SequencerOptions,
    status: Arc<Status>,
) {
    let accepted = metrics::counter!(names::ACCEPTED);
    let append_seconds = metrics::histogram!(names::APPEND_SECONDS);
    let journal_seq = metrics::gauge!(names::JOURNAL_SEQ);
    let stopped = metrics::gauge!(names::STOPPED);
    stopped.set(0.0);
    journal_seq.set(store.tail().seq as f64);
    // A snapshot found behind waiting batches, written after them.
    let mut held: Option<Write> = None;
    loop {
        let write = match held.take() {
            Some(write) => write,
            None => match writes.recv().await {
                Some(write) => write,
                None => break,
            },
        };
        let write = merge_waiting(write, &mut writes, &mut held, options.batch_commands_max);
        let started = Instant::now();
        let failure = match write {
            Write::Batch {
                commands,
                payload,
                acks,
            } => match store.append(commands, payload).await {
                Ok(batch) => {
                    append_seconds.record(started.elapsed());
                    accepted.increment(commands);
                    journal_seq.set(batch.last_seq() as f64);
                    for (reply, ack) in acks {
                        let _ = reply.send(Ok(ack));
                    }
                    None
                }
                Err(error) => {
                    let reason = format!("journal append failed: {error}");
                    for (reply, _) in acks {
                        let _ = reply.send(Err(SubmitError::Stopped(reason.clone())));
                    }
                    Some(reason)
                }
            },
            Write::Snapshot(snapshot) => {
                // Snapshot time is not part of the state, so reading the clock here keeps the
                // core deterministic.
                let created_at_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                let written = match store.put_snapshot(&snapshot, created_at_ms).await {
                    Ok(()) => store
                        .prune_snapshots(options.snapshots_kept.max(1))
                        .await
                        .err()
                        .map(|error| format!("snapshot pruning failed: {error}")),
                    Err(error) => Some(format!("snapshot write failed: {error}")),
                };
                metrics::histogram!(names::SNAPSHOT_SECONDS).record(started.elapsed());
                written
            }
        };
        if let Some(reason) = failure {
            stopped.set(1.0);
            status.stop(reason.clone());
            // Answer everything already handed over; the apply task sees the status.
            writes.close();
            while let Some(write) = writes.recv().await {
                if let Write::Batch { acks, .. } = write {
                    for (reply, _) in acks {
                        let _ = reply.send(Err(SubmitError::Stopped(reason.clone())));
                    }
                }
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(commands: u64, byte: u8) -> Write {
        Write::Batch {
            commands,
            payload: vec![byte; commands as usize],
            acks: Vec::new(),
        }
    }

    #[test]
    fn waiting_batches_merge_into_one_append_up_to_the_bound_and_stop_at_a_snapshot() {
        let (sender, mut writes) = mpsc::channel(8);
        for write in [batch(2, 2), batch(3, 3), batch(4, 4)] {
            sender.try_send(write).unwrap_or_else(|_| panic!("room"));
        }
        let snapshot = Snapshot {
            seq: 10,
            state_hash: [0; 32],
            payload: Vec::new(),
        };
        sender
            .try_send(Write::Snapshot(snapshot))
            .unwrap_or_else(|_| panic!("room"));
        sender
            .try_send(batch(1, 9))
            .unwrap_or_else(|_| panic!("room"));
        let mut held = None;

        // Bounded: 1 + 2 reaches 3 commands, so the third batch waits.
        let merged = merge_waiting(batch(1, 1), &mut writes, &mut held, 3);
        let Write::Batch {
            commands, payload, ..
        } = merged
        else {
            panic!("a batch")
        };
        assert_eq!((commands, payload), (3, vec![1, 2, 2]));
        assert!(held.is_none());

        // Unbounded: the rest up to the snapshot, which is held for next.
        let first = writes.try_recv().unwrap_or_else(|_| panic!("a batch"));
        let Write::Batch {
            commands, payload, ..
        } = merge_waiting(first, &mut writes, &mut held, 100)
        else {
            panic!("a batch")
        };
        assert_eq!((commands, payload), (7, vec![3, 3, 3, 4, 4, 4, 4]));
        assert!(matches!(
            held,
            Some(Write::Snapshot(Snapshot { seq: 10, .. }))
        ));
        assert!(matches!(
            writes.try_recv(),
            Ok(Write::Batch { commands: 1, .. })
        ));
    }
}
