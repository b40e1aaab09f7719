use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use trainctl_tls::ClusterCa;

use super::*;

const GOOD_TOKEN: &str = "tok-good";

/// A TLS listener for axum: handshakes that fail are skipped.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

#[derive(Clone)]
struct Fake {
    ca: Arc<ClusterCa>,
    joins: Arc<Mutex<Vec<String>>>,
}

/// The coordinator's side of the join contract, as specified.
async fn join_handler(
    State(fake): State<Fake>,
    Json(body): Json<serde_json::Value>,
) -> (StatusCode, Json<serde_json::Value>) {
    let token = body["token"].as_str().unwrap_or_default();
    let node = body["node"].as_str().unwrap_or_default();
    let csr = body["csr_pem"].as_str().unwrap_or_default();
    let error = |status, msg: &str| (status, Json(serde_json::json!({ "error": msg })));
    if token == "tok-admin" {
        return error(
            StatusCode::FORBIDDEN,
            "token tok-admin is not an agent token",
        );
    }
    if token != GOOD_TOKEN {
        return error(
            StatusCode::UNAUTHORIZED,
            "unknown, expired or revoked join token",
        );
    }
    match fake.ca.sign_csr(csr, node, 30) {
        Ok(cert_pem) => {
            fake.joins.lock().unwrap().push(node.to_string());
            (
                StatusCode::OK,
                Json(serde_json::json!({ "cert_pem": cert_pem, "ca_pem": fake.ca.cert_pem() })),
            )
        }
        Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

/// A fake coordinator on 127.0.0.1 serving `/v1/join` with a certificate from `server_ca`
/// (normally `ca` itself); returns its `https://` URL.
async fn fake_coordinator(ca: Arc<ClusterCa>, server_ca: &ClusterCa) -> (String, Fake) {
    let leaf = server_ca.issue_server(&["127.0.0.1".to_string()]).unwrap();
    let config = trainctl_tls::server_config(&leaf.cert_pem, &leaf.key_pem, ca.cert_pem()).unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", tcp.local_addr().unwrap());
    let fake = Fake {
        ca,
        joins: Arc::new(Mutex::new(Vec::new())),
    };
    let router = Router::new()
        .route(JOIN_PATH, post(join_handler))
        .with_state(fake.clone());
    let listener = TlsListener {
        tcp,
        acceptor: TlsAcceptor::from(config),
    };
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, fake)
}

/// A data dir and the agent's TLS settings with the CA written to a file.
fn setup(ca: &ClusterCa, token: Option<&str>) -> (tempfile::TempDir, AgentTlsConfig) {
    let tmp = tempfile::tempdir().unwrap();
    let ca_cert = tmp.path().join("ca.pem");
    fs::write(&ca_cert, ca.cert_pem()).unwrap();
    let tls = AgentTlsConfig {
        ca_cert,
        join_token: token.map(str::to_string),
    };
    (tmp, tls)
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn url_scheme_must_match_the_tls_setting() {
    check_url_scheme("https://10.0.0.1:7470", true).unwrap();
    check_url_scheme("http://10.0.0.1:7470", false).unwrap();
    let e = check_url_scheme("http://10.0.0.1:7470", true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("https://10.0.0.1:7470") && e.contains("--ca-cert"),
        "{e}"
    );
    let e = check_url_scheme("https://coord:7470", false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--ca-cert") && e.contains("tls/ca.pem"), "{e}");
    assert!(check_url_scheme("10.0.0.1:7470", true).is_err());
}

#[test]
fn stored_identity_is_reused_only_for_its_node_and_ca() {
    let ca = ClusterCa::generate("test CA").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(IDENTITY_DIR);
    match load_stored(&dir, "gpu-01", ca.cert_pem()) {
        Stored::Join { reason } => assert_eq!(reason, "this agent has no identity yet"),
        other => panic!("{other:?}"),
    }
    let issued = ca.issue_client("gpu-01", 30).unwrap();
    let identity = AgentIdentity {
        node_name: "gpu-01".into(),
        fingerprint: trainctl_tls::fingerprint_pem(&issued.cert_pem).unwrap(),
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
        ca_pem: ca.cert_pem().into(),
    };
    store(&dir, &identity).unwrap();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
    match load_stored(&dir, "gpu-01", ca.cert_pem()) {
        Stored::Reuse(found) => assert_eq!(found.fingerprint, identity.fingerprint),
        other => panic!("{other:?}"),
    }
    // Another node name: join again.
    match load_stored(&dir, "gpu-02", ca.cert_pem()) {
        Stored::Join { reason } => assert!(reason.contains("`gpu-01`, not `gpu-02`"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // Another CA (the coordinator's data dir was reset): join again.
    let other_ca = ClusterCa::generate("other").unwrap();
    assert!(matches!(
        load_stored(&dir, "gpu-01", other_ca.cert_pem()),
        Stored::Join { .. }
    ));
    // A key that is not the certificate's (a join interrupted between writes).
    let (other_key, _) = trainctl_tls::generate_csr("gpu-01").unwrap();
    fs::write(dir.join(KEY_FILE), other_key).unwrap();
    match load_stored(&dir, "gpu-01", ca.cert_pem()) {
        Stored::Join { reason } => assert!(reason.contains("key"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // A name file edited by hand that disagrees with the certificate.
    store(&dir, &identity).unwrap();
    fs::write(dir.join(NAME_FILE), "gpu-09\n").unwrap();
    match load_stored(&dir, "gpu-09", ca.cert_pem()) {
        Stored::Join { reason } => assert!(reason.contains("certificate names"), "{reason}"),
        other => panic!("{other:?}"),
    }
    fs::remove_file(dir.join(NAME_FILE)).unwrap();
    match load_stored(&dir, "gpu-01", ca.cert_pem()) {
        Stored::Join { reason } => assert!(reason.contains("incomplete"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn first_start_without_a_token_says_how_to_get_one() {
    let ca = ClusterCa::generate("test CA").unwrap();
    let (tmp, tls) = setup(&ca, None);
    let e = ensure(tmp.path(), "gpu-01", "https://127.0.0.1:1", &tls)
        .await
        .unwrap_err();
    assert!(!e.is_retryable());
    assert_eq!(
        e.to_string(),
        "this agent has no identity yet: start it with --join-token \
         (create one with `trainctl token create --role agent`)"
    );
    let e = ensure(tmp.path(), "gpu-01", "http://127.0.0.1:1", &tls)
        .await
        .unwrap_err();
    assert!(matches!(e, IdentityError::Config(_)), "{e}");
    let missing = AgentTlsConfig {
        ca_cert: tmp.path().join("nope.pem"),
        join_token: None,
    };
    let e = ensure(tmp.path(), "gpu-01", "https://127.0.0.1:1", &missing)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.pem"), "{e}");
}

#[tokio::test]
async fn joins_once_then_reuses_and_rejoins_for_a_new_name() {
    let ca = Arc::new(ClusterCa::generate("test CA").unwrap());
    let (url, fake) = fake_coordinator(ca.clone(), &ca).await;
    let (tmp, tls) = setup(&ca, Some(GOOD_TOKEN));
    let first = ensure(tmp.path(), "gpu-01", &url, &tls).await.unwrap();
    assert_eq!(first.node_name, "gpu-01");
    let dir = tmp.path().join(IDENTITY_DIR);
    assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(
        fs::read_to_string(dir.join(NAME_FILE)).unwrap().trim(),
        "gpu-01"
    );

    // A restart needs no token and does not contact the coordinator.
    let no_token = AgentTlsConfig {
        join_token: None,
        ..tls.clone()
    };
    let again = ensure(tmp.path(), "gpu-01", "https://127.0.0.1:1", &no_token)
        .await
        .unwrap();
    assert_eq!(again.fingerprint, first.fingerprint);
    assert_eq!(again.key_pem, first.key_pem);

    // A new node name joins again.
    let e = ensure(tmp.path(), "gpu-02", &url, &no_token)
        .await
        .unwrap_err();
    assert!(matches!(e, IdentityError::NeedsJoinToken { .. }), "{e}");
    let renamed = ensure(tmp.path(), "gpu-02", &url, &tls).await.unwrap();
    assert_ne!(renamed.fingerprint, first.fingerprint);
    assert_eq!(*fake.joins.lock().unwrap(), vec!["gpu-01", "gpu-02"]);

    // The stored identity works as a client certificate against the coordinator.
    let client = http_client(&renamed.ca_pem, Some(&renamed)).unwrap();
    let status = client
        .post(format!("{url}{JOIN_PATH}"))
        .json(&serde_json::json!({"token": "x", "node": "y", "csr_pem": ""}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401);
}

#[tokio::test]
async fn the_coordinators_refusal_is_shown_verbatim() {
    let ca = Arc::new(ClusterCa::generate("test CA").unwrap());
    let (url, _) = fake_coordinator(ca.clone(), &ca).await;
    for (token, status, message) in [
        ("tok-bad", 401, "unknown, expired or revoked join token"),
        ("tok-admin", 403, "token tok-admin is not an agent token"),
    ] {
        let (tmp, tls) = setup(&ca, Some(token));
        let e = ensure(tmp.path(), "gpu-01", &url, &tls).await.unwrap_err();
        assert!(!e.is_retryable());
        match &e {
            IdentityError::Refused {
                status: s,
                message: m,
                ..
            } => {
                assert_eq!((*s, m.as_str()), (status, message));
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().ends_with(message), "{e}");
        assert!(!tmp.path().join(IDENTITY_DIR).join(KEY_FILE).exists());
    }
}

#[tokio::test]
async fn a_coordinator_with_a_certificate_from_another_ca_is_refused() {
    let ca = Arc::new(ClusterCa::generate("test CA").unwrap());
    let impostor = ClusterCa::generate("impostor").unwrap();
    let (url, fake) = fake_coordinator(ca.clone(), &impostor).await;
    let (tmp, tls) = setup(&ca, Some(GOOD_TOKEN));
    let e = ensure(tmp.path(), "gpu-01", &url, &tls).await.unwrap_err();
    assert!(matches!(e, IdentityError::Handshake { .. }), "{e}");
    assert!(!e.is_retryable());
    assert!(fake.joins.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_unreachable_coordinator_is_retryable() {
    let ca = ClusterCa::generate("test CA").unwrap();
    let (tmp, tls) = setup(&ca, Some(GOOD_TOKEN));
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let e = ensure(
        tmp.path(),
        "gpu-01",
        &format!("https://127.0.0.1:{port}"),
        &tls,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, IdentityError::Unreachable { .. }), "{e}");
    assert!(e.is_retryable());
}

#[tokio::test]
async fn the_grpc_channel_presents_the_identity_and_checks_the_url_host() {
    use trainctl_proto::agent::agent_service_client::AgentServiceClient;
    let ca = ClusterCa::generate("test CA").unwrap();
    let issued = ca.issue_client("gpu-01", 30).unwrap();
    let identity = AgentIdentity {
        node_name: "gpu-01".into(),
        fingerprint: trainctl_tls::fingerprint_pem(&issued.cert_pem).unwrap(),
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
        ca_pem: ca.cert_pem().into(),
    };
    let leaf = ca.issue_server(&["127.0.0.1".to_string()]).unwrap();
    let config = trainctl_tls::server_config(&leaf.cert_pem, &leaf.key_pem, ca.cert_pem()).unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let acceptor = TlsAcceptor::from(config);
    let server = tokio::spawn(async move {
        let (stream, _) = tcp.accept().await.unwrap();
        let tls = acceptor.accept(stream).await.unwrap();
        let conn = tls.get_ref().1;
        (
            trainctl_tls::peer_fingerprint(conn),
            conn.alpn_protocol().map(<[u8]>::to_vec),
        )
    });
    trainctl_tls::install_crypto_provider();
    let channel =
        coordinator_channel(&format!("https://127.0.0.1:{port}"), Some(&identity)).unwrap();
    let mut client = AgentServiceClient::new(channel);
    // The call fails (the server is no gRPC server); the handshake before it is what counts.
    let _ = client
        .register(trainctl_proto::agent::RegisterRequest::default())
        .await;
    let (fingerprint, alpn) = server.await.unwrap();
    assert_eq!(fingerprint.as_deref(), Some(identity.fingerprint.as_str()));
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));

    // A coordinator certificate that does not name the URL's host (127.0.0.1) is refused.
    let elsewhere = ca
        .issue_server(&["coord.example.internal".to_string()])
        .unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let config =
        trainctl_tls::server_config(&elsewhere.cert_pem, &elsewhere.key_pem, ca.cert_pem())
            .unwrap();
    let acceptor = TlsAcceptor::from(config);
    let server = tokio::spawn(async move {
        let (stream, _) = tcp.accept().await.unwrap();
        acceptor.accept(stream).await.is_ok()
    });
    let channel =
        coordinator_channel(&format!("https://127.0.0.1:{port}"), Some(&identity)).unwrap();
    let result = AgentServiceClient::new(channel)
        .register(trainctl_proto::agent::RegisterRequest::default())
        .await;
    assert!(result.is_err());
    assert!(!server.await.unwrap(), "the handshake must fail");
}

#[tokio::test]
async fn a_join_goes_to_the_next_coordinator_when_one_does_not_answer() {
    trainctl_tls::install_crypto_provider();
    let ca = Arc::new(ClusterCa::generate("test CA").unwrap());
    let (url, fake) = fake_coordinator(ca.clone(), &ca).await;
    let (tmp, tls) = setup(&ca, Some(GOOD_TOKEN));
    // The first is dead (nothing listens on port 1).
    let urls = ["https://127.0.0.1:1".to_string(), url.clone()];
    let identity = ensure_any(tmp.path(), "gpu-01", &urls, &tls).await.unwrap();
    assert_eq!(identity.node_name, "gpu-01");
    assert_eq!(*fake.joins.lock().unwrap(), ["gpu-01"]);

    // Every one dead: a retryable error (the agent tries again later).
    let (tmp, tls) = setup(&ca, Some(GOOD_TOKEN));
    let dead = [
        "https://127.0.0.1:1".to_string(),
        "https://127.0.0.1:2".to_string(),
    ];
    let e = ensure_any(tmp.path(), "gpu-01", &dead, &tls)
        .await
        .unwrap_err();
    assert!(e.is_retryable(), "{e}");

    // A refusal (a bad token) is the answer: no other coordinator would say otherwise.
    let (tmp, tls) = setup(&ca, Some("tok-bad"));
    let e = ensure_any(tmp.path(), "gpu-02", &[url], &tls)
        .await
        .unwrap_err();
    assert!(
        matches!(e, IdentityError::Refused { status: 401, .. }),
        "{e}"
    );
}
