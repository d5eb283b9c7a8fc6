//! Recording checks off the hot path.
//!
//! A check hands its record (and the numbers it released) to [`CheckLog`] and answers without
//! waiting; a background task computes the digests and appends records to the store in batches
//! (every 100 ms, or 1,000 records, or 4 MiB). If records cannot be written for longer than the
//! configured bound, or the queue is full (by records, or by bytes: `--audit-queue-mib`),
//! [`CheckLog::accepting`] turns false and checks WITHHOLD everything with
//! `REASON_STORE_UNAVAILABLE` rather than release data unrecorded.
//!
//! A batch that keeps failing is split in halves (down to single records), so one record the
//! store cannot take never holds up the others; each part is retried until written, and checks
//! release again as soon as the store takes records again.
//!
//! Crash window: records queued or in a batch being written when the process dies are lost: at
//! most the last ~100 ms of checks plus whatever queued up while the store was failing (up to the
//! bound). Admin changes are not in this window: they are written with the change itself.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::check_files::CheckFiles;
use crate::{
    core::{AuditKey, AuditRecord, NhsNumber},
    store::{AuditTrail, StoreError},
};

/// Where check records go: the consent store's checks trail, or segment files on this replica's
/// disk ([`CheckFiles`], `--check-log-dir`).
#[derive(Clone)]
pub enum Sink {
    /// The consent store (`append_audit`).
    Store(Arc<dyn AuditTrail>),
    /// Sealed JSON-lines segments on disk.
    Files(Box<CheckFiles>),
}

impl Sink {
    /// Shared, not copied: the file sink writes on a blocking thread, and the caller keeps the
    /// records to retry them if the write fails.
    async fn append(&self, records: &Arc<Vec<AuditRecord>>) -> Result<(), StoreError> {
        match self {
            Sink::Store(store) => store.append_audit(records).await,
            Sink::Files(files) => files.append(Arc::clone(records)).await,
        }
    }
}

/// One check waiting to be recorded.
pub struct PendingCheck {
    /// The record without digests.
    pub record: AuditRecord,
    /// The numbers released, digested by the writer task.
    pub released: Vec<NhsNumber>,
}

impl PendingCheck {
    /// About how many bytes it holds while queued (and writes once digested): its numbers, its
    /// labels and a fixed part for the rest of the record.
    fn bytes(&self) -> u64 {
        let r = &self.record;
        let labels = r.organisation.len()
            + r.key_id.len()
            + r.extract_id.as_ref().map_or(0, String::len)
            + r.version.len();
        (self.released.len() * std::mem::size_of::<NhsNumber>() + labels + 256) as u64
    }
}

/// The queue between checks and the store. When every handle is dropped, the task writes what is
/// queued and ends.
pub struct CheckLog {
    tx: mpsc::Sender<PendingCheck>,
    state: Arc<WriterState>,
}

/// What the writer task and the handles share (not the sender, so the queue can close).
struct WriterState {
    /// Ms since `epoch` when writing started failing, or 0 while it works.
    failing_since: AtomicU64,
    /// Records handed over and not yet written.
    backlog: AtomicU64,
    /// Their bytes (see [`PendingCheck::bytes`]), and the most there may be.
    queued_bytes: AtomicU64,
    max_bytes: u64,
    epoch: Instant,
    bound: Duration,
}

const BATCH: usize = 1000;
/// How long a batch gathers records after its first.
const GATHER: Duration = Duration::from_millis(100);
/// How often the queue is looked at while a batch gathers.
const GATHER_POLL: Duration = Duration::from_millis(2);
/// A batch is sent once it holds this many bytes, whatever its record count.
const BATCH_BYTES: u64 = 4 * 1024 * 1024;
const QUEUE: usize = 65_536;
/// Failures of one batch before it is split in halves.
const SPLIT_AFTER: u32 = 3;

