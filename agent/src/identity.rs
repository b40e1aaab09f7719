//! The agent's TLS identity: a private key that never leaves this host and a client certificate,
//! issued by the cluster CA, whose subject is this node's name.
//!
//! The first start of an agent *joins*: it makes a key and a certificate signing request and sends
//! the request with a join token to the coordinator (`POST /v1/join`), which signs it for the
//! node name. The key and certificate are kept in `<data-dir>/identity/` ([`IDENTITY_DIR`]); later
//! starts reuse them without a token and without asking the coordinator, as long as they were
//! issued for this node name by the configured CA and have not expired. A changed node name joins
//! again (and needs a token again).
//!
//! Every channel to the coordinator trusts only the cluster CA the operator gave the agent
//! ([`AgentTlsConfig::ca_cert`]), and is verified against the host or IP of the coordinator URL.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use trainctl_tls::TlsError;

/// Directory of the identity inside the agent's data dir.
pub const IDENTITY_DIR: &str = "identity";
/// The agent's certificate (PEM) in [`IDENTITY_DIR`].
pub const CERT_FILE: &str = "node.pem";
/// The agent's private key (PEM, mode 0600) in [`IDENTITY_DIR`].
pub const KEY_FILE: &str = "node.key";
/// The node name the identity was issued for, in [`IDENTITY_DIR`].
pub const NAME_FILE: &str = "node.name";
/// Path of the join endpoint on the coordinator.
pub const JOIN_PATH: &str = "/v1/join";
/// How long one join request may take.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// How an agent speaks TLS to its coordinator.
#[derive(Debug, Clone)]
pub struct AgentTlsConfig {
    /// The cluster CA certificate (PEM file): a copy of the coordinator's
    /// `<coordinator-data-dir>/tls/ca.pem`. The only certificate the agent trusts.
    pub ca_cert: PathBuf,
    /// Join token (`trainctl token create --role agent`): needed only when the agent has no
    /// identity for its node name yet.
    pub join_token: Option<String>,
}

/// An agent's identity: its certificate and key, and the CA they chain to.
#[derive(Clone)]
pub struct AgentIdentity {
    /// The node name the certificate was issued for (its subject common name).
    pub node_name: String,
    /// The agent's certificate (PEM).
    pub cert_pem: String,
    /// The agent's private key (PEM).
    pub key_pem: String,
    /// The cluster CA certificate (PEM) the agent trusts.
    pub ca_pem: String,
    /// SHA-256 fingerprint of the certificate (how the coordinator knows it).
    pub fingerprint: String,
}

