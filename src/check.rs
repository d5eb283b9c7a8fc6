//! The check path, free of any transport: validate, apply the purpose policy, ask the filter, and
//! send the "maybe" numbers to the store in one batched lookup. Every doubt is WITHHOLD.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    core::{
        Applicable, DataOrigin, Decision, NhsNumber, OptOutSet, Purpose, ReleaseReason, Version,
        WithholdReason, applicable, decide,
    },
    store::{ConsentStore, Lookup},
    sync::{SyncedFilter, VersionWait},
};

/// One batch to check.
pub struct CheckInput<'a> {
    /// The numbers as sent, parsed by the caller (`None`: not a valid NHS number), so that the
    /// transport layer can reuse the parse (it records the released numbers).
    pub numbers: &'a [Option<NhsNumber>],
    /// Why the data is extracted.
    pub purpose: Purpose,
    /// Who holds it.
    pub origin: DataOrigin,
    /// Answer only from a filter (or store) that reflects at least this version.
    pub at_least_version: Option<Version>,
    /// When the answer must be ready; the store lookup is cut off before it.
    pub deadline: Instant,
}

/// The decisions, in input order, and the version they reflect.
#[derive(Clone, Debug)]
pub struct CheckOutput {
    /// One per input number.
    pub decisions: Vec<Decision>,
    /// The store version the answer reflects.
    pub version: Version,
}

/// The check engine shared by Check and CheckStream.
#[derive(Clone)]
pub struct Checker {
    store: Arc<dyn ConsentStore>,
    filter: Arc<SyncedFilter>,
}

const STORE_UNAVAILABLE: Decision = Decision::Withhold(WithholdReason::StoreUnavailable);

impl Checker {
    /// A checker over a store and the filter that follows it.
    pub fn new(store: Arc<dyn ConsentStore>, filter: Arc<SyncedFilter>) -> Self {
        Checker { store, filter }
    }

    /// Checks one batch. Never fails: what cannot be proven releasable is withheld.
    pub async fn check(&self, input: CheckInput<'_>) -> CheckOutput {
        let policy = applicable(input.purpose, input.origin);
        let parsed = input.numbers;
        let mut decisions: Vec<Decision> = parsed
            .iter()
            .map(|p| match p {
                None => Decision::Withhold(WithholdReason::InvalidNhsNumber),
                Some(_) if policy == Applicable::Exempt => {
                    Decision::Release(ReleaseReason::PurposeExempt)
                }
                // Provisional: replaced below by the filter's or the store's answer.
                Some(_) => STORE_UNAVAILABLE,
            })
            .collect();
        if policy == Applicable::Exempt {
            return CheckOutput {
                decisions,
                version: self.filter.version(),
            };
        }

        let valid: Vec<(usize, NhsNumber)> = parsed
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.map(|n| (i, n)))
            .collect();
        // The store lost changes this replica saw: nothing it says can be trusted, and no
        // rebuild from it either, until an admin acknowledges.
        if self.filter.regressed() {
            return self.withhold_all(decisions, &valid, WithholdReason::StoreRegressed);
        }

        // A caller who wrote at version V wants an answer that reflects V: wait for the filter,
        // within the deadline; if it does not get there, ask the store about every number. A V
        // beyond what the store holds (no admin write ever returned it) is answered at once.
        let mut filter_behind = false;
        if let Some(want) = input.at_least_version
            && self.filter.version() < want
        {
            let budget = remaining(input.deadline).mul_f32(0.5);
            match self.filter.wait_for_version(want, budget).await {
                VersionWait::Reached => {}
                VersionWait::Beyond => {
                    metrics::counter!("optout_check_version_not_reached_total").increment(1);
                    return self.withhold_all(decisions, &valid, WithholdReason::VersionNotReached);
                }
                VersionWait::TimedOut => filter_behind = true,
            }
        }
        let mut maybes: Vec<(usize, NhsNumber)> = Vec::new();
        let (filter_version, trusted) = {
            let view = self.filter.view();
            let trusted = view.trusted && !filter_behind;
            // The numbers a few places ahead are prefetched, so their probes' cache misses overlap
            // with this number's lookup instead of following it.
            const AHEAD: usize = 8;
            for (j, &(i, n)) in valid.iter().enumerate() {
                if trusted && let Some(&(_, next)) = valid.get(j + AHEAD) {
                    view.prefetch(next);
                }
                if trusted && !view.may_contain(n) {
                    decisions[i] = Decision::Release(ReleaseReason::NoOptOut);
                } else {
                    maybes.push((i, n));
                }
            }
            (view.version(), trusted)
        };
        if maybes.is_empty() {
            return CheckOutput {
                decisions,
                version: filter_version,
            };
        }

