//! The store server over real sockets: bad input, slow and numerous clients, limits, the worker
//! keyspace reset between attempts, and the peer filter. Every misbehaving connection is closed
//! and the server keeps serving the others.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use trainctl_store::codec::{encode_request, Request, VALIDATION_MAGIC};
use trainctl_store::{Namespace, StoreClient, StoreConfig, StoreError, StoreServer};

async fn server(config: StoreConfig) -> StoreServer {
    StoreServer::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("bind the store")
}

fn wire(requests: &[Request]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in requests {
        encode_request(r, &mut out);
    }
    out
}

/// Reads until the server closes the connection; fails the test if it does not within 5 s.
async fn assert_closed(stream: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "{what}: the server kept the connection open"
    );
}

/// A healthy client still gets answers.
async fn assert_serving(addr: SocketAddr) {
    let mut client = StoreClient::connect(&addr.to_string(), Namespace::Workers)
        .await
        .expect("a well-behaved client connects");
    client.set("/healthy", b"yes").await.unwrap();
    assert_eq!(client.get("/healthy").await.unwrap(), b"yes");
}

#[tokio::test]
async fn malformed_and_oversized_messages_close_only_their_connection() {
    let server = server(StoreConfig::default()).await;
    let addr = server.local_addr();
    let validate = wire(&[Request::Validate {
        magic: VALIDATION_MAGIC,
    }]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a request before VALIDATE",
            wire(&[Request::Set {
                key: b"/k".to_vec(),
                value: b"v".to_vec(),
            }]),
        ),
        (
            "a wrong magic",
            wire(&[Request::Validate { magic: 0xdead_beef }]),
        ),
        (
            "an unknown query type",
            [validate.clone(), vec![99]].concat(),
        ),
        (
            "a key of 2^64-1 bytes",
            [validate.clone(), vec![3], u64::MAX.to_le_bytes().to_vec()].concat(),
        ),
        (
            "a value over 8 MiB",
            [
                validate.clone(),
                vec![1],
                1u64.to_le_bytes().to_vec(),
                b"k".to_vec(),
                (8 * 1024 * 1024 + 1u64).to_le_bytes().to_vec(),
            ]
            .concat(),
        ),
        (
            "a key list of 2^40 keys",
            [
                validate.clone(),
                vec![6],
                (1u64 << 40).to_le_bytes().to_vec(),
            ]
            .concat(),
        ),
        (
            "GET of a key that does not exist",
            [
                validate.clone(),
                wire(&[Request::Get {
                    key: b"/nothing".to_vec(),
                }]),
            ]
            .concat(),
        ),
    ];
    for (what, bytes) in cases {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        assert_closed(&mut stream, what).await;
        assert_serving(addr).await;
    }
    assert!(server.stats().refused >= 7, "{:?}", server.stats());
}

#[tokio::test]
async fn slow_senders_time_out_but_idle_clients_stay() {
    let server = server(StoreConfig {
        frame_timeout: Duration::from_millis(300),
        ..StoreConfig::default()
    })
    .await;
    let addr = server.local_addr();

    // No handshake at all.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // A handshake, then a SET that never finishes (one byte every 100 ms, for ever).
    let mut slowloris = TcpStream::connect(addr).await.unwrap();
    slowloris
        .write_all(&wire(&[Request::Validate {
            magic: VALIDATION_MAGIC,
        }]))
        .await
        .unwrap();
    // A validated client idle for longer than the frame timeout is still served.
    let mut idle = StoreClient::connect(&addr.to_string(), Namespace::Workers)
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    slowloris.write_all(&[1]).await.unwrap();
    slowloris.write_all(&100u64.to_le_bytes()).await.unwrap();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if slowloris.write_all(b"x").await.is_err() {
            break;
        }
        let mut probe = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(1), slowloris.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a dribbling request was never cut off"
        );
    }
    assert_closed(&mut silent, "no handshake").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    idle.set("/after-idle", b"1").await.unwrap();
    assert_eq!(idle.get("/after-idle").await.unwrap(), b"1");
}

