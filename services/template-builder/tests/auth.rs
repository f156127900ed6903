//! API keys on `nanobox.v1.Templates`: a call without a key or with a wrong one is
//! UNAUTHENTICATED and says why, the configured key works, health and reflection need no
//! key, several keys each work, `NANOBOX__API__API_KEYS` overrides the file, and a builder
//! configured without keys is open.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Stack, API_KEY};
use nanobox_proto::v1;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_need_an_api_key_health_does_not() {
    let mut stack = Stack::start().await;

    for (key, why) in [
        (None, "missing API key"),
        (Some("not-the-key-at-all-0123456789"), "wrong API key"),
        // A prefix of the right key is as wrong as any other.
        (Some(&API_KEY[..API_KEY.len() - 1]), "wrong API key"),
    ] {
        let mut client = stack.client_with_key(key).await;
        let err = client
            .list(v1::ListTemplatesRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{key:?}: {err:?}");
        assert!(err.message().contains(why), "{key:?}: {err:?}");
        // Refused before the service: not even validation runs.
        let err = client
            .warmup(v1::WarmupRequest {
                name: "Bad Name".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{key:?}: {err:?}");
    }

    let mut client = stack.client().await;
    let listed = client
        .list(v1::ListTemplatesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.templates.is_empty(), "{listed:?}");

    // Health is for probes, which carry no key.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", stack.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let reply = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "nanobox.v1.Templates".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    // Several keys (a rotation in progress): each works.
    const SECOND: &str = "second-api-key-0123456789abcdef";
    drop(stack.builder.take());
    stack.api_keys = vec![API_KEY.to_owned(), SECOND.to_owned()];
    stack.start_builder();
    for key in [API_KEY, SECOND] {
        assert!(
            stack
                .client_with_key(Some(key))
                .await
                .list(v1::ListTemplatesRequest::default())
                .await
                .is_ok(),
            "{key}"
        );
    }

    // `NANOBOX__API__API_KEYS` overrides the file's keys, as for every service.
    const FROM_ENV: &str = "env-api-key-0123456789abcdef";
    drop(stack.builder.take());
    stack.extra_env = vec![("NANOBOX__API__API_KEYS".into(), FROM_ENV.into())];
    stack.start_builder();
    let err = stack
        .client()
        .await
        .list(v1::ListTemplatesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(stack
        .client_with_key(Some(FROM_ENV))
        .await
        .list(v1::ListTemplatesRequest::default())
        .await
        .is_ok());
    stack.extra_env.clear();

    // No keys configured: the API is open.
    drop(stack.builder.take());
    stack.api_keys.clear();
    stack.start_builder();
    for key in [None, Some("anything-at-all-0123456789")] {
        assert!(
            stack
                .client_with_key(key)
                .await
                .list(v1::ListTemplatesRequest::default())
                .await
                .is_ok(),
            "{key:?}"
        );
    }
}
