//! The gauges that describe this replica's state (the filter, the lists, the audit queue), set
//! just before each scrape. Here, in the server that composes the engine and the telemetry, so
//! that telemetry stays a leaf: nothing it imports reports to it.

use crate::{core::OptOutType, engine::filter::SyncStatus, store::now_ms};

/// Sets the gauges that describe the filter and the audit queue (just before a scrape).
pub(super) fn set_state_gauges(st: &SyncStatus, audit_backlog: u64, audit_bytes: u64) {
    metrics::gauge!("optout_filter_items").set(st.stats.items as f64);
    metrics::gauge!("optout_filter_capacity").set(st.stats.capacity as f64);
    metrics::gauge!("optout_filter_bits").set(st.stats.bits as f64);
    metrics::gauge!("optout_filter_generation").set(st.stats.generation as f64);
    metrics::gauge!("optout_filter_estimated_fp_rate").set(st.stats.estimated_fp_rate);
    metrics::gauge!("optout_filter_loaded").set(f64::from(u8::from(st.loaded)));
    metrics::gauge!("optout_filter_fresh").set(f64::from(u8::from(st.fresh)));
    // Never caught up: as stale as can be said, rather than a reassuring zero.
    let age = st.age.map_or(f64::INFINITY, |a| a.as_secs_f64());
    metrics::gauge!("optout_filter_freshness_age_seconds").set(age);
    let now = now_ms();
    for l in st.lists(now) {
        let t = l.t.name();
        // Never imported whole: as old as can be said.
        let age = l
            .as_of_ms
            .map_or(f64::INFINITY, |at| now.saturating_sub(at) as f64 / 1000.0);
        metrics::gauge!("optout_list_age_seconds", "type" => t).set(age);
        // No maximum age: never expires; expired: negative.
        let left = l
            .expires_at_ms
            .map_or(f64::INFINITY, |e| (e as f64 - now as f64) / 1000.0);
        metrics::gauge!("optout_list_expires_in_seconds", "type" => t).set(left);
        metrics::gauge!("optout_list_expired", "type" => t).set(f64::from(u8::from(l.expired)));
        if l.t == OptOutType::NationalDataOptOut {
            metrics::gauge!("optout_population_patients").set(l.population as f64);
        }
    }
    metrics::gauge!("optout_audit_backlog").set(audit_backlog as f64);
    metrics::gauge!("optout_audit_backlog_bytes").set(audit_bytes as f64);
}
