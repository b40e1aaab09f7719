//! A small blocking HTTP/1.1 client for the rank side of trainctl's checkpoint contract: telling
//! the rank's own agent that a checkpoint is complete ([`commit_checkpoint`]) and how far training
//! has got ([`report_progress`]).
//!
//! The agent gives every rank `TRAINCTL_AGENT_URL` (such as `http://127.0.0.2:41234`) and
//! `TRAINCTL_JOB_TOKEN`. A rank that has *finished* writing a checkpoint sends
//!
//! ```text
//! POST /v1/checkpoints HTTP/1.1
//! Authorization: Bearer <token>
//! Content-Type: application/json
//!
//! {"path":"/ckpt/step-10","step":10,"metrics":{"loss":0.1}}
//! ```
//!
//! and the agent answers 2xx (with a JSON body) only once the commit is durable, or 4xx/5xx with
//! `{"error": "..."}`. `POST /v1/progress` with `{"step": N}` reports progress for hang detection.
//!
//! Only std is used (`TcpStream`, one connection per request, `Connection: close`), so any rank
//! process, and `trainctl checkpoint commit`, can call it without an async runtime. `https` is not
//! supported: the agent listens on the node itself.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Variable holding the URL of the rank's own agent.
pub const AGENT_URL_VAR: &str = "TRAINCTL_AGENT_URL";
/// Variable holding the job's secret token.
pub const JOB_TOKEN_VAR: &str = "TRAINCTL_JOB_TOKEN";
/// How long connecting to the agent may take.
pub const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one read or write on the connection may block. Generous: the agent answers a commit
/// only once it is durable, which may take a round of consensus.
pub const AGENT_IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest reply read; the agent's replies are small JSON objects.
const MAX_REPLY_BYTES: usize = 1 << 20;
/// Longest piece of a reply body quoted in an error.
const MAX_QUOTED_BODY_CHARS: usize = 2000;

/// Why a request to the agent failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// A variable of the contract is not set, so this process was not started by trainctl.
    #[error("environment variable {var} is not set: not running under trainctl (the agent sets {AGENT_URL_VAR} and {JOB_TOKEN_VAR} for every rank)")]
    MissingEnv {
        /// The variable's name.
        var: &'static str,
    },
    /// The agent URL is not one this client accepts.
    #[error("agent URL `{url}` is not valid: {problem}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong and what is accepted.
        problem: String,
    },
    /// An argument cannot be sent (a token with a line break, metrics that are not an object).
    #[error("{0}")]
    BadArgument(String),
    /// The agent could not be reached.
    #[error("cannot connect to the agent at {url}: {source}")]
    Connect {
        /// The agent URL.
        url: String,
        /// The last connection error.
        #[source]
        source: io::Error,
    },
    /// The connection failed or timed out mid-request.
    #[error("{context} ({url}): {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The agent URL.
        url: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The reply was not HTTP this client understands.
    #[error("the agent at {url} sent a malformed reply: {problem}")]
    BadReply {
        /// The agent URL.
        url: String,
        /// What was wrong.
        problem: String,
    },
    /// The agent answered with a status other than 2xx.
    #[error("the agent refused the request: HTTP {status}: {body}")]
    Rejected {
        /// The HTTP status code.
        status: u16,
        /// The reply body (the agent sends `{"error": "..."}`), possibly shortened.
        body: String,
    },
}