#[tokio::test]
async fn a_request_larger_than_the_buffer_budget_is_refused_and_large_ones_wait_their_turn() {
    let server = server(StoreConfig {
        buffer_budget_bytes: 3 * 1024 * 1024,
        frame_timeout: Duration::from_secs(10),
        ..StoreConfig::default()
    })
    .await;
    let addr = server.local_addr();
    let endpoint = addr.to_string();
    let mut too_big = StoreClient::connect(&endpoint, Namespace::Workers)
        .await
        .unwrap();
    // 4 MiB: within torch's value cap, beyond the whole budget.
    let refused = too_big.set("/big", &vec![7u8; 4 * 1024 * 1024]).await;
    let after = too_big.ping().await;
    assert!(
        refused.is_err() || after.is_err(),
        "a 4 MiB request with a 3 MiB budget was accepted"
    );
    // Three 2 MiB writes at once: the budget holds one at a time, and all of them complete.
    let mut writers = Vec::new();
    for i in 0..3u8 {
        let endpoint = endpoint.clone();
        writers.push(tokio::spawn(async move {
            let mut c = StoreClient::connect(&endpoint, Namespace::Workers)
                .await
                .unwrap();
            let key = format!("/v{i}");
            c.set(&key, &vec![i; 2 * 1024 * 1024]).await.unwrap();
            c.get(&key).await.unwrap().len()
        }));
    }
    for w in writers {
        assert_eq!(w.await.unwrap(), 2 * 1024 * 1024);
    }
    assert_serving(addr).await;
}

#[tokio::test]
async fn a_full_store_refuses_the_write_and_keeps_what_it_has() {
    let server = server(StoreConfig {
        max_bytes: 1024,
        ..StoreConfig::default()
    })
    .await;
    let endpoint = server.local_addr().to_string();
    let mut a = StoreClient::connect(&endpoint, Namespace::Workers)
        .await
        .unwrap();
    a.set("/small", b"kept").await.unwrap();
    let mut b = StoreClient::connect(&endpoint, Namespace::Workers)
        .await
        .unwrap();
    let _ = b.set("/huge", &[0u8; 2000]).await;
    assert!(b.ping().await.is_err(), "the over-limit writer is cut off");
    assert_eq!(a.get("/small").await.unwrap(), b"kept");
    assert_eq!(a.num_keys().await.unwrap(), 1);
}

#[tokio::test]
async fn reset_gives_the_next_attempt_an_empty_worker_keyspace() {
    let server = server(StoreConfig::default()).await;
    let endpoint = server.local_addr().to_string();
    let mut old_rank = StoreClient::connect(&endpoint, Namespace::Workers)
        .await
        .unwrap();
    let mut launcher = StoreClient::connect(&endpoint, Namespace::Control)
        .await
        .unwrap();
    old_rank.set("/nccl-id", b"attempt-0").await.unwrap();
    launcher.set("rdzv/round", b"0").await.unwrap();
    assert!(
        !launcher.check(&["/nccl-id"]).await.unwrap(),
        "the control keyspace does not see the workers'"
    );

    server.reset_workers();

    // The old attempt's connection is closed; the new attempt sees nothing of the old one.
    let old = tokio::time::timeout(Duration::from_secs(5), old_rank.ping()).await;
    assert!(matches!(old, Ok(Err(StoreError::Io { .. }))), "{old:?}");
    let mut new_rank = StoreClient::connect(&endpoint, Namespace::Workers)
        .await
        .unwrap();
    assert!(!new_rank.check(&["/nccl-id"]).await.unwrap());
    assert_eq!(new_rank.num_keys().await.unwrap(), 0);
    // The launchers' keys and connections survive.
    assert_eq!(launcher.get("rdzv/round").await.unwrap(), b"0");
    assert_eq!(server.stats().worker_resets, 1);
}

#[tokio::test]
async fn only_allowed_peers_are_served() {
    let server = server(StoreConfig {
        allowed_peers: Some(vec!["127.0.0.2".parse().unwrap()]),
        ..StoreConfig::default()
    })
    .await;
    let addr = server.local_addr();
    let mut outsider = TcpStream::connect(addr).await.unwrap();
    outsider
        .write_all(&wire(&[Request::Validate {
            magic: VALIDATION_MAGIC,
        }]))
        .await
        .unwrap();
    assert_closed(&mut outsider, "a peer outside the job").await;

    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut member = socket.connect(addr).await.unwrap();
    member
        .write_all(&wire(&[
            Request::Validate {
                magic: VALIDATION_MAGIC,
            },
            Request::Ping { nonce: 5 },
        ]))
        .await
        .unwrap();
    assert_eq!(member.read_u32_le().await.unwrap(), 5);
}