impl CheckLog {
    /// Starts the writer task. It ends when every sender is gone and the queue is drained.
    pub fn start(
        sink: Sink,
        key: AuditKey,
        bound: Duration,
        max_bytes: u64,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> (Arc<CheckLog>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let state = Arc::new(WriterState {
            failing_since: AtomicU64::new(0),
            backlog: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            max_bytes: max_bytes.max(BATCH_BYTES),
            epoch: Instant::now(),
            bound,
        });
        let task = tokio::spawn(run(state.clone(), sink, key, rx, stop));
        (Arc::new(CheckLog { tx, state }), task)
    }

    /// Whether checks may release data: records are being written, or have failed for less than
    /// the bound.
    pub fn accepting(&self) -> bool {
        let s = &self.state;
        let since = s.failing_since.load(Ordering::Acquire);
        since == 0
            || s.now_ms().saturating_sub(since)
                <= u64::try_from(s.bound.as_millis()).unwrap_or(u64::MAX)
    }

    /// Records not yet written.
    pub fn backlog(&self) -> u64 {
        self.state.backlog.load(Ordering::Relaxed)
    }

    /// Bytes queued and not yet written.
    pub fn backlog_bytes(&self) -> u64 {
        self.state.queued_bytes.load(Ordering::Relaxed)
    }

    /// Queues a record. False if the queue is full, by records or by bytes (the check must then
    /// withhold).
    pub fn submit(&self, pending: PendingCheck) -> bool {
        let s = &self.state;
        let bytes = pending.bytes();
        if s.queued_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes > s.max_bytes {
            s.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            metrics::counter!("optout_audit_queue_full_total").increment(1);
            s.mark_failing();
            return false;
        }
        match self.tx.try_send(pending) {
            Ok(()) => {
                s.backlog.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                s.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                metrics::counter!("optout_audit_queue_full_total").increment(1);
                s.mark_failing();
                false
            }
        }
    }
}

impl WriterState {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn mark_failing(&self) {
        let _ = self.failing_since.compare_exchange(
            0,
            self.now_ms(),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

async fn run(
    writer: Arc<WriterState>,
    sink: Sink,
    key: AuditKey,
    mut rx: mpsc::Receiver<PendingCheck>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        // Wait for one record, then gather what else arrives within 100 ms. Once the server has
        // stopped, write what is queued and end (handles may outlive the server in a test).
        let first = if *stop.borrow() {
            match rx.try_recv() {
                Ok(p) => p,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                p = rx.recv() => match p {
                    Some(p) => p,
                    None => break,
                },
                _ = stop.changed() => continue,
            }
        };
        let deadline = tokio::time::Instant::now() + GATHER;
        let mut bytes = first.bytes();
        let mut pending = vec![first];
        // Take what is queued in bulk, then look again a little later: waking for each record
        // (with a timer set each time) cost more than writing it under single-number checks.
        while pending.len() < BATCH && bytes < BATCH_BYTES {
            if rx.is_empty() {
                let now = tokio::time::Instant::now();
                if now >= deadline || rx.is_closed() {
                    break;
                }
                tokio::time::sleep_until(deadline.min(now + GATHER_POLL)).await;
                continue;
            }
            let from = pending.len();
            rx.recv_many(&mut pending, BATCH - from).await;
            bytes += pending[from..].iter().map(PendingCheck::bytes).sum::<u64>();
        }
        let key2 = key.clone();
        let batch: Vec<AuditRecord> = tokio::task::spawn_blocking(move || {
            pending
                .into_iter()
                .map(|p| AuditRecord {
                    digests: key2.digests(p.released),
                    ..p.record
                })
                .collect()
        })
        .await
        .unwrap_or_default();
        write(&writer, &sink, batch).await;
        writer.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Writes a batch, retrying until every record is written: records are never dropped while the
/// process lives. After [`SPLIT_AFTER`] failures in a row, each further failure halves the most
/// records sent at once (and each success doubles it again), so a store that refuses large
/// writes gets them one part at a time, and the rest are never held up by one bad part.
async fn write(writer: &WriterState, sink: &Sink, batch: Vec<AuditRecord>) {
    let mut parts = std::collections::VecDeque::from([batch]);
    let mut failures = 0u32;
    let mut most = usize::MAX;
    let mut backoff = Duration::from_millis(50);
    while let Some(mut part) = parts.pop_front() {
        if part.len() > most {
            parts.push_front(part.split_off(most));
        }
        let started = Instant::now();
        let shared = Arc::new(part);
        let written = sink.append(&shared).await;
        // The sink's share is gone once it has answered (a write task that panicked dropped it
        // unwinding); a copy only if not.
        let part = Arc::try_unwrap(shared).unwrap_or_else(|shared| shared.as_ref().clone());
        metrics::histogram!("optout_store_audit_write_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        let label = if written.is_ok() { "ok" } else { "error" };
        metrics::counter!("optout_store_audit_writes_total", "result" => label).increment(1);
        match written {
            Ok(()) => {
                writer.failing_since.store(0, Ordering::Release);
                writer
                    .backlog
                    .fetch_sub(part.len() as u64, Ordering::Relaxed);
                failures = 0;
                most = most.saturating_mul(2);
                backoff = Duration::from_millis(50);
            }
            Err(e) => {
                if writer.failing_since.load(Ordering::Acquire) == 0 {
                    tracing::error!(
                        error = %e,
                        records = part.len(),
                        "cannot write audit records; checks withhold everything once this lasts \
                         longer than the audit bound"
                    );
                } else {
                    tracing::warn!(error = %e, records = part.len(), "cannot write audit records; retrying");
                }
                writer.mark_failing();
                failures += 1;
                if failures >= SPLIT_AFTER && part.len() > 1 {
                    // Smaller parts next, at once.
                    most = part.len() / 2;
                } else {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                parts.push_front(part);
            }
        }
    }
}