impl CheckpointError {
    /// The HTTP status when the agent answered with an error status.
    pub fn status(&self) -> Option<u16> {
        match self {
            CheckpointError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Where to reach the rank's agent and how to authenticate: the contract's two variables.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentEndpoint {
    /// `TRAINCTL_AGENT_URL`.
    pub url: String,
    /// `TRAINCTL_JOB_TOKEN`.
    pub token: String,
}

impl std::fmt::Debug for AgentEndpoint {
    // The token is a secret: keep it out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentEndpoint")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl AgentEndpoint {
    /// Reads `TRAINCTL_AGENT_URL` and `TRAINCTL_JOB_TOKEN` through `get` (pass
    /// `|k| std::env::var(k).ok()` for the process environment). An unset or empty variable is
    /// [`CheckpointError::MissingEnv`] naming it.
    pub fn from_env_with(get: impl Fn(&str) -> Option<String>) -> Result<Self, CheckpointError> {
        let read = |var: &'static str| {
            get(var)
                .filter(|v| !v.trim().is_empty())
                .ok_or(CheckpointError::MissingEnv { var })
        };
        Ok(AgentEndpoint {
            url: read(AGENT_URL_VAR)?.trim().to_string(),
            token: read(JOB_TOKEN_VAR)?.trim().to_string(),
        })
    }

    /// [`Self::from_env_with`] over the process environment.
    pub fn from_env() -> Result<Self, CheckpointError> {
        Self::from_env_with(|k| std::env::var(k).ok())
    }

    /// [`commit_checkpoint`] to this agent.
    pub fn commit(
        &self,
        path: &str,
        step: u64,
        metrics_json: Option<&str>,
    ) -> Result<String, CheckpointError> {
        commit_checkpoint(&self.url, &self.token, path, step, metrics_json)
    }

    /// [`report_progress`] to this agent.
    pub fn report_progress(&self, step: u64) -> Result<String, CheckpointError> {
        report_progress(&self.url, &self.token, step)
    }
}

/// Commits the checkpoint at `path` (already completely written) as step `step`:
/// `POST <agent_url>/v1/checkpoints` with `{"path": path, "step": step}` plus `"metrics"` when
/// given, authenticated with `token`. Returns the reply body once the agent has answered 2xx, which
/// it does only once the commit is durable.
///
/// `metrics_json`, when given, must be a JSON object such as `{"loss": 0.1}`; it is sent as is
/// (the agent validates it). Any non-2xx answer is [`CheckpointError::Rejected`] carrying the
/// status and the body.
pub fn commit_checkpoint(
    agent_url: &str,
    token: &str,
    path: &str,
    step: u64,
    metrics_json: Option<&str>,
) -> Result<String, CheckpointError> {
    let mut body = format!("{{\"path\":{},\"step\":{step}", json_string(path));
    if let Some(metrics) = metrics_json {
        let m = metrics.trim();
        if !(m.starts_with('{') && m.ends_with('}')) {
            return Err(CheckpointError::BadArgument(format!(
                "metrics `{metrics}` is not a JSON object: expected one such as {{\"loss\": 0.1}}"
            )));
        }
        body.push_str(",\"metrics\":");
        body.push_str(m);
    }
    body.push('}');
    post_json(agent_url, token, "/v1/checkpoints", &body)
}

/// Reports that training reached `step`: `POST <agent_url>/v1/progress` with `{"step": step}`.
/// Returns the reply body.
pub fn report_progress(agent_url: &str, token: &str, step: u64) -> Result<String, CheckpointError> {
    post_json(
        agent_url,
        token,
        "/v1/progress",
        &format!("{{\"step\":{step}}}"),
    )
}

/// [`commit_checkpoint`] to the agent named by `TRAINCTL_AGENT_URL`, with `TRAINCTL_JOB_TOKEN`;
/// fails with [`CheckpointError::MissingEnv`] naming the missing variable when not running under
/// trainctl.
pub fn commit_from_env(
    path: &str,
    step: u64,
    metrics_json: Option<&str>,
) -> Result<String, CheckpointError> {
    AgentEndpoint::from_env()?.commit(path, step, metrics_json)
}

/// `s` as a JSON string literal, quotes included.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' || c == '\u{2028}' || c == '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The parts of an `http://host[:port][/prefix]` URL.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    /// `host:port` as written (for the Host header), the port defaulting to 80.
    authority: String,
    host: String,
    port: u16,
    /// Path prefix without a trailing slash ("" for none).
    prefix: String,
}

fn parse_url(url: &str) -> Result<Target, CheckpointError> {
    let bad = |problem: &str| CheckpointError::BadUrl {
        url: url.to_string(),
        problem: format!("{problem}; expected one such as http://127.0.0.1:41234"),
    };
    let trimmed = url.trim();
    let rest = if let Some(rest) = trimmed.strip_prefix("http://") {
        rest
    } else if trimmed.starts_with("https://") {
        return Err(bad(
            "https is not supported (the agent listens on the node)",
        ));
    } else {
        return Err(bad("it does not start with http://"));
    };
    let (authority, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if prefix.contains(['?', '#', ' ']) {
        return Err(bad("it has a query, fragment or space"));
    }
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("it has no host, or has user information"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed `[`"))?;
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => return Err(bad("unexpected text after `]`")),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(&format!("port `{p}` is not a number from 1 to 65535")))?,
    };
    if host.is_empty() {
        return Err(bad("it has no host"));
    }
    Ok(Target {
        authority: authority.to_string(),
        host: host.to_string(),
        port,
        prefix: prefix.to_string(),
    })
}

/// Sends one POST with a JSON body and returns the 2xx reply's body.
fn post_json(
    agent_url: &str,
    token: &str,
    path: &str,
    body: &str,
) -> Result<String, CheckpointError> {
    let target = parse_url(agent_url)?;
    if token.is_empty() || token.contains(|c: char| c.is_control() || c == ' ') {
        return Err(CheckpointError::BadArgument(
            "the job token is empty or contains spaces or control characters".to_string(),
        ));
    }
    let io_err = |context: &'static str| {
        let url = agent_url.to_string();
        move |source: io::Error| CheckpointError::Io {
            context,
            url,
            source,
        }
    };
    let mut stream = connect(&target).map_err(|source| CheckpointError::Connect {
        url: agent_url.to_string(),
        source,
    })?;
    stream
        .set_read_timeout(Some(AGENT_IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(AGENT_IO_TIMEOUT)))
        .map_err(io_err("cannot set timeouts on the agent connection"))?;
    let request = format!(
        "POST {prefix}{path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{body}",
        prefix = target.prefix,
        host = target.authority,
        len = body.len(),
    );
    stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.flush())
        .map_err(io_err("cannot send the request to the agent"))?;
    let mut reply = Vec::new();
    stream
        .take(MAX_REPLY_BYTES as u64 + 1)
        .read_to_end(&mut reply)
        .map_err(io_err("no complete reply from the agent"))?;
    let (status, body) = parse_reply(&reply).map_err(|problem| CheckpointError::BadReply {
        url: agent_url.to_string(),
        problem,
    })?;
    if (200..300).contains(&status) {
        Ok(body)
    } else {
        let mut quoted: String = body.trim().chars().take(MAX_QUOTED_BODY_CHARS).collect();
        if quoted.len() < body.trim().len() {
            quoted.push_str("...");
        }
        if quoted.is_empty() {
            quoted = "(empty body)".to_string();
        }
        Err(CheckpointError::Rejected {
            status,
            body: quoted,
        })
    }
}

