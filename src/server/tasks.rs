//! The background tasks of a running server, owned in one place and stopped in order.

use std::time::Duration;

use tokio::{sync::watch, task::JoinHandle};

/// How long the check log may take to write what is queued at shutdown.
const CHECK_LOG_FLUSH: Duration = Duration::from_secs(5);

/// How long the check log's last anchor may take at shutdown.
const LAST_ANCHOR: Duration = Duration::from_secs(5);

/// Every task `serve` starts besides the gRPC server. [`Tasks::shut_down`] stops them in the
/// order that loses nothing: the side listeners (health port, metrics) first, then the follower
/// and the check log together (the log writes what is queued), then the check log's last anchor;
/// the helpers are aborted.
pub(super) struct Tasks {
    /// Turns true to stop the follower and the check log.
    stop: watch::Sender<bool>,
    /// Turns true to stop the health port and the metrics endpoint.
    side_stop: watch::Sender<bool>,
    side: Vec<JoinHandle<()>>,
    follower: Option<JoinHandle<()>>,
    check_log: Option<JoinHandle<()>>,
    /// Turns true once the check log wrote what was queued: the anchor records where it ends.
    last_anchor: watch::Sender<bool>,
    anchor: Option<JoinHandle<()>>,
    /// Tasks with nothing to finish (the health follower, the keys watcher): aborted.
    helpers: Vec<JoinHandle<()>>,
}

impl Tasks {
    pub(super) fn new() -> Self {
        Tasks {
            stop: watch::channel(false).0,
            side_stop: watch::channel(false).0,
            side: Vec::new(),
            follower: None,
            check_log: None,
            last_anchor: watch::channel(false).0,
            anchor: None,
            helpers: Vec::new(),
        }
    }

    /// What the follower and the check log watch to stop.
    pub(super) fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// What the side listeners watch to stop.
    pub(super) fn side_stop_signal(&self) -> watch::Receiver<bool> {
        self.side_stop.subscribe()
    }

    pub(super) fn follower(&mut self, task: JoinHandle<()>) {
        self.follower = Some(task);
    }

    pub(super) fn check_log(&mut self, task: JoinHandle<()>) {
        self.check_log = Some(task);
    }

    /// What the check log's anchor task watches for its last anchor.
    pub(super) fn last_anchor_signal(&self) -> watch::Receiver<bool> {
        self.last_anchor.subscribe()
    }

    pub(super) fn anchor(&mut self, task: JoinHandle<()>) {
        self.anchor = Some(task);
    }

    pub(super) fn side(&mut self, task: JoinHandle<()>) {
        self.side.push(task);
    }

    pub(super) fn helper(&mut self, task: JoinHandle<()>) {
        self.helpers.push(task);
    }

    /// Stops everything, in order, once the gRPC server has stopped.
    pub(super) async fn shut_down(self) {
        let _ = self.side_stop.send(true);
        for t in self.side {
            let _ = t.await;
        }
        let _ = self.stop.send(true);
        for t in &self.helpers {
            t.abort();
        }
        if let Some(t) = self.check_log
            && tokio::time::timeout(CHECK_LOG_FLUSH, t).await.is_err()
        {
            tracing::error!("audit records still unwritten at shutdown after 5 s");
        }
        // Where the check log ends, anchored in the store: a cut made while the replica is
        // stopped then shows.
        let _ = self.last_anchor.send(true);
        if let Some(t) = self.anchor
            && tokio::time::timeout(LAST_ANCHOR, t).await.is_err()
        {
            tracing::warn!(
                "the check log's last anchor was not written within 5 s of shutdown; lines \
                 since the one before cannot be shown complete"
            );
        }
        if let Some(t) = self.follower
            && let Err(e) = t.await
        {
            tracing::warn!(error = %e, "filter follower ended abnormally");
        }
    }
}
