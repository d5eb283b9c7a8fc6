//! Scale run for the Redis store: memory per opt-out and time to SERVING with and without a
//! filter snapshot, at production size (5,000,000 opt-outs by default).
//!
//! Needs a Redis it may fill (use a scratch one: it writes under its own prefix and deletes
//! nothing else):
//!
//! ```sh
//! redis-server --port 6390 --save "" --appendonly yes --appendfsync always &
//! cargo run --release --example redis_scale -- redis://127.0.0.1:6390 5000000
//! ```
//!
//! Steps: initialise the prefix, import N synthetic opt-outs through the store's own REPLACE
//! import (reporting the import rate), read `INFO memory` before and after (bytes per opt-out),
//! start a replica and time it to SERVING (no snapshot yet: a full scan), let it publish a
//! snapshot, then time a second replica to SERVING (from the snapshot).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use optout::{
    core::{NhsNumber, OptOutType},
    server::{ServerConfig, serve},
    store::{
        ChangeFeed, ConsentStore, ImportMode, Writes,
        redis::{RedisConfig, RedisStore},
    },
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

type Error = Box<dyn std::error::Error + Send + Sync>;

async fn used_memory(url: &str) -> Result<u64, Error> {
    let mut c = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let info: String = redis::cmd("INFO").arg("memory").query_async(&mut c).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "INFO memory has no used_memory".into())
}

/// Starts a replica on 127.0.0.1 port 0 and returns how long it took to report SERVING.
async fn time_to_serving(
    config: ServerConfig,
) -> Result<(Duration, tokio::sync::oneshot::Sender<()>), Error> {
    let started = Instant::now();
    let store: Arc<dyn ConsentStore> =
        Arc::new(RedisStore::connect(config.redis().ok_or("no redis")?)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, store, config, async {
        let _ = stopped.await;
    }));
    loop {
        if let Ok(ch) = tonic::transport::Channel::from_shared(url.clone())?
            .connect()
            .await
        {
            let status = HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|r| r.into_inner().status)
                .unwrap_or(-1);
            if status == ServingStatus::Serving as i32 {
                return Ok((started.elapsed(), stop));
            }
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err("replica not SERVING after 10 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6390".into());
    let count: usize = args
        .next()
        .map(|c| c.parse())
        .transpose()?
        .unwrap_or(5_000_000);
    let prefix = format!("optout-scale-{}:", std::process::id());
    let mut rc = RedisConfig::new(url.clone());
    rc.prefix = prefix.clone();
    let store = RedisStore::connect(&rc)?;

    let before = used_memory(&url).await?;
    store.init(65_536).await?;
    store.open_dataset().await?;
    let numbers: Vec<NhsNumber> = (4_000_000_000u64..)
        .filter_map(|v| NhsNumber::from_u64(v).ok())
        .take(count)
        .collect();
    let started = Instant::now();
    let mut import = store
        .begin_import(
            ImportMode::Replace,
            OptOutType::NationalDataOptOut,
            None,
            "scale-run.csv",
        )
        .await?;
    for chunk in numbers.chunks(1_000_000) {
        import.stage(chunk.to_vec()).await?;
    }
    let staged = started.elapsed();
    let audit_key = optout::core::AuditKey::new(&[7u8; 32])?;
    let outcome = import
        .commit(
            optout::core::AuditRecord {
                organisation: "scale-run".into(),
                action: "import-replace".into(),
                ..Default::default()
            },
            &audit_key,
        )
        .await?;
    let took = started.elapsed();
    drop(numbers);
    let after = used_memory(&url).await?;
    println!("redis: {url}, prefix {prefix}");
    println!(
        "import: {count} opt-outs in {:.2} s ({:.0}/s; staging {:.2} s, apply {:.2} s), version {}",
        took.as_secs_f64(),
        count as f64 / took.as_secs_f64(),
        staged.as_secs_f64(),
        (took - staged).as_secs_f64(),
        outcome.version
    );
    println!(
        "memory: used_memory {before} -> {after} bytes: {:.1} bytes per opt-out",
        (after.saturating_sub(before)) as f64 / count as f64
    );

    let mut config = ServerConfig::new(std::env::temp_dir());
    config.store = optout::server::StoreConfig::Redis(rc);
    config.filter.capacity = count as u64;
    config.filter.snapshot_interval = Duration::from_secs(1);
    let (scan, stop_first) = time_to_serving(config.clone()).await?;
    println!(
        "time to SERVING without a snapshot (full scan): {:.2} s",
        scan.as_secs_f64()
    );

    let mut c = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let waited = Instant::now();
    loop {
        let v: Option<String> = redis::cmd("GET")
            .arg(format!("{prefix}snapshot_version"))
            .query_async(&mut c)
            .await?;
        if v.as_deref() == Some(outcome.version.to_string().as_str()) {
            break;
        }
        if waited.elapsed() > Duration::from_secs(60) {
            return Err("no snapshot published within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (snap, stop_second) = time_to_serving(config).await?;
    println!(
        "time to SERVING from the snapshot: {:.2} s",
        snap.as_secs_f64()
    );
    let _ = stop_first.send(());
    let _ = stop_second.send(());
    println!(
        "(keys under {prefix} are left for inspection; delete them with redis-cli --scan --pattern '{prefix}*' | xargs redis-cli unlink)"
    );
    Ok(())
}
