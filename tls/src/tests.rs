use std::io;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;

/// What the server saw of a handshake: the client's fingerprint and common name, if any.
type ServerView = io::Result<(Option<String>, Option<String>)>;

/// One real handshake over loopback: the server accepts, records the client's certificate and
/// writes `ok`; the client connects to `server_name` and reads it.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: rustls::ClientConfig,
    server_name: &str,
) -> (ServerView, io::Result<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server);
    let server_side = async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let conn = tls.get_ref().1;
        let seen = (peer_fingerprint(conn), peer_common_name(conn));
        tls.write_all(b"ok").await?;
        tls.shutdown().await?;
        Ok(seen)
    };
    let connector = TlsConnector::from(Arc::new(client));
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    let client_side = async move {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = connector.connect(name, tcp).await?;
        let mut buf = String::new();
        tls.read_to_string(&mut buf).await?;
        Ok(buf)
    };
    tokio::join!(server_side, client_side)
}

fn server_for(ca: &ClusterCa, names: &[&str]) -> Arc<rustls::ServerConfig> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let leaf = ca.issue_server(&names).unwrap();
    server_config(&leaf.cert_pem, &leaf.key_pem, ca.cert_pem()).unwrap()
}

#[tokio::test]
async fn client_with_csr_certificate_is_seen_with_its_fingerprint() {
    let ca = ClusterCa::generate("test CA").unwrap();
    let (key_pem, csr_pem) = generate_csr("gpu-01").unwrap();
    let cert_pem = ca.sign_csr(&csr_pem, "gpu-01", 30).unwrap();
    let client = client_config(ca.cert_pem(), Some((&cert_pem, &key_pem))).unwrap();
    let (server, client) = handshake(server_for(&ca, &["127.0.0.1"]), client, "127.0.0.1").await;
    let (fingerprint, cn) = server.unwrap();
    assert_eq!(client.unwrap(), "ok");
    let expected = fingerprint_pem(&cert_pem).unwrap();
    assert_eq!(expected.len(), 64);
    assert!(expected
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    assert_eq!(fingerprint.as_deref(), Some(expected.as_str()));
    assert_eq!(cn.as_deref(), Some("gpu-01"));
}

#[tokio::test]
async fn client_without_certificate_connects_anonymously() {
    let ca = ClusterCa::generate("test CA").unwrap();
    let client = client_config(ca.cert_pem(), None).unwrap();
    let (server, client) = handshake(server_for(&ca, &["127.0.0.1"]), client, "127.0.0.1").await;
    assert_eq!(server.unwrap(), (None, None));
    assert_eq!(client.unwrap(), "ok");
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    let ca = ClusterCa::generate("test CA").unwrap();
    let other = ClusterCa::generate("another CA").unwrap();
    let stranger = other.issue_client("gpu-01", 30).unwrap();
    let client =
        client_config(ca.cert_pem(), Some((&stranger.cert_pem, &stranger.key_pem))).unwrap();
    let (server, client) = handshake(server_for(&ca, &["127.0.0.1"]), client, "127.0.0.1").await;
    let err = server.unwrap_err();
    assert!(err.to_string().to_lowercase().contains("cert"), "{err}");
    assert!(
        client.is_err(),
        "the client must not read past a refused handshake"
    );
}

#[tokio::test]
async fn server_certificate_used_as_client_identity_is_accepted() {
    // Coordinators call each other with their server certificate (EKU serverAuth + clientAuth).
    let ca = ClusterCa::generate("test CA").unwrap();
    let peer = ca.issue_server(&["10.0.0.2".to_string()]).unwrap();
    let client = client_config(ca.cert_pem(), Some((&peer.cert_pem, &peer.key_pem))).unwrap();
    let (server, client) = handshake(server_for(&ca, &["127.0.0.1"]), client, "127.0.0.1").await;
    assert_eq!(
        server.unwrap().0,
        Some(fingerprint_pem(&peer.cert_pem).unwrap())
    );
    assert_eq!(client.unwrap(), "ok");
}

#[tokio::test]
async fn client_that_does_not_trust_the_servers_ca_fails() {
    let ca = ClusterCa::generate("test CA").unwrap();
    let other = ClusterCa::generate("another CA").unwrap();
    let client = client_config(other.cert_pem(), None).unwrap();
    let (server, client) = handshake(server_for(&ca, &["127.0.0.1"]), client, "127.0.0.1").await;
    let err = client.unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    assert!(server.is_err());
}

#[tokio::test]
async fn server_certificate_validates_for_ip_and_dns_names() {
    let ca = ClusterCa::generate("test CA").unwrap();
    let server = server_for(&ca, &["127.0.0.1", "coord.example.internal"]);
    for name in ["127.0.0.1", "coord.example.internal"] {
        let client = client_config(ca.cert_pem(), None).unwrap();
        let (s, c) = handshake(server.clone(), client, name).await;
        assert_eq!(c.unwrap(), "ok", "{name}");
        s.unwrap();
    }
    // A name the certificate does not carry is refused.
    let client = client_config(ca.cert_pem(), None).unwrap();
    let (_, c) = handshake(server, client, "other.example.internal").await;
    let err = c.unwrap_err();
    assert!(err.to_string().contains("not valid for name"), "{err}");
}

#[test]
fn csr_requested_common_name_is_overridden() {
    let ca = ClusterCa::generate("test CA").unwrap();
    let (_key, csr_pem) = generate_csr("coordinator").unwrap();
    let cert_pem = ca.sign_csr(&csr_pem, "gpu-07", 1).unwrap();
    assert_eq!(
        common_name_pem(&cert_pem).unwrap().as_deref(),
        Some("gpu-07")
    );
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    let eku = x509.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && !eku.any);
    assert!(!x509.is_ca());
    let days =
        (x509.validity().not_after.timestamp() - x509.validity().not_before.timestamp()) / 86_400;
    assert_eq!(days, 1, "1 day plus the clock-skew hour");
}

