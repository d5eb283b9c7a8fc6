//! The check log on the replica's disk: JSON-lines segment files, sealed as a chain
//! ([`crate::core::trail`]), rotated by size and kept by count and age, the way the Kubernetes
//! API server's audit log backend is (max size, max backups, max age).
//!
//! Files are `checks-<first sequence, 20 digits>.jsonl` in one directory, one record a line, so a
//! log shipper can follow them. A batch is appended and fsynced before the check log counts it
//! written. Each start opens a new segment that continues the chain from the newest line on disk
//! (a line torn by a crash is left as it is and reported by `optout audit verify`).
//!
//! The chain cannot show lines cut from its end or whole segments deleted (what is left is still
//! a chain), so [`anchor`] records where the log stands in the consent store's changes trail
//! (`optout_core::anchors`): at each rotation, every anchor interval while lines are written, and
//! at shutdown. `optout audit verify DIR` given the store compares.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use parking_lot::Mutex;
use tokio::sync::{Notify, watch};

use crate::{
    core::{
        AuditKey, AuditQuery, AuditRecord,
        anchors::{ANCHOR_ACTION, LOG_ID_FILE, LogAnchor},
        trail::{self, ChainHead},
    },
    store::{Cause, ConsentStore, StoreError},
};

/// Where and how long check records are kept on disk.
#[derive(Clone, Debug)]
pub struct CheckFilesConfig {
    /// The directory of the segments (created if missing).
    pub dir: PathBuf,
    /// A segment that reaches this size is closed and a new one started.
    pub max_segment_bytes: u64,
    /// Closed segments kept (oldest deleted first); 0 keeps every one.
    pub max_backups: usize,
    /// Closed segments older than this are deleted; `None` keeps them.
    pub max_age: Option<Duration>,
    /// How often, while lines are written, where the log stands is anchored in the store.
    pub anchor_interval: Duration,
}

/// The segment writer. Cheap to clone.
#[derive(Clone)]
pub struct CheckFiles {
    inner: Arc<Mutex<Segments>>,
    config: CheckFilesConfig,
    key: AuditKey,
    /// The log's id ([`LOG_ID_FILE`]): anchors name it.
    log_id: Arc<str>,
    /// Notified at each rotation: the oldest line on disk may have moved.
    rotated: Arc<Notify>,
}

struct Segments {
    file: Option<(File, PathBuf)>,
    size: u64,
    head: ChainHead,
    /// The first sequence number on disk (by the oldest segment's name; 0: none yet).
    oldest: u64,
    /// The last batch's buffer, for the next.
    buffer: Vec<u8>,
}

/// The largest batch buffer kept between batches (a batch is at most about 4 MiB of records,
/// `check_log::BATCH_BYTES`, ~6 MiB written: its digests are base64).
const KEEP_BUFFER: usize = 8 * 1024 * 1024;

fn io_error(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Unavailable(Cause::with_source(
        format!("check log {what} {}: {e}", path.display()),
        e,
    ))
}

