//! `grpc.health.v1`: every service NOT_SERVING until the filter is loaded, and again whenever the
//! follower unloads it (the store's dataset disappeared, or went back in time), while the replica
//! can neither prove its filter fresh nor reach its store (every number would be withheld), and
//! when the server shuts down; `liveness` SERVING while the process runs.

use std::sync::Arc;

use tonic_health::{
    ServingStatus,
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};

use super::tasks::Tasks;
use crate::engine::filter::SyncedFilter;

/// The health "service" that says only that the process is up (for liveness probes).
pub const LIVENESS: &str = "liveness";

/// The health "service" that says whether every opt-out list is within its maximum age:
/// NOT_SERVING while one has expired (its numbers are withheld with REASON_LIST_TOO_OLD). Not
/// among the services a readiness probe asks about: every replica expires at once, and taking
/// them all out of traffic would turn withheld answers into no answers.
pub const LISTS: &str = "lists";

/// How often readiness is computed again (besides at once when the filter loads or unloads).
const READY_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// The services whose status follows the filter ("" is the server as a whole).
const SERVICES: [&str; 3] = ["", "optout.v1.OptOutCheck", "optout.v1.OptOutAdmin"];

/// The health reporter and the service that answers it.
pub(super) struct HealthState {
    reporter: HealthReporter,
    pub(super) service: HealthServer<HealthService>,
}

impl HealthState {
    /// NOT_SERVING now; then follows whether the replica is ready ([`SyncedFilter::ready`]), both
    /// ways: at once when the filter loads or unloads, within [`READY_POLL`] when the store stops
    /// or starts answering.
    pub(super) async fn start(filter: &Arc<SyncedFilter>, tasks: &mut Tasks) -> Self {
        let reporter = HealthReporter::new();
        let service = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
        let health = HealthState { reporter, service };
        set_all(&health.reporter, ServingStatus::NotServing).await;
        health
            .reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        let mut loaded = filter.loaded();
        let follower = health.reporter.clone();
        let ready = filter.clone();
        tasks.helper(tokio::spawn(async move {
            let mut serving = false;
            loop {
                loaded.borrow_and_update();
                let now = ready.ready();
                if now != serving {
                    serving = now;
                    let status = if now {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    set_all(&follower, status).await;
                    if now {
                        tracing::info!(serving = now, "health changed");
                    } else {
                        tracing::warn!(
                            serving = now,
                            "health changed: not ready (no filter loaded, or it cannot be \
                             proven fresh and the store does not answer)"
                        );
                    }
                }
                tokio::select! {
                    changed = loaded.changed() => if changed.is_err() { break },
                    _ = tokio::time::sleep(READY_POLL) => {}
                }
            }
        }));
        let lists = health.reporter.clone();
        let filter = filter.clone();
        tasks.helper(tokio::spawn(async move {
            let mut expired: Option<bool> = None;
            loop {
                let now = filter
                    .status()
                    .lists(crate::store::now_ms())
                    .iter()
                    .any(|l| l.expired);
                if expired != Some(now) {
                    if now {
                        tracing::error!(
                            "an opt-out list is past its maximum age: the numbers it applies to \
                             are withheld until a fresh list is imported (optout admin status)"
                        );
                    }
                    let status = if now {
                        ServingStatus::NotServing
                    } else {
                        ServingStatus::Serving
                    };
                    lists.set_service_status(LISTS, status).await;
                    expired = Some(now);
                }
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        }));
        health
    }

    /// Every service to `status` (not `liveness`).
    pub(super) async fn set_all(&self, status: ServingStatus) {
        set_all(&self.reporter, status).await;
    }
}

async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for s in SERVICES {
        reporter.set_service_status(s, status).await;
    }
}