#[test]
fn a_tampered_csr_is_rejected() {
    let ca = ClusterCa::generate("test CA").unwrap();
    assert!(matches!(
        ca.sign_csr("not a csr", "gpu-01", 1),
        Err(TlsError::InvalidCsr(_))
    ));
    let (_key, csr_pem) = generate_csr("gpu-01").unwrap();
    assert!(ca.sign_csr(&csr_pem, "", 1).is_err());
    assert!(ca.sign_csr(&csr_pem, "gpu-01", 0).is_err());
}

#[test]
fn generated_ca_is_a_ca() {
    let ca = ClusterCa::generate("test CA").unwrap();
    let der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert!(x509.is_ca());
    let ku = x509.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    let years = (x509.validity().not_after.timestamp() - x509.validity().not_before.timestamp())
        / (365 * 86_400);
    assert_eq!(years, 10);
    assert_eq!(
        common_name_pem(ca.cert_pem()).unwrap().as_deref(),
        Some("test CA")
    );
}

#[test]
fn from_pem_round_trips_and_rejects_a_foreign_key() {
    let ca = ClusterCa::generate("test CA").unwrap();
    let again = ClusterCa::from_pem(ca.cert_pem(), &ca.key_pem).unwrap();
    // The reloaded CA issues certificates clients of the original trust.
    let leaf = again.issue_client("gpu-01", 1).unwrap();
    let der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
    let anchors = roots(ca.cert_pem(), "ca").unwrap();
    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(
        x509.issuer().to_string(),
        x509_parser::parse_x509_certificate(
            &CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap()
        )
        .unwrap()
        .1
        .subject()
        .to_string()
    );
    assert_eq!(anchors.len(), 1);

    let other = ClusterCa::generate("other").unwrap();
    assert!(matches!(
        ClusterCa::from_pem(ca.cert_pem(), &other.key_pem),
        Err(TlsError::InvalidCa(_))
    ));
    // A leaf is not a CA.
    let leaf = ca.issue_server(&["127.0.0.1".into()]).unwrap();
    assert!(matches!(
        ClusterCa::from_pem(&leaf.cert_pem, &leaf.key_pem),
        Err(TlsError::InvalidCa(_))
    ));
}