/// The segments in a directory, oldest first.
pub fn segments(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("checks-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The first sequence number a segment holds, from its name.
fn first_seq(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("checks-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

/// The first sequence number on disk: the oldest segment's (0: no segment).
fn oldest_on_disk(dir: &Path) -> std::io::Result<u64> {
    Ok(segments(dir)?
        .first()
        .and_then(|p| first_seq(p))
        .unwrap_or(0))
}

/// The log's id: read from [`LOG_ID_FILE`], or made and written (fsynced) for a new directory.
fn log_id(dir: &Path) -> std::io::Result<String> {
    let path = dir.join(LOG_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut raw = [0u8; 16];
    rand::fill(&mut raw);
    let id = trail::hex(&raw);
    let mut f = File::create(&path)?;
    f.write_all(format!("{id}\n").as_bytes())?;
    f.sync_all()?;
    Ok(id)
}

/// The last well-formed line of the newest segment: where the chain goes on.
fn last_head(dir: &Path) -> std::io::Result<ChainHead> {
    for path in segments(dir)?.iter().rev() {
        let mut head = None;
        for line in BufReader::new(File::open(path)?).lines() {
            let line = line?;
            if let Some((seq, _)) = trail::open_line::<serde::de::IgnoredAny>(&line) {
                head = Some((seq, line));
            }
        }
        if let Some((seq, line)) = head {
            // The hash is the chain link of that line: recomputed from it.
            let hash = trail::line_hash(&line).unwrap_or(trail::GENESIS);
            return Ok(ChainHead { seq, hash });
        }
    }
    Ok(ChainHead::START)
}

impl CheckFiles {
    /// Opens the directory and finds where the chain stands.
    pub fn open(config: CheckFilesConfig, key: AuditKey) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&config.dir).map_err(|e| io_error("directory", &config.dir, e))?;
        let head = last_head(&config.dir).map_err(|e| io_error("directory", &config.dir, e))?;
        let oldest =
            oldest_on_disk(&config.dir).map_err(|e| io_error("directory", &config.dir, e))?;
        let log_id = log_id(&config.dir)
            .map_err(|e| io_error("id file", &config.dir.join(LOG_ID_FILE), e))?;
        Ok(CheckFiles {
            inner: Arc::new(Mutex::new(Segments {
                file: None,
                size: 0,
                head,
                oldest,
                buffer: Vec::new(),
            })),
            config,
            key,
            log_id: log_id.into(),
            rotated: Arc::new(Notify::new()),
        })
    }

    /// Where the log stands now (`None` before its first line).
    pub fn anchor_point(&self) -> Option<LogAnchor> {
        let s = self.inner.lock();
        (s.head.seq > 0).then(|| LogAnchor {
            log: self.log_id.to_string(),
            seq: s.head.seq,
            // The head's hash is the newest line's chain link (`trail::line_hash`).
            link: trail::hex(&s.head.hash[..16]),
            oldest: s.oldest.max(1),
        })
    }

    /// Seals and appends records, then fsyncs: written only once on disk.
    pub async fn append(&self, records: Arc<Vec<AuditRecord>>) -> Result<(), StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.append_blocking(&records))
            .await
            .map_err(|e| {
                StoreError::Unavailable(Cause::with_source(
                    format!("check log write task failed: {e}"),
                    e,
                ))
            })?
    }

    fn append_blocking(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let mut s = self.inner.lock();
        if s.file.is_none() || s.size >= self.config.max_segment_bytes {
            self.rotate(&mut s)?;
        }
        let mut head = s.head;
        // Sized for the batch at once (a line is its digests and under 1 KiB besides), and kept
        // for the next batch up to `KEEP_BUFFER`: a fresh buffer of megabytes each batch cost a
        // page fault per 4 KiB and copies as it grew.
        let need: usize = records.iter().map(|r| r.digests.len() + 1024).sum();
        let mut text = std::mem::take(&mut s.buffer);
        text.clear();
        text.reserve(need);
        for r in records {
            head = trail::seal_into(head, &self.key, &mut text, |out| r.write_json(out))
                .map_err(|e| StoreError::Corrupt(format!("check record: {e}").into()))?;
            text.push(b'\n');
        }
        let whole = s.size;
        let Some((file, path)) = s.file.as_mut() else {
            return Err(StoreError::Unavailable("check log: no open segment".into()));
        };
        if let Err(e) = file.write_all(&text).and_then(|()| file.sync_data()) {
            let shown = path.clone();
            // A write that failed part-way (a full disk, a file-size limit) left a torn line:
            // cut the segment back to its last whole line, so a retry appends after it and the
            // segment still verifies (issue 27: a torn tail made `audit verify` fail for ever,
            // and the records after it unreadable). If even that fails, the next batch goes to a
            // new segment, which continues the chain from the last record written whole.
            let cut = file.set_len(whole).and_then(|()| file.sync_data());
            if let Err(c) = cut {
                tracing::error!(
                    error = %c,
                    segment = %path.display(),
                    "cannot cut a failed check-log write back to its last whole line; the next \
                     batch starts a new segment (`optout audit verify` reports the torn line)"
                );
                s.file = None;
            }
            return Err(io_error("write", &shown, e));
        }
        s.size += text.len() as u64;
        s.head = head;
        if text.capacity() <= KEEP_BUFFER {
            s.buffer = text;
        }
        Ok(())
    }

    /// Closes the current segment, opens the next, and applies retention to the closed ones.
    fn rotate(&self, s: &mut Segments) -> Result<(), StoreError> {
        let path = self
            .config
            .dir
            .join(format!("checks-{:020}.jsonl", s.head.seq + 1));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_error("segment", &path, e))?;
        s.size = file.metadata().map(|m| m.len()).unwrap_or(0);
        s.file = Some((file, path.clone()));
        if let Err(e) = self.retain(&path) {
            tracing::warn!(error = %e, "check log retention failed; keeping old segments");
        }
        match oldest_on_disk(&self.config.dir) {
            Ok(o) => s.oldest = o,
            Err(e) => tracing::warn!(error = %e, "cannot list the check log's segments"),
        }
        self.rotated.notify_one();
        Ok(())
    }

    /// Deletes closed segments past `max_backups` (oldest first) or older than `max_age`.
    fn retain(&self, current: &Path) -> std::io::Result<()> {
        let closed: Vec<PathBuf> = segments(&self.config.dir)?
            .into_iter()
            .filter(|p| p != current)
            .collect();
        let over = if self.config.max_backups == 0 {
            0
        } else {
            closed.len().saturating_sub(self.config.max_backups)
        };
        for (i, path) in closed.iter().enumerate() {
            let too_old = self.config.max_age.is_some_and(|age| {
                std::fs::metadata(path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|d| d > age)
            });
            if i < over || too_old {
                std::fs::remove_file(path)?;
                tracing::info!(segment = %path.display(), "check log segment removed by retention");
            }
        }
        Ok(())
    }

    /// The records on this replica's disk that match, oldest first (at most `query.limit`).
    pub async fn read(&self, query: AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let dir = self.config.dir.clone();
        tokio::task::spawn_blocking(move || read_dir(&dir, &query))
            .await
            .map_err(|e| {
                StoreError::Unavailable(Cause::with_source(
                    format!("check log read task failed: {e}"),
                    e,
                ))
            })?
    }
}