impl std::fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIdentity")
            .field("node_name", &self.node_name)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Why the agent has no usable identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The agent's TLS settings do not fit together (URL scheme, CA file).
    #[error("{0}")]
    Config(String),
    /// The agent must join, and has no join token.
    #[error("{reason}: start it with --join-token (create one with `trainctl token create --role agent`)")]
    NeedsJoinToken {
        /// Why the stored identity (if any) cannot be used.
        reason: String,
    },
    /// The coordinator answered the join with an error; `message` is its own words.
    #[error("the coordinator refused to let node `{node}` join (HTTP {status}): {message}")]
    Refused {
        /// The node name the agent asked for.
        node: String,
        /// The HTTP status.
        status: u16,
        /// The coordinator's error message, verbatim.
        message: String,
    },
    /// The TLS handshake with the coordinator failed: a configuration problem, not a transient one.
    #[error("TLS with the coordinator at {url} failed: {message} (is the CA file the coordinator's `<data-dir>/tls/ca.pem`, and is the URL's host one of the names in the coordinator's certificate?)")]
    Handshake {
        /// The coordinator URL.
        url: String,
        /// What rustls reported.
        message: String,
    },
    /// The coordinator could not be reached (retryable).
    #[error("could not reach the coordinator at {url} to join: {message}")]
    Unreachable {
        /// The coordinator URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The coordinator's answer is not what the join contract promises.
    #[error("the coordinator's answer to the join: {0}")]
    BadAnswer(String),
    /// A file of the identity could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A certificate, key or TLS configuration error.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl IdentityError {
    /// Whether trying again later may succeed (the coordinator was unreachable or failed
    /// internally). Other errors need the operator.
    pub fn is_retryable(&self) -> bool {
        match self {
            IdentityError::Unreachable { .. } => true,
            IdentityError::Refused { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError {
    let path = path.to_path_buf();
    move |source| IdentityError::Io { path, source }
}

/// Checks that the coordinator URL's scheme matches the TLS setting: `https://` with TLS,
/// `http://` without.
pub fn check_url_scheme(coordinator_url: &str, tls: bool) -> Result<(), IdentityError> {
    let scheme = coordinator_url
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase());
    match (scheme.as_deref(), tls) {
        (Some("https"), true) | (Some("http"), false) => Ok(()),
        (Some("http"), true) => Err(IdentityError::Config(format!(
            "the coordinator URL `{coordinator_url}` is plain http://, but the agent was given a \
             cluster CA (--ca-cert), so it speaks TLS: use https://{}",
            strip_scheme(coordinator_url)
        ))),
        (Some("https"), false) => Err(IdentityError::Config(format!(
            "the coordinator URL `{coordinator_url}` is https://, but the agent has no cluster CA \
             to trust: give it --ca-cert (a copy of the coordinator's `<data-dir>/tls/ca.pem`)"
        ))),
        _ => Err(IdentityError::Config(format!(
            "the coordinator URL `{coordinator_url}` must start with {}",
            if tls { "https://" } else { "http://" }
        ))),
    }
}

fn strip_scheme(url: &str) -> &str {
    url.split_once("://").map_or(url, |(_, rest)| rest)
}

/// Reads the cluster CA file and checks it holds a certificate.
pub fn read_ca(tls: &AgentTlsConfig) -> Result<String, IdentityError> {
    let ca_pem = fs::read_to_string(&tls.ca_cert).map_err(|e| {
        IdentityError::Config(format!(
            "read the cluster CA {} (a copy of the coordinator's `<data-dir>/tls/ca.pem`): {e}",
            tls.ca_cert.display()
        ))
    })?;
    trainctl_tls::fingerprint_pem(&ca_pem).map_err(|e| {
        IdentityError::Config(format!("the cluster CA {}: {e}", tls.ca_cert.display()))
    })?;
    Ok(ca_pem)
}

/// What the agent has on disk for `node_name`.
#[derive(Debug)]
pub enum Stored {
    /// A usable identity: reuse it without contacting the coordinator.
    Reuse(AgentIdentity),
    /// None usable: the agent must join; `reason` says why.
    Join {
        /// Why (no identity yet, another node name, expired, another CA...).
        reason: String,
    },
}

/// Decides whether the identity in `dir` can be reused for `node_name` under the CA `ca_pem`:
/// the key, certificate and name files are present, the name is `node_name`, the certificate's
/// subject is `node_name`, it chains to `ca_pem`, is valid now, and the key is its key.
pub fn load_stored(dir: &Path, node_name: &str, ca_pem: &str) -> Stored {
    let join = |reason: String| Stored::Join { reason };
    let read = |file: &str| fs::read_to_string(dir.join(file));
    let (cert_pem, key_pem, name) = match (read(CERT_FILE), read(KEY_FILE), read(NAME_FILE)) {
        (Ok(c), Ok(k), Ok(n)) => (c, k, n.trim().to_string()),
        (Err(_), Err(_), _) => return join("this agent has no identity yet".into()),
        (c, k, n) => {
            let missing: Vec<&str> = [
                (CERT_FILE, c.is_err()),
                (KEY_FILE, k.is_err()),
                (NAME_FILE, n.is_err()),
            ]
            .into_iter()
            .filter_map(|(f, bad)| bad.then_some(f))
            .collect();
            return join(format!(
                "this agent's identity in {} is incomplete (cannot read {})",
                dir.display(),
                missing.join(", ")
            ));
        }
    };
    if name != node_name {
        return join(format!(
            "this agent's identity was issued for node `{name}`, not `{node_name}`"
        ));
    }
    match trainctl_tls::common_name_pem(&cert_pem) {
        Ok(Some(cn)) if cn == node_name => {}
        Ok(cn) => {
            return join(format!(
                "this agent's certificate names node `{}`, not `{node_name}`",
                cn.unwrap_or_default()
            ))
        }
        Err(e) => return join(format!("this agent's certificate is unreadable ({e})")),
    }
    if let Err(e) = trainctl_tls::verify_client_certificate(&cert_pem, ca_pem) {
        return join(format!(
            "this agent's certificate is not valid under the cluster CA ({e})"
        ));
    }
    // The key must be the certificate's (a join interrupted between writes leaves a new key).
    if let Err(e) = trainctl_tls::client_config(ca_pem, Some((&cert_pem, &key_pem))) {
        return join(format!(
            "this agent's key does not go with its certificate ({e})"
        ));
    }
    let fingerprint = match trainctl_tls::fingerprint_pem(&cert_pem) {
        Ok(f) => f,
        Err(e) => return join(format!("this agent's certificate is unreadable ({e})")),
    };
    Stored::Reuse(AgentIdentity {
        node_name: node_name.to_string(),
        cert_pem,
        key_pem,
        ca_pem: ca_pem.to_string(),
        fingerprint,
    })
}

/// Stores an identity in `dir` (created 0700): key (0600), certificate, then the name.
pub fn store(dir: &Path, identity: &AgentIdentity) -> Result<(), IdentityError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    for (file, contents) in [
        (KEY_FILE, &identity.key_pem),
        (CERT_FILE, &identity.cert_pem),
        (NAME_FILE, &format!("{}\n", identity.node_name)),
    ] {
        let path = dir.join(file);
        trainctl_tls::write_private_file(&path, contents.as_bytes()).map_err(io_err(&path))?;
    }
    Ok(())
}

/// Body of `POST /v1/join`.
#[derive(Debug, Serialize)]
struct JoinRequest<'a> {
    token: &'a str,
    node: &'a str,
    csr_pem: &'a str,
}

/// Answer of a successful join.
#[derive(Debug, Deserialize)]
struct JoinAnswer {
    cert_pem: String,
    /// The coordinator's CA. The agent keeps trusting the CA file its operator gave it; a
    /// different one here is only worth a warning.
    ca_pem: String,
}

/// An error answer of the coordinator.
#[derive(Debug, Deserialize)]
struct ErrorAnswer {
    error: String,
}

/// The agent's identity for `node_name`: the stored one when usable (see [`load_stored`]),
/// otherwise a new one obtained by joining the coordinator with `tls.join_token`.
pub async fn ensure(
    data_dir: &Path,
    node_name: &str,
    coordinator_url: &str,
    tls: &AgentTlsConfig,
) -> Result<AgentIdentity, IdentityError> {
    ensure_any(data_dir, node_name, &[coordinator_url.to_string()], tls).await
}

/// [`ensure`] for a cluster of several coordinators: the stored identity when usable, otherwise a
/// join sent to each of `coordinator_urls` in turn until one answers it (any coordinator passes a
/// join on to the leader). One that cannot be reached, fails internally or fails the TLS handshake
/// gives way to the next; a refusal (a bad token, a bad name) ends the join. When every one failed,
/// the error is retryable if any failure was.
pub async fn ensure_any(
    data_dir: &Path,
    node_name: &str,
    coordinator_urls: &[String],
    tls: &AgentTlsConfig,
) -> Result<AgentIdentity, IdentityError> {
    if coordinator_urls.is_empty() {
        return Err(IdentityError::Config(
            "no coordinator to join: give at least one with --coordinator".into(),
        ));
    }
    for url in coordinator_urls {
        check_url_scheme(url, true)?;
    }
    let ca_pem = read_ca(tls)?;
    let dir = data_dir.join(IDENTITY_DIR);
    let reason = match load_stored(&dir, node_name, &ca_pem) {
        Stored::Reuse(identity) => {
            tracing::info!(node = node_name, fingerprint = %identity.fingerprint, "using this agent's stored identity");
            return Ok(identity);
        }
        Stored::Join { reason } => reason,
    };
    let Some(token) = tls.join_token.as_deref().filter(|t| !t.trim().is_empty()) else {
        return Err(IdentityError::NeedsJoinToken { reason });
    };
    tracing::info!(node = node_name, %reason, "joining the cluster");
    let mut retryable: Option<IdentityError> = None;
    let mut last: Option<IdentityError> = None;
    for url in coordinator_urls {
        match join(url, node_name, token.trim(), &ca_pem).await {
            Ok(identity) => {
                store(&dir, &identity)?;
                tracing::info!(node = node_name, coordinator = %url, fingerprint = %identity.fingerprint, "joined the cluster; identity stored");
                return Ok(identity);
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(coordinator = %url, error = %e, "could not join through this coordinator; trying the next");
                retryable = Some(e);
            }
            // One member's certificate may be at fault; the others may still answer.
            Err(e @ IdentityError::Handshake { .. }) if coordinator_urls.len() > 1 => {
                tracing::warn!(coordinator = %url, error = %e, "could not join through this coordinator; trying the next");
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(retryable
        .or(last)
        .expect("at least one coordinator was tried"))
}

/// `POST {coordinator_url}/v1/join` with a fresh key's CSR; checks and returns the identity.
async fn join(
    coordinator_url: &str,
    node_name: &str,
    token: &str,
    ca_pem: &str,
) -> Result<AgentIdentity, IdentityError> {
    let (key_pem, csr_pem) = trainctl_tls::generate_csr(node_name)?;
    let client = http_client(ca_pem, None)?;
    let url = format!("{}{JOIN_PATH}", coordinator_url.trim_end_matches('/'));
    let response = client
        .post(&url)
        .json(&JoinRequest {
            token,
            node: node_name,
            csr_pem: &csr_pem,
        })
        .send()
        .await
        .map_err(|e| request_error(coordinator_url, &e))?;
    let status = response.status();
    let body = response
        .text()
        .await
        .map_err(|e| request_error(coordinator_url, &e))?;
    if !status.is_success() {
        let message = serde_json::from_str::<ErrorAnswer>(&body)
            .map(|a| a.error)
            .unwrap_or_else(|_| truncate(&body, 500));
        return Err(IdentityError::Refused {
            node: node_name.to_string(),
            status: status.as_u16(),
            message,
        });
    }
    let answer: JoinAnswer = serde_json::from_str(&body)
        .map_err(|e| IdentityError::BadAnswer(format!("{e}: {}", truncate(&body, 200))))?;
    let cert_pem = answer.cert_pem;
    if trainctl_tls::fingerprint_pem(&answer.ca_pem).ok()
        != trainctl_tls::fingerprint_pem(ca_pem).ok()
    {
        tracing::warn!("the coordinator sent a cluster CA that differs from the agent's CA file; the agent keeps trusting its file");
    }
    match trainctl_tls::common_name_pem(&cert_pem)? {
        Some(cn) if cn == node_name => {}
        cn => {
            return Err(IdentityError::BadAnswer(format!(
                "the certificate names `{}`, not `{node_name}`",
                cn.unwrap_or_default()
            )))
        }
    }
    trainctl_tls::verify_client_certificate(&cert_pem, ca_pem).map_err(|e| {
        IdentityError::BadAnswer(format!(
            "the certificate is not a valid client certificate of the cluster CA: {e}"
        ))
    })?;
    trainctl_tls::client_config(ca_pem, Some((&cert_pem, &key_pem))).map_err(|e| {
        IdentityError::BadAnswer(format!("the certificate is not for this agent's key: {e}"))
    })?;
    let fingerprint = trainctl_tls::fingerprint_pem(&cert_pem)?;
    Ok(AgentIdentity {
        node_name: node_name.to_string(),
        cert_pem,
        key_pem,
        ca_pem: ca_pem.to_string(),
        fingerprint,
    })
}

fn truncate(s: &str, max: usize) -> String {
    let s = s.trim();
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// A reqwest client that trusts only `ca_pem` and presents `identity` when given: for every HTTP
/// call the agent makes to the coordinator.
pub fn http_client(
    ca_pem: &str,
    identity: Option<&AgentIdentity>,
) -> Result<reqwest::Client, IdentityError> {
    let config = trainctl_tls::client_config(
        ca_pem,
        identity.map(|i| (i.cert_pem.as_str(), i.key_pem.as_str())),
    )?;
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .connect_timeout(Duration::from_secs(5))
        .timeout(JOIN_TIMEOUT)
        .build()
        .map_err(|e| IdentityError::Config(format!("build the HTTP client: {}", chain(&e))))
}

/// A request failure: a TLS handshake failure is final, anything else is "unreachable".
fn request_error(url: &str, e: &reqwest::Error) -> IdentityError {
    match rustls_error(e) {
        Some(tls) => IdentityError::Handshake {
            url: url.to_string(),
            message: tls.to_string(),
        },
        None => IdentityError::Unreachable {
            url: url.to_string(),
            message: chain(e),
        },
    }
}

/// The rustls error among `e`'s causes. `io::Error::source` skips the error it wraps, so wrapped
/// errors are followed through `get_ref`.
fn rustls_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a trainctl_tls::rustls::Error> {
    if let Some(tls) = e.downcast_ref::<trainctl_tls::rustls::Error>() {
        return Some(tls);
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        if let Some(tls) = rustls_error(inner) {
            return Some(tls);
        }
    }
    rustls_error(e.source()?)
}

/// An error and its causes, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The gRPC channel to the coordinator, connected lazily: plain when `identity` is `None`,
/// otherwise TLS trusting only the identity's CA, presenting its certificate, and verifying the
/// coordinator's certificate against the host (DNS name or IP address) of `coordinator_url`.
pub fn coordinator_channel(
    coordinator_url: &str,
    identity: Option<&AgentIdentity>,
) -> anyhow::Result<Channel> {
    use anyhow::Context;
    let mut endpoint = Channel::from_shared(coordinator_url.to_string())
        .with_context(|| format!("coordinator URL `{coordinator_url}`"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10));
    if let Some(id) = identity {
        // No `domain_name`: tonic verifies the server against the URL's host, brackets removed.
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&id.ca_pem))
            .identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
        endpoint = endpoint
            .tls_config(tls)
            .with_context(|| format!("TLS for the coordinator URL `{coordinator_url}`"))?;
    }
    Ok(endpoint.connect_lazy())
}

#[cfg(test)]
mod tests;