#[test]
fn load_or_create_is_stable_and_private() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tls");
    let first = ClusterCa::load_or_create(&dir).unwrap();
    let second = ClusterCa::load_or_create(&dir).unwrap();
    assert_eq!(first.cert_pem(), second.cert_pem());
    assert_eq!(first.fingerprint(), second.fingerprint());
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600);
    assert_eq!(mode(&dir), 0o700);
    // The loaded CA signs with the same key: a certificate from it verifies under the first.
    let leaf = second.issue_server(&["127.0.0.1".into()]).unwrap();
    server_config(&leaf.cert_pem, &leaf.key_pem, first.cert_pem()).unwrap();
}

#[test]
fn load_or_create_names_the_file_at_fault() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ClusterCa::load_or_create(dir).unwrap();
    fs::remove_file(dir.join(CA_KEY_FILE)).unwrap();
    let err = ClusterCa::load_or_create(dir).unwrap_err().to_string();
    assert!(err.contains("ca.key") && err.contains("missing"), "{err}");

    fs::remove_file(dir.join(CA_CERT_FILE)).unwrap();
    ClusterCa::load_or_create(dir).unwrap();
    fs::write(dir.join(CA_CERT_FILE), "garbage").unwrap();
    let err = ClusterCa::load_or_create(dir).unwrap_err().to_string();
    assert!(err.contains("ca.pem"), "{err}");

    fs::remove_file(dir.join(CA_CERT_FILE)).unwrap();
    let err = ClusterCa::load_or_create(dir).unwrap_err().to_string();
    assert!(err.contains("ca.pem") && err.contains("missing"), "{err}");
    fs::write(dir.join(CA_CERT_FILE), first_ca_pem()).unwrap();
    fs::write(dir.join(CA_KEY_FILE), "garbage").unwrap();
    let err = ClusterCa::load_or_create(dir).unwrap_err().to_string();
    assert!(err.contains("ca.key"), "{err}");
}

fn first_ca_pem() -> String {
    ClusterCa::generate("x").unwrap().cert_pem().to_string()
}

#[test]
fn write_private_file_is_0600_and_replaces() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("node.key");
    fs::write(&path, "old").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    write_private_file(&path, b"secret").unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "secret");
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // No temporary file is left behind.
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn fingerprint_is_sha256_hex() {
    assert_eq!(
        fingerprint_der(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert!(fingerprint_pem("no pem here").is_err());
}

#[test]
fn configs_reject_bad_input() {
    let ca = ClusterCa::generate("test CA").unwrap();
    let leaf = ca.issue_server(&["127.0.0.1".into()]).unwrap();
    let other = ca.issue_server(&["127.0.0.1".into()]).unwrap();
    // A key that is not the certificate's.
    assert!(server_config(&leaf.cert_pem, &other.key_pem, ca.cert_pem()).is_err());
    assert!(client_config("", None).is_err());
    assert!(server_config(&leaf.cert_pem, &leaf.key_pem, "").is_err());
    assert!(ca.issue_server(&[]).is_err());
    let cfg = client_config(ca.cert_pem(), None).unwrap();
    assert_eq!(
        cfg.alpn_protocols,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    );
}

#[test]
fn install_crypto_provider_is_idempotent() {
    install_crypto_provider();
    install_crypto_provider();
    assert!(CryptoProvider::get_default().is_some());
}

#[test]
fn verify_client_certificate_checks_chain_and_usage() {
    let ca = ClusterCa::generate("test CA").unwrap();
    let other = ClusterCa::generate("another CA").unwrap();
    let mine = ca.issue_client("gpu-01", 2).unwrap();
    verify_client_certificate(&mine.cert_pem, ca.cert_pem()).unwrap();
    assert!(verify_client_certificate(&mine.cert_pem, other.cert_pem()).is_err());
    // A server certificate also carries clientAuth (coordinators call each other).
    let server = ca.issue_server(&["127.0.0.1".into()]).unwrap();
    verify_client_certificate(&server.cert_pem, ca.cert_pem()).unwrap();
    let left = not_after_pem(&mine.cert_pem)
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left > Duration::from_secs(86_400) && left <= Duration::from_secs(2 * 86_400));
}
