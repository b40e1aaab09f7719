//! A small client of the coordinator's REST API, used by every CLI command.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::de::DeserializeOwned;
use trainctl_coordinator::api::access::{AuditView, CreatedToken, TokenView, WhoAmI};
use trainctl_coordinator::api::cluster::ClusterView;
use trainctl_coordinator::api::{
    CheckpointView, ErrorBody, JobDetail, JobSummary, LogsPage, NodeView, SubmitResponse,
};
use trainctl_jobs::JobSpec;

use trainctl_coordinator::membership::error_chain;

use crate::context::Connection;

/// A REST client of a cluster's coordinators: any of them answers (a follower forwards to the
/// leader), so a request goes to the one that answered last, and to the next when it can not
/// be reached.
pub struct Client {
    bases: Vec<String>,
    /// Index into `bases` of the coordinator to ask first.
    current: std::sync::atomic::AtomicUsize,
    http: reqwest::Client,
}

impl Client {
    /// A client of the coordinator `connection` names, with its token and CA.
    pub fn new(connection: &Connection) -> anyhow::Result<Self> {
        let bases: Vec<String> = connection
            .server
            .split(',')
            .map(|b| b.trim().trim_end_matches('/').to_string())
            .filter(|b| !b.is_empty())
            .collect();
        if bases.is_empty() {
            bail!("no coordinator address given (--addr, TRAINCTL_ADDR or a context)");
        }
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5));
        if let Some(token) = &connection.token {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .context("the token has characters a header can not carry")?;
            value.set_sensitive(true);
            let headers =
                reqwest::header::HeaderMap::from_iter([(reqwest::header::AUTHORIZATION, value)]);
            builder = builder.default_headers(headers);
        }
        if let Some(ca) = &connection.ca_pem {
            trainctl_tls::install_crypto_provider();
            let tls = trainctl_tls::client_config(ca, None).context(
                "the CA certificate (--ca-cert, TRAINCTL_CA_CERT or the context's ca_cert)",
            )?;
            builder = builder.tls_backend_preconfigured(tls);
        }
        let http = builder.build().context("build HTTP client")?;
        Ok(Client {
            bases,
            current: Default::default(),
            http,
        })
    }

    /// The coordinator asked first now.
    fn base(&self) -> &str {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        &self.bases[i % self.bases.len()]
    }

    /// Sends the request `build` makes for a coordinator's base URL: to the current coordinator,
    /// then, while a coordinator can not be reached, to the next ones (each once).
    ///
    /// A read (GET) answered 502/503/504 (an election, leadership moving while it was answered)
    /// is sent again with backoff for up to [`READ_RETRY_WINDOW`]: reads change nothing, so the
    /// CLI rides out a leader change instead of printing "retry". Writes are not retried here
    /// (`submit` retries with its idempotency key).
    async fn send(
        &self,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let deadline = tokio::time::Instant::now() + READ_RETRY_WINDOW;
        let mut delay = READ_RETRY_FIRST_DELAY;
        loop {
            let (is_read, response) = self.send_once(&build).await;
            let transient = matches!(&response, Ok(r) if retry_read(is_read, r.status().as_u16()));
            if !transient || tokio::time::Instant::now() + delay >= deadline {
                return response;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(READ_RETRY_MAX_DELAY);
        }
    }

    /// One round of [`Client::send`]: the current coordinator, then the next ones while
    /// unreachable or not processing. Also says whether the request was a read (GET).
    async fn send_once(
        &self,
        build: &impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> (bool, Result<reqwest::Response, reqwest::Error>) {
        let mut is_read = false;
        let mut execute = |base: &str| {
            let request = build(base).build();
            if let Ok(r) = &request {
                is_read = r.method() == reqwest::Method::GET;
            }
            async move { self.http.execute(request?).await }
        };
        let first = self.current.load(std::sync::atomic::Ordering::Relaxed);
        let mut last = None;
        for step in 0..self.bases.len() {
            let i = (first + step) % self.bases.len();
            let more = step + 1 < self.bases.len();
            match execute(&self.bases[i]).await {
                Err(e) if e.is_connect() && more => last = Some(e),
                // This coordinator did not process the request at all (it knows no leader, or can
                // not reach it): another one may.
                Ok(r)
                    if more
                        && r.headers()
                            .contains_key(trainctl_coordinator::forward::TRY_ELSEWHERE_HEADER) => {}
                result => {
                    self.current.store(i, std::sync::atomic::Ordering::Relaxed);
                    return (is_read, result);
                }
            }
        }
        let result = match last {
            Some(e) => Err(e),
            // Every coordinator but the last said "not here" and the last was reached: unreachable
            // in practice (the last one's answer is returned above).
            None => execute(self.base()).await,
        };
        (is_read, result)
    }

    async fn check<T: DeserializeOwned>(
        &self,
        response: Result<reqwest::Response, reqwest::Error>,
    ) -> anyhow::Result<T> {
        let body = self.check_bytes(response).await?;
        serde_json::from_slice(&body).context("unexpected reply from the coordinator")
    }

    /// The body of a successful reply; an error status becomes the coordinator's `{"error"}` message.
    async fn check_bytes(
        &self,
        response: Result<reqwest::Response, reqwest::Error>,
    ) -> anyhow::Result<Vec<u8>> {
        let response = response.map_err(|e| {
            let chain = error_chain(&e);
            if chain.contains("certificate") || chain.contains("InvalidCertificate") {
                anyhow!(
                    "the TLS certificate of {} is not trusted ({chain}): give the cluster's CA with \
                     --ca-cert or TRAINCTL_CA_CERT (the coordinator's <data-dir>/tls/ca.pem)",
                    self.base()
                )
            } else if chain.contains("wrong version number") || chain.contains("InvalidContentType") || chain.contains("corrupt message") {
                anyhow!(
                    "{} does not speak TLS (a coordinator started with --insecure?): use an http:// address",
                    self.base()
                )
            } else if e.is_connect() || e.is_timeout() {
                anyhow!(
                    "cannot reach the coordinator at {} ({chain}): is it running? Start a local one with `trainctl dev`, \
                     or point the CLI at yours with --addr or TRAINCTL_ADDR",
                    self.base()
                )
            } else {
                anyhow!("request to {} failed: {e}", self.base())
            }
        })?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .context("read the coordinator's reply")?;
        let body = body.to_vec();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            bail!("{message}");
        }
        Ok(body)
    }

    /// Submits a job spec with the idempotency key `key`; returns its id. With `resume_from`, the
    /// job starts from that job's newest committed checkpoint.
    ///
    /// A connection error, a timeout, or a 502/503/504 (no leader yet, a leader change) is retried
    /// with the same key, with backoff, for up to [`SUBMIT_RETRY_WINDOW`]: the coordinator makes
    /// one job however many of the attempts reached it. `on_retry` hears why each retry happens.
    pub async fn submit(
        &self,
        spec: &JobSpec,
        resume_from: Option<&str>,
        key: &str,
        mut on_retry: impl FnMut(&str, Duration),
    ) -> anyhow::Result<String> {
        let mut path = "/v1/jobs".to_string();
        if let Some(other) = resume_from {
            path.push_str(&format!("?resume_from={}", enc(other)));
        }
        let deadline = tokio::time::Instant::now() + SUBMIT_RETRY_WINDOW;
        let mut delay = SUBMIT_RETRY_FIRST_DELAY;
        loop {
            let response = self
                .send(|base| {
                    self.http
                        .post(format!("{base}{path}"))
                        .header("Idempotency-Key", key)
                        .timeout(SUBMIT_ATTEMPT_TIMEOUT)
                        .json(spec)
                })
                .await;
            let transient = match &response {
                Err(e) => retryable(e).then(|| error_chain(e)),
                Ok(r) => matches!(r.status().as_u16(), 502..=504).then(|| r.status().to_string()),
            };
            let now = tokio::time::Instant::now();
            match transient {
                Some(why) if now + delay < deadline => {
                    on_retry(&why, delay);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(SUBMIT_RETRY_MAX_DELAY);
                }
                _ => {
                    let r: SubmitResponse = self.check(response).await?;
                    return Ok(r.id);
                }
            }
        }
    }

    /// Lists jobs.
    pub async fn list(&self) -> anyhow::Result<Vec<JobSummary>> {
        self.check(
            self.send(|base| self.http.get(format!("{}/v1/jobs", base)))
                .await,
        )
        .await
    }

    /// One job in full.
    pub async fn job(&self, id: &str) -> anyhow::Result<JobDetail> {
        self.check(
            self.send(|base| self.http.get(format!("{}/v1/jobs/{}", base, enc(id))))
                .await,
        )
        .await
    }

    /// One job in full, as the coordinator sent it (for `-o json`: nothing is dropped).
    pub async fn job_json(&self, id: &str) -> anyhow::Result<serde_json::Value> {
        self.check(
            self.send(|base| self.http.get(format!("{}/v1/jobs/{}", base, enc(id))))
                .await,
        )
        .await
    }

    /// A job's committed checkpoints, oldest first.
    pub async fn checkpoints(&self, id: &str) -> anyhow::Result<Vec<CheckpointView>> {
        self.check(
            self.send(|base| {
                self.http
                    .get(format!("{}/v1/jobs/{}/checkpoints", base, enc(id)))
            })
            .await,
        )
        .await
    }

    /// Cancels a job; with `checkpoint`, its ranks first get the checkpoint signal and the
    /// coordinator waits up to the job's grace for a new commit.
    pub async fn cancel(&self, id: &str, checkpoint: bool) -> anyhow::Result<JobDetail> {
        let mut path = format!("/v1/jobs/{}/cancel", enc(id));
        if checkpoint {
            path.push_str("?checkpoint=true");
        }
        // Waiting for the checkpoint may take up to the job's grace (at most an hour).
        let timeout = if checkpoint {
            Duration::from_secs(3700)
        } else {
            Duration::from_secs(30)
        };
        self.check(
            self.send(|base| self.http.post(format!("{base}{path}")).timeout(timeout))
                .await,
        )
        .await
    }

    /// A page of a job's output after `cursor`.
    pub async fn logs(
        &self,
        id: &str,
        rank: Option<u32>,
        attempt: Option<u32>,
        cursor: &str,
    ) -> anyhow::Result<LogsPage> {
        let mut path = format!("/v1/jobs/{}/logs?cursor={}", enc(id), enc(cursor));
        if let Some(r) = rank {
            path.push_str(&format!("&rank={r}"));
        }
        if let Some(a) = attempt {
            path.push_str(&format!("&attempt={a}"));
        }
        self.check(
            self.send(|base| self.http.get(format!("{base}{path}")))
                .await,
        )
        .await
    }

    /// The cluster's nodes.
    pub async fn nodes(&self) -> anyhow::Result<Vec<NodeView>> {
        self.check(
            self.send(|base| self.http.get(format!("{}/v1/nodes", base)))
                .await,
        )
        .await
    }

    /// Drains (`drained`) or undrains a node; returns it as it is now.
    pub async fn set_drained(&self, name: &str, drained: bool) -> anyhow::Result<NodeView> {
        let action = if drained { "drain" } else { "undrain" };
        // Draining waits for each job there to checkpoint, up to its grace.
        self.check(
            self.send(|base| {
                self.http
                    .post(format!("{}/v1/nodes/{}/{action}", base, enc(name)))
                    .timeout(Duration::from_secs(3700))
            })
            .await,
        )
        .await
    }

    /// Removes a node for good.
    pub async fn remove_node(&self, name: &str) -> anyhow::Result<()> {
        self.check_bytes(
            self.send(|base| self.http.delete(format!("{}/v1/nodes/{}", base, enc(name))))
                .await,
        )
        .await?;
        Ok(())
    }
}

