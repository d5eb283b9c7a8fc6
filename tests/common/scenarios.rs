//! Scenarios several test files run against different stores.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use optout::{api::proto, server::ServerConfig};

use super::*;

pub fn import(numbers: &[String], commit: bool) -> proto::ImportOptOutsRequest {
    proto::ImportOptOutsRequest {
        mode: proto::ImportMode::Replace as i32,
        r#type: proto::OptOutType::NationalDataOptOut as i32,
        source: "replace".into(),
        nhs_numbers: numbers.to_vec(),
        commit,
        ..Default::default()
    }
}

/// A REPLACE import of `numbers` in messages of `size`, the last one committing.
pub fn import_in_chunks(numbers: &[String], size: usize) -> Vec<proto::ImportOptOutsRequest> {
    numbers
        .chunks(size)
        .enumerate()
        .map(|(i, c)| import(c, (i + 1) * size >= numbers.len()))
        .collect()
}

/// Two replicas on the initialised store of `config`: a REPLACE import of 3,000 opt-outs by one,
/// while the other checks numbers of the old and the new list; no check ever sees half of each.
pub async fn replace_import_never_shows_half_a_list(config: ServerConfig) {
    let writer = TestServer::start_redis(config.clone()).await;
    let reader = Arc::new(TestServer::start_redis(config.clone()).await);
    let old = valid_numbers(4_400_000_000, 3000);
    let new = valid_numbers(4_500_000_000, 3000);
    let mut admin = writer.admin_client().await;
    admin
        .import_opt_outs(tokio_stream::iter(vec![import(&old, true)]))
        .await
        .expect("first list");
    let mut both: Vec<String> = old.iter().step_by(10).cloned().collect();
    let probe_new: Vec<String> = new.iter().step_by(10).cloned().collect();
    let split = both.len();
    both.extend(probe_new);

    let stop = Arc::new(AtomicBool::new(false));
    let states = {
        let (reader, stop, both) = (reader.clone(), stop.clone(), both.clone());
        tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            let mut client = reader.check_client().await;
            while !stop.load(Ordering::SeqCst) {
                let r = client
                    .check(check_request(both.clone(), proto::Purpose::Research))
                    .await
                    .expect("check")
                    .into_inner();
                let w: Vec<bool> = r
                    .decisions
                    .iter()
                    .map(|d| outcome(d).0 == proto::Outcome::Withhold)
                    .collect();
                let old_state = w[..split].iter().all(|x| *x) && w[split..].iter().all(|x| !*x);
                let new_state = w[..split].iter().all(|x| !*x) && w[split..].iter().all(|x| *x);
                assert!(
                    old_state || new_state,
                    "a check saw half a list: {} of {} old withheld, {} of {} new withheld",
                    w[..split].iter().filter(|x| **x).count(),
                    split,
                    w[split..].iter().filter(|x| **x).count(),
                    w.len() - split
                );
                seen.insert(new_state);
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = admin
        .import_opt_outs(tokio_stream::iter(import_in_chunks(&new, 500)))
        .await
        .expect("replace")
        .into_inner();
    assert_eq!((r.added, r.removed), (3000, 3000));
    let done = std::time::Instant::now();
    while done.elapsed() < Duration::from_millis(2500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let seen = states.await.expect("never half a list");
    assert!(seen.contains(&true), "checks saw the new list");
    let s = reader
        .admin_client()
        .await
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(s.national_data_opt_outs, 3000);
    writer.stop().await;
    Arc::try_unwrap(reader)
        .ok()
        .expect("sole owner")
        .stop()
        .await;
}