/// Records where `files` stands in the changes trail of `store` (`optout_core::anchors`): after
/// each rotation, every `interval` while lines are written, and once more when `last_call` turns
/// true (at shutdown, after the check log wrote what was queued). A failed write is retried at
/// the next turn.
pub async fn anchor(
    files: CheckFiles,
    store: Arc<dyn ConsentStore>,
    interval: Duration,
    mut last_call: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut written: Option<LogAnchor> = None;
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            () = files.rotated.notified() => false,
            changed = last_call.changed() => changed.is_err() || *last_call.borrow(),
        };
        let Some(point) = files.anchor_point() else {
            if last {
                return;
            }
            continue;
        };
        if written.as_ref() != Some(&point) {
            let record = AuditRecord {
                at_ms: i64::try_from(crate::store::now_ms()).unwrap_or(i64::MAX),
                organisation: "-".into(),
                key_id: "-".into(),
                action: ANCHOR_ACTION.into(),
                check_log: Some(point.clone()),
                ..AuditRecord::default()
            };
            match store.record_access(&record).await {
                Ok(()) => written = Some(point),
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot anchor the check log in the store; retrying (`optout audit verify` \
                     cannot show lines cut after the last anchor)"
                ),
            }
        }
        if last {
            return;
        }
    }
}

fn read_dir(dir: &Path, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
    let mut out = Vec::new();
    for path in segments(dir).map_err(|e| io_error("directory", dir, e))? {
        let file = match File::open(&path) {
            Ok(f) => f,
            // Removed by retention meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("segment", &path, e)),
        };
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|e| io_error("segment", &path, e))?;
            let Some((_, r)) = trail::open_line::<AuditRecord>(&line) else {
                continue;
            };
            let in_time = r.at_ms >= query.from_ms && (query.to_ms <= 0 || r.at_ms <= query.to_ms);
            if in_time && query.matches(&r) {
                out.push(r);
                if out.len() >= query.limit.max(1) {
                    return Ok(out);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u64) -> AuditRecord {
        AuditRecord {
            at_ms: 1_700_000_000_000 + i as i64,
            action: "check".into(),
            organisation: "RX1".into(),
            count: i,
            ..AuditRecord::default()
        }
    }

    fn verify_dir(dir: &Path, key: &AuditKey) -> Result<ChainHead, trail::TrailError> {
        let mut text = Vec::new();
        for p in segments(dir).expect("segments") {
            text.extend(
                std::fs::read_to_string(p)
                    .expect("read")
                    .lines()
                    .map(str::to_string),
            );
        }
        trail::verify(text.iter().map(String::as_str), key, None, 1)
    }

    #[tokio::test]
    async fn segments_rotate_by_size_keep_the_chain_and_are_kept_by_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = AuditKey::new(&[5u8; 32]).expect("key");
        let config = CheckFilesConfig {
            dir: dir.path().to_path_buf(),
            max_segment_bytes: 600,
            max_backups: 3,
            max_age: None,
            anchor_interval: Duration::from_secs(60),
        };
        let files = CheckFiles::open(config.clone(), key.clone()).expect("open");
        for i in 0..40 {
            files
                .append(Arc::new(vec![record(i)]))
                .await
                .expect("append");
        }
        let segs = segments(dir.path()).expect("segments");
        assert_eq!(segs.len(), 4, "the current one and 3 backups: {segs:?}");
        // What is left verifies (from its first line: older segments were removed) up to 40.
        assert_eq!(verify_dir(dir.path(), &key).expect("verifies").seq, 40);
        // A restart continues the same chain in a new segment.
        drop(files);
        let again = CheckFiles::open(config, key.clone()).expect("reopen");
        again
            .append(Arc::new(vec![record(40), record(41)]))
            .await
            .expect("append");
        assert_eq!(verify_dir(dir.path(), &key).expect("verifies").seq, 42);
        let found = again
            .read(AuditQuery {
                limit: 1000,
                ..AuditQuery::default()
            })
            .await
            .expect("read");
        assert_eq!(found.last().map(|r| r.count), Some(41));
    }
}