/// How long `submit` keeps retrying a submission that did not get an answer.
pub const SUBMIT_RETRY_WINDOW: Duration = Duration::from_secs(30);
/// How long one attempt of a submission may take.
const SUBMIT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const SUBMIT_RETRY_FIRST_DELAY: Duration = Duration::from_millis(250);
const SUBMIT_RETRY_MAX_DELAY: Duration = Duration::from_secs(4);

/// How long a read answered 502/503/504 (an election, a leader change) is retried.
const READ_RETRY_WINDOW: Duration = Duration::from_secs(10);
const READ_RETRY_FIRST_DELAY: Duration = Duration::from_millis(100);
const READ_RETRY_MAX_DELAY: Duration = Duration::from_secs(1);

/// Whether an answer with `status` to a request is sent again: only reads (`is_read`), and only
/// the statuses of a coordinator that could not answer right now.
fn retry_read(is_read: bool, status: u16) -> bool {
    is_read && matches!(status, 502..=504)
}

/// Whether a request that failed without an answer may be sent again: the coordinator was
/// unreachable, the request timed out, or the connection broke. Not a TLS trust or protocol
/// mismatch, which a retry cannot fix.
fn retryable(e: &reqwest::Error) -> bool {
    let chain = error_chain(e);
    let tls_problem = [
        "certificate",
        "InvalidCertificate",
        "wrong version number",
        "InvalidContentType",
        "corrupt message",
    ]
    .iter()
    .any(|w| chain.contains(w));
    !tls_problem && (e.is_connect() || e.is_timeout() || e.is_request())
}

