//! Raft messages between coordinators, as JSON over HTTP on the coordinator's own port
//! (`POST /internal/raft/{append,vote,snapshot}`).
//!
//! A single-voter cluster never sends any; several coordinators replicate through it.

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::peer_auth::{PeerSecret, PEER_HEADER};
use super::{ServerId, TypeConfig};

/// Makes HTTP clients to other coordinators; every message is signed with the cluster's peer secret.
#[derive(Clone)]
pub struct HttpNetworkFactory {
    client: reqwest::Client,
    secret: PeerSecret,
    from: ServerId,
    scheme: &'static str,
}

impl HttpNetworkFactory {
    /// Clients that sign as server `from` with `secret`. With `tls` (the cluster CA and this
    /// coordinator's own certificate as client identity), they speak HTTPS and trust only the
    /// cluster CA; without it, plain HTTP (`--insecure`).
    pub fn new(
        secret: PeerSecret,
        from: ServerId,
        tls: Option<rustls::ClientConfig>,
    ) -> anyhow::Result<Self> {
        let (client, scheme) = match tls {
            Some(config) => (
                reqwest::Client::builder()
                    .tls_backend_preconfigured(config)
                    .build()?,
                "https",
            ),
            None => (reqwest::Client::new(), "http"),
        };
        Ok(HttpNetworkFactory {
            client,
            secret,
            from,
            scheme,
        })
    }
}

/// A client to one other coordinator.
pub struct HttpNetwork {
    client: reqwest::Client,
    target: ServerId,
    base_url: String,
    secret: PeerSecret,
    from: ServerId,
}

impl RaftNetworkFactory<TypeConfig> for HttpNetworkFactory {
    type Network = HttpNetwork;

    async fn new_client(&mut self, target: ServerId, node: &BasicNode) -> HttpNetwork {
        let addr = node.addr.trim_end_matches('/');
        let base_url = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.to_string()
        } else {
            format!("{}://{addr}", self.scheme)
        };
        HttpNetwork {
            client: self.client.clone(),
            target,
            base_url,
            secret: self.secret.clone(),
            from: self.from,
        }
    }
}

impl HttpNetwork {
    async fn call<Req, Resp, Err>(
        &self,
        path: &str,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<ServerId, BasicNode, Err>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        Err: std::error::Error + DeserializeOwned,
    {
        let route = format!("/internal/raft/{path}");
        let url = format!("{}{route}", self.base_url);
        let body =
            serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let signature = self.secret.sign(self.from, now_ms, &route, &body);
        let response = self
            .client
            .post(&url)
            .timeout(option.hard_ttl())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(PEER_HEADER, signature)
            .body(body)
            .send()
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let result: Result<Resp, Err> = response
            .json()
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for HttpNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<ServerId>, RPCError<ServerId, BasicNode, RaftError<ServerId>>>
    {
        self.call("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<ServerId>,
        RPCError<ServerId, BasicNode, RaftError<ServerId, InstallSnapshotError>>,
    > {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<ServerId>,
        option: RPCOption,
    ) -> Result<VoteResponse<ServerId>, RPCError<ServerId, BasicNode, RaftError<ServerId>>> {
        self.call("vote", &rpc, &option).await
    }
}