        let Some(found) = self.ask(&maybes, input.deadline).await else {
            // The maybes stay withheld as STORE_UNAVAILABLE.
            return CheckOutput {
                decisions,
                version: filter_version,
            };
        };
        let lag_ms = found.version.ms.saturating_sub(filter_version.ms);
        metrics::gauge!("optout_filter_version_lag_seconds").set(lag_ms as f64 / 1000.0);
        if found.version < filter_version {
            // The store answered from before what the filter already reflects: it lost changes
            // (or the answer came from a lagging node). Its "no opt-out" proves nothing.
            store_behind_filter(found.version, filter_version);
            return CheckOutput {
                decisions,
                version: filter_version,
            };
        }
        if !trusted || found.version == filter_version {
            // Either the store answered for every number, or it was at the filter's version: one
            // consistent state either way.
            self.apply(
                &mut decisions,
                &maybes,
                found.held,
                policy,
                input.at_least_version,
                found.version,
            );
            let version = if trusted {
                filter_version
            } else {
                found.version
            };
            return CheckOutput { decisions, version };
        }
        // The store moved past the filter between the two reads, so the filter's "absent" answers
        // and the store's answers come from different versions: a caller could see part of a
        // change (half of a REPLACE import). Ask the store for every number, so the whole answer
        // reflects one version; if it cannot answer, withhold everything rather than mix.
        let all = self.ask(&valid, input.deadline).await.filter(|all| {
            let current = all.version >= filter_version;
            if !current {
                store_behind_filter(all.version, filter_version);
            }
            current
        });
        match all {
            Some(all) => {
                let version = all.version;
                self.apply(
                    &mut decisions,
                    &valid,
                    all.held,
                    policy,
                    input.at_least_version,
                    version,
                );
                CheckOutput { decisions, version }
            }
            None => {
                for &(i, _) in &valid {
                    decisions[i] = STORE_UNAVAILABLE;
                }
                CheckOutput {
                    decisions,
                    version: filter_version,
                }
            }
        }
    }

    /// Every valid number withheld for `reason`, without asking the store.
    fn withhold_all(
        &self,
        mut decisions: Vec<Decision>,
        valid: &[(usize, NhsNumber)],
        reason: WithholdReason,
    ) -> CheckOutput {
        for &(i, _) in valid {
            decisions[i] = Decision::Withhold(reason);
        }
        CheckOutput {
            decisions,
            version: self.filter.version(),
        }
    }

    /// One batched store lookup within the deadline; `None` (logged) if it fails or runs out.
    async fn ask(&self, numbers: &[(usize, NhsNumber)], deadline: Instant) -> Option<Lookup> {
        let list: Vec<NhsNumber> = numbers.iter().map(|(_, n)| *n).collect();
        let started = Instant::now();
        let result = tokio::time::timeout(remaining(deadline), self.store.lookup(&list)).await;
        let label = match &result {
            Ok(Ok(_)) => "ok",
            Ok(Err(_)) => "error",
            Err(_) => "timeout",
        };
        metrics::counter!("optout_store_lookups_total", "result" => label).increment(1);
        metrics::counter!("optout_store_lookup_numbers_total").increment(list.len() as u64);
        metrics::histogram!("optout_store_lookup_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(found)) if found.held.len() == list.len() => Some(found),
            Ok(Ok(found)) => {
                tracing::error!(
                    asked = list.len(),
                    answered = found.held.len(),
                    "store answered a different number of lookups; withholding them"
                );
                None
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, numbers = list.len(), "store lookup failed; withholding");
                None
            }
            Err(_) => {
                tracing::warn!(
                    numbers = list.len(),
                    "store lookup hit the deadline; withholding"
                );
                None
            }
        }
    }

    /// Writes the store's answers into the decisions. A store behind the version the caller
    /// asked for cannot prove anything: withheld.
    fn apply(
        &self,
        decisions: &mut [Decision],
        asked: &[(usize, NhsNumber)],
        held: Vec<OptOutSet>,
        policy: Applicable,
        at_least: Option<Version>,
        store_version: Version,
    ) {
        let store_behind = at_least.is_some_and(|v| store_version < v);
        for (&(i, _), held) in asked.iter().zip(held) {
            decisions[i] = if store_behind {
                STORE_UNAVAILABLE
            } else {
                decide(policy, held)
            };
        }
    }
}

/// Logs and counts a store answer older than the filter (its numbers stay withheld).
fn store_behind_filter(store: Version, filter: Version) {
    metrics::counter!("optout_store_behind_filter_total").increment(1);
    tracing::warn!(
        %store,
        %filter,
        "the store answered from an older version than the filter reflects; withholding"
    );
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}