impl Client {
    /// Creates a token; its secret is in the answer, once.
    pub async fn create_token(&self, body: &serde_json::Value) -> anyhow::Result<CreatedToken> {
        self.check(
            self.send(|base| self.http.post(format!("{}/v1/tokens", base)).json(body))
                .await,
        )
        .await
    }

    /// Every token this caller may see (no secrets).
    pub async fn tokens(&self) -> anyhow::Result<Vec<TokenView>> {
        self.check(
            self.send(|base| self.http.get(format!("{}/v1/tokens", base)))
                .await,
        )
        .await
    }

    /// Revokes a token.
    pub async fn revoke_token(&self, id: &str) -> anyhow::Result<TokenView> {
        self.check(
            self.send(|base| {
                self.http
                    .post(format!("{}/v1/tokens/{}/revoke", base, enc(id)))
                    .timeout(Duration::from_secs(3700))
            })
            .await,
        )
        .await
    }

    /// The audit trail, oldest first.
    pub async fn audit(&self) -> anyhow::Result<Vec<AuditView>> {
        self.check(
            self.send(|base| self.http.get(format!("{}/v1/audit", base)))
                .await,
        )
        .await
    }

    /// Who this client's token is.
    pub async fn whoami(&self) -> anyhow::Result<WhoAmI> {
        self.check(
            self.send(|base| self.http.get(format!("{}/v1/whoami", base)))
                .await,
        )
        .await
    }

