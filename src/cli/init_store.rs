//! `optout init-store`: initialise an empty Redis store.

use clap::Args;

use super::{CliError, serve::RedisArgs};
use crate::store::redis::{RedisStore, defaults};

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
}

pub(super) async fn run(args: InitStoreArgs) -> Result<(), CliError> {
    let Some(mut config) = args.redis.config() else {
        return Err(CliError::Usage(
            "--redis-url or --redis-sentinel (or OPTOUT_REDIS_URL, OPTOUT_REDIS_SENTINEL) is \
             required: the embedded store initialises itself on first start"
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
    let id = store
        .init(args.buckets)
        .await
        .map_err(|e| CliError::Rpc(format!("{shown}: {e}")))?;
    println!(
        "initialised the opt-out store at {shown} (prefix {:?}): dataset {id}, {} buckets",
        config.prefix, args.buckets
    );
    Ok(())
}