/// Connects to the first address of `target` that answers within [`AGENT_CONNECT_TIMEOUT`].
fn connect(target: &Target) -> io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
        .to_socket_addrs()?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name has no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, AGENT_CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The status code and body of a complete HTTP/1.x reply (the server closed the connection, or
/// sent `Content-Length` or chunked bytes).
fn parse_reply(reply: &[u8]) -> Result<(u16, String), String> {
    if reply.len() > MAX_REPLY_BYTES {
        return Err(format!("the reply is longer than {MAX_REPLY_BYTES} bytes"));
    }
    let head_end = find(reply, b"\r\n\r\n").ok_or_else(|| {
        if reply.is_empty() {
            "the connection closed without a reply".to_string()
        } else {
            "the reply ended inside its headers".to_string()
        }
    })?;
    let head = std::str::from_utf8(&reply[..head_end])
        .map_err(|_| "the reply headers are not UTF-8".to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("status line `{status_line}` is not HTTP/1.x"));
    }
    let status: u16 = code
        .parse()
        .ok()
        .filter(|c| (100..600).contains(c))
        .ok_or_else(|| format!("status line `{status_line}` has no valid status code"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("Content-Length `{value}` is not a number"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let rest = &reply[head_end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(len) = content_length {
        if rest.len() < len {
            return Err(format!(
                "the body ended after {} of {len} bytes",
                rest.len()
            ));
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Decodes a chunked transfer-encoded body.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n").ok_or("a chunk size line is cut off")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).unwrap_or("?");
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("chunk size `{size_text}` is not hexadecimal"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            return Err("a chunk is cut off".to_string());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    /// Serves one connection on a loopback port: reads a whole request (headers and
    /// Content-Length body), answers `reply`, and returns the raw request text.
    fn serve_once(reply: &'static str) -> (String, thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            loop {
                let n = conn.read(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = find(&buf, b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            conn.write_all(reply.as_bytes()).unwrap();
            String::from_utf8(buf).unwrap()
        });
        (url, handle)
    }

    #[test]
    fn commit_sends_the_exact_request_and_returns_the_body() {
        let (url, server) = serve_once(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 18\r\n\r\n{\"committed\":true}",
        );
        let body = commit_checkpoint(
            &format!("{url}/"),
            "s3cret",
            "/ckpt/a \"b\"\\c\n",
            10,
            Some(r#"{"loss": 0.25}"#),
        )
        .unwrap();
        assert_eq!(body, "{\"committed\":true}");
        let request = server.join().unwrap();
        let want_body = r#"{"path":"/ckpt/a \"b\"\\c\n","step":10,"metrics":{"loss": 0.25}}"#;
        let host = url.strip_prefix("http://").unwrap();
        assert_eq!(
            request,
            format!(
                "POST /v1/checkpoints HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer s3cret\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{want_body}",
                want_body.len()
            )
        );
    }

    #[test]
    fn progress_posts_the_step_under_a_path_prefix() {
        let (url, server) = serve_once("HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(
            report_progress(&format!("{url}/agent"), "t", 7).unwrap(),
            ""
        );
        let request = server.join().unwrap();
        assert!(
            request.starts_with("POST /agent/v1/progress HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.ends_with("\r\n\r\n{\"step\":7}"), "{request}");
    }

    #[test]
    fn an_error_status_carries_the_status_and_the_body() {
        let (url, server) = serve_once(
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n{\"error\":\r\na\r\n\"bad token\r\n2\r\n\"}\r\n0\r\n\r\n",
        );
        let err = commit_checkpoint(&url, "wrong", "/c", 1, None).unwrap_err();
        server.join().unwrap();
        assert_eq!(err.status(), Some(401));
        let msg = err.to_string();
        assert_eq!(
            msg,
            "the agent refused the request: HTTP 401: {\"error\":\"bad token\"}"
        );
    }

    #[test]
    fn malformed_replies_and_dead_agents_are_errors() {
        let (url, server) = serve_once("SSH-2.0-OpenSSH\r\n\r\n");
        let err = commit_checkpoint(&url, "t", "/c", 1, None).unwrap_err();
        server.join().unwrap();
        assert!(
            matches!(err, CheckpointError::BadReply { .. }),
            "{err:?}: {err}"
        );
        assert!(err.to_string().contains("not HTTP/1.x"), "{err}");

        let (url, server) = serve_once("");
        let err = commit_checkpoint(&url, "t", "/c", 1, None).unwrap_err();
        server.join().unwrap();
        assert!(err.to_string().contains("closed without a reply"), "{err}");

        // A port nobody listens on.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err =
            commit_checkpoint(&format!("http://127.0.0.1:{port}"), "t", "/c", 1, None).unwrap_err();
        assert!(matches!(err, CheckpointError::Connect { .. }), "{err:?}");
        assert!(
            err.to_string().contains("cannot connect to the agent"),
            "{err}"
        );
    }

    #[test]
    fn bad_arguments_are_refused_before_connecting() {
        for (url, want) in [
            ("https://127.0.0.1:1", "https is not supported"),
            ("127.0.0.1:1", "does not start with http://"),
            ("http://127.0.0.1:0", "port `0`"),
            ("http://:80", "no host"),
            ("http://[::1", "unclosed"),
        ] {
            let err = commit_checkpoint(url, "t", "/c", 1, None).unwrap_err();
            assert!(err.to_string().contains(want), "{url}: {err}");
        }
        let err = commit_checkpoint("http://127.0.0.1:1", "a\r\nX: y", "/c", 1, None).unwrap_err();
        assert!(err.to_string().contains("job token"), "{err}");
        let err = commit_checkpoint("http://127.0.0.1:1", "t", "/c", 1, Some("[1]")).unwrap_err();
        assert!(err.to_string().contains("not a JSON object"), "{err}");
    }

    #[test]
    fn urls_parse_into_host_port_and_prefix() {
        assert_eq!(
            parse_url("http://127.0.0.2:41234").unwrap(),
            Target {
                authority: "127.0.0.2:41234".into(),
                host: "127.0.0.2".into(),
                port: 41234,
                prefix: String::new(),
            }
        );
        let t = parse_url("http://[::1]:8080/x/").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.prefix.as_str()),
            ("::1", 8080, "/x")
        );
        let t = parse_url("http://agent").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("agent", 80));
    }

    #[test]
    fn env_names_the_missing_variable() {
        let err = AgentEndpoint::from_env_with(|_| None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable TRAINCTL_AGENT_URL is not set: not running under trainctl (the agent sets TRAINCTL_AGENT_URL and TRAINCTL_JOB_TOKEN for every rank)"
        );
        let err = AgentEndpoint::from_env_with(|k| {
            (k == AGENT_URL_VAR).then(|| "http://127.0.0.1:1".to_string())
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("environment variable TRAINCTL_JOB_TOKEN is not set"),
            "{err}"
        );
        let ep = AgentEndpoint::from_env_with(|k| Some(format!(" {k} "))).unwrap();
        assert_eq!(ep.url, AGENT_URL_VAR);
        assert_eq!(ep.token, JOB_TOKEN_VAR);
        assert!(!format!("{ep:?}").contains(JOB_TOKEN_VAR));
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(json_string("\u{1}\t\u{7f}é"), "\"\\u0001\\t\\u007fé\"");
    }
}
