//! `optout audit verify` checks sealed audit trail files (the check log's segments) and
//! `optout audit verify-changes` the changes trail in the consent store; each names the first
//! record that was altered, removed or reordered.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Subcommand};

use super::{CliError, redis_args::RedisArgs};
use crate::{
    core::{
        AuditKey, AuditQuery, AuditRecord,
        anchors::{ANCHOR_ACTION, AnchorCheck, LOG_ID_FILE},
        trail::{self, ChainHead},
    },
    engine::{check_files::segments, sealer},
    store::ConsentStore,
};

#[derive(Args, Debug)]
pub(super) struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Verify check-log segments: every record's MAC under the audit key, and the chain from
    /// each record to the next. Give the directory (every segment, oldest first) or files in
    /// order. Given the store too (--data-dir, with the embedded service stopped, or
    /// --redis-url, --redis-sentinel, --redis-cluster), a directory is also compared with the
    /// anchors its replica recorded there: lines cut from the end or segments deleted are named.
    /// Exit 0 when they verify; 1, naming the file and line, when they do not.
    Verify {
        /// The audit key file the records were sealed under.
        #[arg(long, env = "OPTOUT_AUDIT_KEY_FILE")]
        audit_key_file: PathBuf,
        /// A check-log directory, or segment files in order.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The embedded store's directory, to compare with the log's anchors.
        #[arg(long, conflicts_with_all = ["redis_url", "redis_sentinel", "redis_cluster"])]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// Verify the changes trail (admin changes and reads) in the consent store against its seals:
    /// names the first record altered, removed or added around the service, and any seal altered
    /// or removed. Records written in the last second or so are not sealed yet and are counted.
    /// The embedded store must be stopped (its database is locked while `serve` runs).
    VerifyChanges {
        /// The audit key file the seals were made under.
        #[arg(long, env = "OPTOUT_AUDIT_KEY_FILE")]
        audit_key_file: PathBuf,
        /// The embedded store's directory (instead of a Redis store).
        #[arg(long, conflicts_with_all = ["redis_url", "redis_sentinel", "redis_cluster"])]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        redis: RedisArgs,
    },
}

pub(super) async fn run(args: AuditArgs) -> Result<ExitCode, CliError> {
    match args.command {
        AuditCommand::Verify {
            audit_key_file,
            paths,
            data_dir,
            redis,
        } => {
            let key = read_key(&audit_key_file)?;
            let store = open_store(data_dir, &redis).await?;
            verify_files(&key, &paths, store).await
        }
        AuditCommand::VerifyChanges {
            audit_key_file,
            data_dir,
            redis,
        } => verify_changes(&read_key(&audit_key_file)?, data_dir, &redis).await,
    }
}

fn read_key(path: &Path) -> Result<AuditKey, CliError> {
    let raw = super::client::read_file("--audit-key-file", path)?;
    AuditKey::from_file(&raw)
        .map_err(|e| CliError::Usage(format!("--audit-key-file {}: {e}", path.display())))
}

/// A store opened to read (never created), with how to name it.
type Opened = (std::sync::Arc<dyn ConsentStore>, String);

/// Opens the named store, if one is named (never creating one), through the store's one factory.
async fn open_store(
    data_dir: Option<PathBuf>,
    redis: &RedisArgs,
) -> Result<Option<Opened>, CliError> {
    let config = match (data_dir, redis.config()?) {
        (Some(dir), _) => crate::store::StoreConfig::Embedded {
            data_dir: dir,
            change_log_len: crate::server::defaults::CHANGE_LOG_LEN,
            cache_bytes: crate::store::embedded::DEFAULT_CACHE_BYTES,
        },
        (None, Some(config)) => crate::store::StoreConfig::Redis(config),
        (None, None) => return Ok(None),
    };
    let opened = crate::store::open(&config, None, crate::store::Create::Never)
        .await
        .map_err(|e| CliError::Input(e.message().to_string()))?;
    opened
        .store
        .open_dataset()
        .await
        .map_err(|e| CliError::Rpc(format!("{}: {e}", opened.shown)))?;
    Ok(Some((opened.store, opened.shown)))
}