    /// The coordinators of the Raft group as the one asked sees them.
    pub async fn cluster(&self) -> anyhow::Result<ClusterView> {
        self.check(
            self.send(|base| self.http.get(format!("{}/v1/cluster", base)))
                .await,
        )
        .await
    }

    /// Adds the coordinator at `address` as a voter; answers the new membership.
    pub async fn add_member(&self, address: &str) -> anyhow::Result<ClusterView> {
        let body = serde_json::json!({ "address": address });
        self.check(
            self.send(|base| {
                self.http
                    .post(format!("{base}/v1/cluster/members"))
                    .json(&body)
                    .timeout(Duration::from_secs(660))
            })
            .await,
        )
        .await
    }

    /// Removes member `id`; answers the new membership.
    pub async fn remove_member(&self, id: u64) -> anyhow::Result<ClusterView> {
        self.check(
            self.send(|base| self.http.delete(format!("{base}/v1/cluster/members/{id}")))
                .await,
        )
        .await
    }

    /// Hands leadership to member `id`; answers the membership after.
    pub async fn transfer_leader(&self, id: u64) -> anyhow::Result<ClusterView> {
        let body = serde_json::json!({ "id": id });
        self.check(
            self.send(|base| {
                self.http
                    .post(format!("{base}/v1/cluster/leader"))
                    .json(&body)
            })
            .await,
        )
        .await
    }

    /// Whether the coordinator answers its health check (no token needed).
    pub async fn healthy(&self) -> bool {
        self.send(|base| self.http.get(format!("{}/v1/health", base)))
            .await
            .is_ok_and(|r| r.status().is_success())
    }
}

/// Percent-encodes a path segment or query value (so a user-typed id cannot change the URL).
fn enc(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reads_are_retried_and_only_while_no_coordinator_can_answer() {
        // (is_read, status) -> retried
        let cases = [
            ((true, 503), true),
            ((true, 502), true),
            ((true, 504), true),
            ((true, 500), false),
            ((true, 404), false),
            ((true, 200), false),
            ((false, 503), false),
            ((false, 200), false),
        ];
        for ((is_read, status), want) in cases {
            assert_eq!(
                retry_read(is_read, status),
                want,
                "read {is_read}, {status}"
            );
        }
    }
}
