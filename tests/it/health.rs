//! Health and reflection: generic gRPC tools work without the .proto file, and probes see
//! NOT_SERVING until the filter is loaded.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use crate::common::{FaultyStore, TestServer, check_request, outcome, test_config, valid_numbers};
use optout::{
    api::proto::{Outcome, Purpose, Reason},
    server::open_embedded,
    store::{ChangeKind, ConsentStore},
};
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

#[tokio::test]
async fn not_serving_until_the_filter_loads_yet_checks_answer_from_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path());
    let inner: Arc<dyn ConsentStore> = Arc::new(open_embedded(&config).await.expect("store"));
    let n = valid_numbers(4_000_000_000, 2);
    let opted = optout::core::NhsNumber::parse(&n[0]).expect("valid");
    inner
        .change(
            ChangeKind::Add,
            optout::core::OptOutType::NationalDataOptOut,
            None,
            &[opted],
            "seed",
            &optout::core::AuditRecord::default(),
        )
        .await
        .expect("seed");
    let faulty = FaultyStore::new(inner);
    faulty.feed_down.store(true, Ordering::SeqCst); // the scan that loads the filter fails
    let server = TestServer::start_unready(faulty.store(), config).await;

    let mut status = -1;
    for _ in 0..50 {
        status = server.health().await;
        if status >= 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, ServingStatus::NotServing as i32);
    // Without a filter every number is asked of the store: still right, just slower.
    let r = server
        .check_client()
        .await
        .check(check_request(n.clone(), Purpose::Research))
        .await
        .expect("check")
        .into_inner();
    let got: Vec<_> = r.decisions.iter().map(outcome).collect();
    assert_eq!(
        got,
        vec![
            (Outcome::Withhold, Reason::NationalDataOptOut),
            (Outcome::Release, Reason::NoOptOut)
        ]
    );

    faulty.feed_down.store(false, Ordering::SeqCst);
    server.wait_serving().await;
    assert_eq!(server.health().await, ServingStatus::Serving as i32);
    server.stop().await;
}

#[tokio::test]
async fn reflection_lists_the_services_and_describes_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(dir.path()).await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let requests = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "optout.v1.OptOutCheck".into(),
            )),
        },
    ];
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection")
        .into_inner();
    let first = responses.next().await.expect("one").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "optout.v1.OptOutCheck",
        "optout.v1.OptOutAdmin",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    let second = responses.next().await.expect("two").expect("ok");
    let Some(MessageResponse::FileDescriptorResponse(fd)) = second.message_response else {
        panic!("expected a file descriptor");
    };
    assert!(!fd.file_descriptor_proto.is_empty());
    server.stop().await;
}
