//! The server as a library function: `run(listener, config, shutdown)`. The binary only parses
//! flags and wires signals; tests start the same `run` on 127.0.0.1 port 0.
//!
//! [`serve`] reads as its steps: the filter and its follower, health, the engines (check, check
//! log, admin) with the keys and rate limits in front of them, the side listeners, then the gRPC
//! port until shutdown; `tasks::Tasks` owns every background task and stops them in order.

mod config;
mod gauges;
mod health;
mod tasks;
mod transport;

use std::{future::Future, sync::Arc};

use tokio::net::TcpListener;
use tonic::service::{Routes, interceptor::InterceptedService};

pub use config::{ServerConfig, StoreConfig, TlsFiles, defaults};
pub use health::LIVENESS;

use crate::{
    api::{
        AdminService, CheckService,
        gate::{Gate, GateState},
        proto::{
            FILE_DESCRIPTOR_SET, opt_out_admin_server::OptOutAdminServer,
            opt_out_check_server::OptOutCheckServer,
        },
    },
    auth::{Keyring, Role},
    core::AuditKey,
    engine::{
        admin::Admin,
        check::Checker,
        check_files::CheckFiles,
        check_log::{CheckLog, Sink},
        filter::SyncedFilter,
        follower::Follower,
    },
    store::{
        ConsentStore, StoreError,
        embedded::{EmbeddedConfig, EmbeddedStore},
    },
};
use health::HealthState;
use tasks::Tasks;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    Config(String),
    /// The gRPC transport failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The keys file could not be loaded.
    #[error(transparent)]
    Keys(#[from] crate::auth::KeysFileError),
    /// The health or metrics listener could not be used.
    #[error("{0}")]
    Listener(String),
}

/// Opens the configured store and serves it on `listener` until `shutdown` completes; then
/// drains in-flight requests and returns once the background tasks have stopped.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let store = open_store(&config).await?;
    serve(listener, store, config, shutdown).await
}

/// The configured store, chosen by the store's one factory ([`crate::store::open`]): Redis
/// (connected lazily; the records this replica writes to the changes trail carry a MAC under the
/// audit key), or the embedded store opened (and locked) now, so that a data directory in use
/// fails before the server says it is listening; a directory without a database gets a new,
/// empty dataset, said loudly.
pub async fn open_store(config: &ServerConfig) -> Result<Arc<dyn ConsentStore>, ServerError> {
    let opened = crate::store::open(
        &config.store,
        config.audit_key.clone().map(Arc::new),
        crate::store::Create::IfMissing,
    )
    .await?;
    if opened.created {
        tracing::warn!(
            store = %opened.shown,
            "no database in the data directory: initialised a new, EMPTY opt-out dataset"
        );
    } else {
        tracing::info!(store = %opened.shown, "using the store");
    }
    Ok(opened.store)
}

/// The embedded store of `config`, opened (or initialised) as [`open_store`] would, as its own
/// type (for tests that reach inside it).
pub async fn open_embedded(config: &ServerConfig) -> Result<EmbeddedStore, ServerError> {
    let StoreConfig::Embedded {
        data_dir,
        change_log_len,
        cache_bytes,
    } = &config.store
    else {
        return Err(ServerError::Config(
            "the configuration names a Redis store, not the embedded one".into(),
        ));
    };
    let (store, _) = EmbeddedStore::open_async(EmbeddedConfig {
        data_dir: data_dir.clone(),
        change_log_len: *change_log_len,
        cache_bytes: *cache_bytes,
    })
    .await?;
    Ok(store)
}

/// Serves any consent store on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    store: Arc<dyn ConsentStore>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let local = listener.local_addr().ok();
    check_list_ages(store.as_ref(), &config.max_list_age).await?;
    let mut tasks = Tasks::new();
    let filter = SyncedFilter::new(crate::engine::filter::FilterConfig {
        max_list_age: config.max_list_age,
        ..config.filter
    })
    .map_err(|e| ServerError::Config(e.to_string()))?;
    let follower = Follower::new(store.clone(), filter.clone(), tasks.stop_signal())
        .with_snapshot_key(config.audit_key.clone());
    tasks.follower(tokio::spawn(follower.run()));
    let health = HealthState::start(&filter, &mut tasks).await;
    let engines = Engines::start(&store, &filter, &config, &mut tasks)?;
    transport::start_side_listeners(&config, &health, &filter, &engines.check_log, &mut tasks)?;
    let routes = engines.routes(&config, &health)?;
    if let Some(addr) = local {
        tracing::info!(%addr, store = store.kind(), "listening");
    }
    let result = transport::serve_grpc(listener, &config, routes, &health, shutdown).await;
    tasks.shut_down().await;
    result
}

