//! `optout init-store`: initialise an empty store (Redis, or the embedded store in a data
//! directory), in a national coverage mode.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::{CliError, redis_args::RedisArgs};
use crate::{
    core::coverage::CoverageMode,
    store::{
        embedded::{DEFAULT_CACHE_BYTES, EmbeddedConfig, EmbeddedStore},
        redis::{RedisStore, defaults},
    },
};

/// What a number the national list does not hold means.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub(super) enum Coverage {
    /// A complete national list will be imported (as a national operator would): a number it
    /// does not hold has no national data opt-out.
    #[default]
    List,
    /// The results of national checks of the organisation's patients will be imported
    /// (`admin import --from-national-check SENT RETURNED`): a number outside the population
    /// checked is withheld (REASON_NOT_IN_CHECKED_POPULATION).
    Population,
}

impl From<Coverage> for CoverageMode {
    fn from(c: Coverage) -> Self {
        match c {
            Coverage::List => CoverageMode::List,
            Coverage::Population => CoverageMode::Population,
        }
    }
}

#[derive(Args, Debug)]
pub(super) struct InitStoreArgs {
    #[command(flatten)]
    redis: RedisArgs,
    /// Hash buckets per opt-out type. Keep opt-outs per bucket under 128 so Redis stores each
    /// bucket compactly: the default suits up to about 8 million opt-outs of one type.
    #[arg(long, default_value_t = defaults::BUCKETS)]
    buckets: u64,
    /// With --redis-cluster: shards of the opt-out data, each on its own slot range. More shards
    /// spread over more masters; a check touches up to this many slots.
    #[arg(long, default_value_t = defaults::SHARDS)]
    shards: usize,
    /// Initialise the embedded store in this directory instead of Redis (`serve` on an empty
    /// directory does this itself, in list mode).
    #[arg(long, conflicts_with_all = ["buckets", "shards"])]
    data_dir: Option<PathBuf>,
    /// What a number the national list does not hold means; fixed for the store's life.
    #[arg(long, value_enum, default_value_t = Coverage::List)]
    national_coverage: Coverage,
    /// With --national-coverage population: the organisation (ODS code) whose patients the
    /// national checks are made for. The national check's licence lets an organisation apply
    /// the result to its own patients only, so the store answers checks from that
    /// organisation's keys alone. Fixed for the store's life.
    #[arg(long, required_if_eq("national_coverage", "population"))]
    organisation: Option<String>,
    /// Succeed, changing nothing, when the store is initialised already in the same coverage
    /// mode (for a deployment's install hook); a different mode is an error.
    #[arg(long, conflicts_with = "verify_only")]
    exists_ok: bool,
    /// Write nothing: succeed if the store is initialised (in this coverage mode), fail loudly if
    /// it holds no dataset marker. For a deployment's upgrade hook: a store that lost its data
    /// (flushed, restarted without persistence, the wrong database) must be restored, never
    /// initialised again as an empty store whose replicas would release everyone.
    #[arg(long)]
    verify_only: bool,
}

/// With --exists-ok: an initialised store in the same mode (and, in population mode, for the
/// same organisation) is fine; otherwise an error.
async fn already(
    store: &dyn crate::store::ConsentStore,
    shown: &str,
    mode: CoverageMode,
    owner: Option<&str>,
) -> Result<(), CliError> {
    store
        .open_dataset()
        .await
        .map_err(|e| CliError::Rpc(format!("{shown}: {e}")))?;
    let coverage = store
        .coverage()
        .await
        .map_err(|e| CliError::Rpc(format!("{shown}: {e}")))?;
    let have = coverage.national_mode.unwrap_or_default();
    match (coverage.owner.as_deref(), owner) {
        (Some(stored), Some(given)) if stored != given => {
            return Err(CliError::Usage(format!(
                "{shown} belongs to organisation {stored}, not {given}: a population-mode store \
                 holds one organisation's national checks"
            )));
        }
        (None, Some(_)) if have == CoverageMode::Population => eprintln!(
            "warning: {shown} names no owning organisation (initialised before owners were \
             recorded): it answers every organisation's keys"
        ),
        _ => {}
    }
    if have != mode {
        return Err(CliError::Usage(format!(
            "{shown} is initialised in {} mode, not {}: a store's coverage mode is chosen once",
            have.name(),
            mode.name()
        )));
    }
    println!(
        "{shown} is initialised already (national coverage {}); nothing was changed",
        mode.name()
    );
    Ok(())
}