/// Opens the named store and verifies its changes trail.
async fn verify_changes(
    key: &AuditKey,
    data_dir: Option<PathBuf>,
    redis: &RedisArgs,
) -> Result<ExitCode, CliError> {
    let Some((store, shown)) = open_store(data_dir, redis).await? else {
        return Err(CliError::Usage(
            "name the store: --data-dir DIR (embedded), or --redis-url, --redis-sentinel or \
             --redis-cluster"
                .into(),
        ));
    };
    let verdict = sealer::verify(store.as_ref(), key)
        .await
        .map_err(|e| CliError::Rpc(format!("{shown}: {e}")))?;
    match verdict {
        Ok(r) => {
            println!(
                "verified: {} records of the changes trail under {} seals (last seal {}), audit \
                 key {}; {} newer records not sealed yet; {} sealed records older than the \
                 oldest present are gone (retention)",
                r.records,
                r.seals,
                r.last_seal,
                key.id(),
                r.unsealed,
                r.gone_before_start
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("NOT VERIFIED: {shown}: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

/// How old a check log may be with no anchor in the store: ten default anchor intervals.
const ANCHOR_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// The anchors of the log in `dir`, read from `store`: the log's id and a check over them.
async fn anchors_of(
    dir: &Path,
    store: &dyn ConsentStore,
    shown: &str,
) -> Result<AnchorCheck, CliError> {
    let id_file = dir.join(LOG_ID_FILE);
    let log = std::fs::read_to_string(&id_file).map_err(|e| {
        CliError::Input(format!(
            "{}: {e}: the log's id, which its anchors name, is missing",
            id_file.display()
        ))
    })?;
    let records = store
        .read_audit(&AuditQuery {
            action: Some(ANCHOR_ACTION.into()),
            limit: usize::MAX,
            ..AuditQuery::default()
        })
        .await
        .map_err(|e| CliError::Rpc(format!("{shown}: {e}")))?;
    Ok(AnchorCheck::new(
        log.trim(),
        records
            .into_iter()
            .filter_map(|r| r.check_log.map(|a| (r.at_ms, a))),
    ))
}

/// Verifies check-log segment files in order, and a directory against its anchors in `store`.
async fn verify_files(
    key: &AuditKey,
    paths: &[PathBuf],
    store: Option<Opened>,
) -> Result<ExitCode, CliError> {
    let files = files_of(paths)?;
    let mut anchors = match (&store, paths) {
        (Some((s, shown)), [dir]) if dir.is_dir() => {
            Some(anchors_of(dir, s.as_ref(), shown).await?)
        }
        (Some(_), _) => {
            return Err(CliError::Usage(
                "comparing with the anchors in the store needs the check-log directory (one \
                 path, a directory), not files"
                    .into(),
            ));
        }
        (None, _) => None,
    };
    let mut head: Option<ChainHead> = None;
    let mut records = 0u64;
    let mut first_at_ms = None;
    for file in &files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| CliError::Input(format!("{}: {e}", file.display())))?;
        let lines: Vec<&str> = text.lines().collect();
        // The first file may start after segments removed by retention: from its own first line.
        match trail::verify(lines.iter().copied(), key, head, 1) {
            Ok(h) => {
                records += lines.len() as u64;
                if !lines.is_empty() {
                    head = Some(h);
                }
            }
            Err(e) => {
                println!("NOT VERIFIED: {} {e}", file.display());
                return Ok(ExitCode::from(1));
            }
        }
        if let Some(check) = anchors.as_mut() {
            for line in &lines {
                let Some((seq, r)) = trail::open_line::<AuditRecord>(line) else {
                    continue;
                };
                first_at_ms.get_or_insert(r.at_ms);
                if let Err(e) = check.line(seq, line) {
                    println!("NOT VERIFIED: {} {e}", file.display());
                    return Ok(ExitCode::from(1));
                }
            }
        }
    }
    let last = head.map_or(0, |h| h.seq);
    let compared = match (anchors, &store) {
        (Some(check), Some((_, shown))) => {
            let grace = i64::try_from(ANCHOR_GRACE.as_millis()).unwrap_or(i64::MAX);
            let now = i64::try_from(crate::store::now_ms()).unwrap_or(i64::MAX);
            match check.finish(first_at_ms, grace, now) {
                Ok(r) => format!(
                    "; compared with {} anchors in {shown}: complete up to sequence {} ({} newer \
                     lines not anchored yet)",
                    r.anchors, r.anchored_upto, r.after_anchor
                ),
                Err(e) => {
                    println!("NOT VERIFIED: {} {e}", paths[0].display());
                    return Ok(ExitCode::from(1));
                }
            }
        }
        _ => "; not compared with anchors (give the store, --data-dir or --redis-url, to show \
              lines cut from the end or segments deleted)"
            .to_string(),
    };
    println!(
        "verified: {records} records in {} files, up to sequence {last}, under audit key {}{compared}",
        files.len(),
        key.id()
    );
    Ok(ExitCode::SUCCESS)
}

/// The files to check, in order: a directory's segments, oldest first, or the files as given.
fn files_of(paths: &[PathBuf]) -> Result<Vec<PathBuf>, CliError> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            out.extend(segments(p).map_err(|e| CliError::Input(format!("{}: {e}", p.display())))?);
        } else if Path::new(p).exists() {
            out.push(p.clone());
        } else {
            return Err(CliError::Input(format!("{}: no such file", p.display())));
        }
    }
    Ok(out)
}