/// A store in population mode does not serve without a maximum age for its national list: its
/// answers are only as good as the last national check. Turning a limit off in list mode is said
/// loudly. A store that cannot be asked now is not refused here: checks withhold what an unknown
/// mode or a population without a limit covers (`Coverage::rule`).
async fn check_list_ages(
    store: &dyn ConsentStore,
    max_age: &crate::core::coverage::MaxAge,
) -> Result<(), ServerError> {
    use crate::core::{OptOutType, coverage::CoverageMode};
    let coverage = tokio::time::timeout(std::time::Duration::from_secs(5), store.coverage()).await;
    let population = match &coverage {
        Ok(Ok(c)) if c.national_mode == Some(CoverageMode::Population) => Some(c),
        _ => None,
    };
    if let Some(c) = population
        && c.owner.is_none()
    {
        tracing::warn!(
            "this store is in population mode but names no owning organisation (it was \
             initialised before owners were recorded): checks from every organisation's keys \
             are answered, which the national check's licence does not allow; make a new store \
             with `optout init-store --national-coverage population --organisation ODS`"
        );
    }
    if max_age.national.is_none() && population.is_some() {
        return Err(ServerError::Config(
            "this store is in population mode, and --national-max-age-days is none: its answers \
             are only as good as the last national check, so it needs a maximum age (30 days by \
             default)"
                .into(),
        ));
    }
    for t in OptOutType::ALL {
        if max_age.of(t).is_none() {
            tracing::error!(
                opt_out = t.name(),
                "no maximum list age: a {} list never imported whole releases every number it \
                 does not hold, however old it is",
                t.name()
            );
        }
    }
    Ok(())
}

/// The engines and what guards them.
struct Engines {
    checker: Checker,
    admin: Admin,
    check_log: Arc<CheckLog>,
    gates: Arc<GateState>,
}

impl Engines {
    /// The keys (watched for changes), the audit key, the check log and the engines over them.
    fn start(
        store: &Arc<dyn ConsentStore>,
        filter: &Arc<SyncedFilter>,
        config: &ServerConfig,
        tasks: &mut Tasks,
    ) -> Result<Self, ServerError> {
        let keyring = match &config.keys_file {
            Some(path) => Some(Keyring::load(path)?),
            None => None,
        };
        if let Some(k) = &keyring {
            tasks.helper(k.watch(config.keys_reload));
        }
        if let Some(age) = config.changes_max_age {
            tasks.helper(tokio::spawn(trim_changes(store.clone(), age)));
        }
        if let Some(key) = &config.audit_key {
            tasks.helper(tokio::spawn(crate::engine::sealer::run(
                store.clone(),
                key.clone(),
                config.seal_interval,
            )));
        }
        let audit_key = audit_key(config)?;
        let files = match &config.check_files {
            Some(c) => Some(CheckFiles::open(c.clone(), audit_key.clone())?),
            None => None,
        };
        if let (Some(f), Some(c)) = (&files, &config.check_files) {
            tasks.anchor(tokio::spawn(crate::engine::check_files::anchor(
                f.clone(),
                store.clone(),
                c.anchor_interval,
                tasks.last_anchor_signal(),
            )));
        }
        let sink = match &files {
            Some(f) => Sink::Files(Box::new(f.clone())),
            None => Sink::Store(store.clone()),
        };
        let (check_log, log_task) = CheckLog::start(
            sink,
            audit_key.clone(),
            config.audit_bound,
            config.audit_queue_bytes,
            tasks.stop_signal(),
        );
        tasks.check_log(log_task);
        let mutual_tls = config
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_pem.is_some());
        Ok(Engines {
            checker: Checker::new(store.clone(), filter.clone(), check_log.clone()),
            admin: Admin::new(store.clone(), filter.clone(), audit_key, files),
            check_log,
            gates: GateState::new(keyring, config.rate_limit, mutual_tls),
        })
    }

    /// Every gRPC service: health, reflection, and the two APIs behind their gates.
    fn routes(&self, config: &ServerConfig, health: &HealthState) -> Result<Routes, ServerError> {
        let limits = config.limits;
        let check = OptOutCheckServer::new(CheckService::new(
            self.checker.clone(),
            limits,
            self.gates.clone(),
        ))
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
        let admin = OptOutAdminServer::new(AdminService::new(
            self.admin.clone(),
            limits,
            self.gates.clone(),
        ))
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
        // v1 for current tools, v1alpha for older grpcurl and grpcui.
        let described = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        Ok(Routes::new(health.service.clone())
            .add_service(described().build_v1()?)
            .add_service(described().build_v1alpha()?)
            .add_service(InterceptedService::new(
                check,
                Gate::new(self.gates.clone(), Role::Checker),
            ))
            .add_service(InterceptedService::new(
                admin,
                Gate::new(self.gates.clone(), Role::Admin),
            )))
    }
}

/// The configured audit key, or (development only) a random one for this process.
fn audit_key(config: &ServerConfig) -> Result<AuditKey, ServerError> {
    if let Some(k) = &config.audit_key {
        tracing::info!(audit_key_id = %k.id(), "audit key loaded");
        return Ok(k.clone());
    }
    tracing::warn!(
        "no audit key configured: using a random one for this process; audit digests will not \
         match records written by other replicas or after a restart"
    );
    let mut secret = [0u8; 32];
    rand::fill(&mut secret);
    AuditKey::new(&secret).map_err(|e| ServerError::Config(e.to_string()))
}

/// Deletes records of the changes trail older than `age`, at start and then hourly.
async fn trim_changes(store: Arc<dyn ConsentStore>, age: std::time::Duration) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        let before = crate::store::now_ms().saturating_sub(age_ms);
        match store.trim_changes(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                removed = n,
                "changes trail records past their retention removed"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot apply the changes trail retention; retrying")
            }
        }
    }
}