/// With --verify-only: the store must hold a dataset, in `mode`; nothing is written.
async fn verify(
    store: &dyn crate::store::ConsentStore,
    shown: &str,
    mode: CoverageMode,
    owner: Option<&str>,
) -> Result<(), CliError> {
    match store.open_dataset().await {
        Ok(_) => already(store, shown, mode, owner).await,
        Err(crate::store::StoreError::NotInitialised(_)) => Err(CliError::Rpc(format!(
            "{shown} holds no dataset marker: it was never initialised, or it lost its data \
             (flushed, restarted without persistence, restored from nothing, or the wrong \
             database). Every replica withholds everything until the data is back. Restore it \
             from a backup; only if this is meant to be a new, empty store, run `optout \
             init-store` against it by hand. Nothing was changed."
        ))),
        Err(e) => Err(CliError::Rpc(format!("{shown}: {e}"))),
    }
}

pub(super) async fn run(args: InitStoreArgs) -> Result<(), CliError> {
    let mode = CoverageMode::from(args.national_coverage);
    let owner = args.organisation.as_deref().map(str::trim);
    if let Some(o) = owner {
        if mode != CoverageMode::Population {
            return Err(CliError::Usage(
                "--organisation names the owner of a store in population mode: add \
                 --national-coverage population, or leave it out"
                    .into(),
            ));
        }
        if !crate::core::keys::valid_organisation(o) {
            return Err(CliError::Usage(format!(
                "--organisation {o:?}: give an ODS code (1 to 64 letters, digits, '-' or '_')"
            )));
        }
    }
    if let Some(dir) = &args.data_dir {
        if args.redis.config()?.is_some() {
            return Err(CliError::Usage(
                "--data-dir initialises the embedded store: leave out --redis-url and \
                 --redis-sentinel"
                    .into(),
            ));
        }
        let config = EmbeddedConfig {
            data_dir: dir.clone(),
            change_log_len: 1,
            cache_bytes: DEFAULT_CACHE_BYTES,
        };
        if args.verify_only && !EmbeddedStore::db_path(dir).exists() {
            return Err(CliError::Rpc(format!(
                "{} holds no embedded store; nothing was changed",
                dir.display()
            )));
        }
        if (args.exists_ok || args.verify_only) && EmbeddedStore::db_path(dir).exists() {
            let (store, _) =
                EmbeddedStore::open(&config).map_err(|e| CliError::Usage(e.to_string()))?;
            return already(&store, &dir.display().to_string(), mode, owner).await;
        }
        let store = EmbeddedStore::init_owned(&config, mode, owner)
            .map_err(|e| CliError::Usage(e.to_string()))?;
        println!(
            "initialised the embedded opt-out store in {}: dataset {}, national coverage {}{}",
            dir.display(),
            store.dataset_id(),
            mode.name(),
            owned_by(owner)
        );
        return Ok(());
    }
    let Some(mut config) = args.redis.config()? else {
        return Err(CliError::Usage(
            "--redis-url or --redis-sentinel (or OPTOUT_REDIS_URL, OPTOUT_REDIS_SENTINEL), or \
             --data-dir for the embedded store, is required"
                .into(),
        ));
    };
    if args.buckets == 0 {
        return Err(CliError::Usage("--buckets must be at least 1".into()));
    }
    if !(1..=16384).contains(&args.shards) {
        return Err(CliError::Usage("--shards must be 1 to 16384".into()));
    }
    config.shards = args.shards;
    let shown = config.describe();
    let store = RedisStore::connect(&config).map_err(|e| CliError::Usage(e.to_string()))?;
    if args.verify_only {
        return verify(&store, &shown, mode, owner).await;
    }
    let id = match store.init_owned(args.buckets, mode, owner).await {
        Ok(id) => id,
        Err(crate::store::StoreError::ImportRefused(_)) if args.exists_ok => {
            return already(&store, &shown, mode, owner).await;
        }
        Err(e) => return Err(CliError::Rpc(format!("{shown}: {e}"))),
    };
    println!(
        "initialised the opt-out store at {shown} (prefix {:?}): dataset {id}, {} buckets, \
         national coverage {}{}",
        config.prefix,
        args.buckets,
        mode.name(),
        owned_by(owner)
    );
    Ok(())
}

fn owned_by(owner: Option<&str>) -> String {
    owner.map_or_else(String::new, |o| {
        format!(", answering checks of organisation {o} only")
    })
}
