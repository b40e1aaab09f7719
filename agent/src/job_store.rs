//! The TCPStore the agent serves for each job whose group rank 0 runs on this host.
//!
//! torchrun's contract (`TORCHELASTIC_USE_AGENT_STORE=True`): the launcher of node 0 serves a
//! TCPStore at MASTER_ADDR:MASTER_PORT before the ranks start, and every rank (rank 0 included) is
//! a client. Here the agent is that launcher. Each attempt gets its own server, so a restarted
//! gang sees an empty keyspace (torch's workers do not prefix their keys per attempt), and the
//! server lives exactly as long as the coordinator assigns that attempt here: it is stopped, its
//! connections closed, when the attempt ends. It serves only the job's hosts
//! ([`allowed_peers`]), so a straggler of another job that dials a reused port is refused.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tracing::{info, warn};
use trainctl_proto::agent::StoreAssignment;
use trainctl_store::{StoreConfig, StoreServer};

/// One attempt's store on this host: serving, the reason it could not start, or stopped because
/// every rank of the attempt on this host has ended.
enum Served {
    Up(StoreServer),
    Failed(String),
    Finished,
}

/// The stores this agent serves, by (job id, attempt).
#[derive(Default)]
pub struct JobStores {
    served: BTreeMap<(String, u32), Served>,
}

/// The addresses whose connections a job's store accepts: the job's hosts. `None` (no filter)
/// when some host's address is not an IP (a name may resolve to several). A rank on this host
/// that dials a loopback MASTER_ADDR arrives from 127.0.0.1, which is then allowed too.
pub fn allowed_peers(peers: &[String]) -> Option<Vec<IpAddr>> {
    let mut ips = Vec::with_capacity(peers.len() + 1);
    for peer in peers {
        ips.push(peer.parse::<IpAddr>().ok()?);
    }
    if ips.iter().any(IpAddr::is_loopback) {
        ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    Some(ips)
}

impl JobStores {
    /// Serves the stores of `wanted` and stops every other one. Stores are stopped before new
    /// ones start, so a port handed from one attempt to the next is free again.
    pub async fn sync(&mut self, wanted: &[(String, u32, StoreAssignment)]) {
        let keep: Vec<(String, u32)> = wanted
            .iter()
            .map(|(job, attempt, _)| (job.clone(), *attempt))
            .collect();
        let stale: Vec<(String, u32)> = self
            .served
            .keys()
            .filter(|k| !keep.contains(k))
            .cloned()
            .collect();
        for key in stale {
            if let Some(Served::Up(server)) = self.served.remove(&key) {
                info!(job = %key.0, attempt = key.1, address = %server.local_addr(), "stopping the job's store");
                server.shutdown().await;
            }
        }
        for (job, attempt, store) in wanted {
            let key = (job.clone(), *attempt);
            if self.served.contains_key(&key) {
                continue;
            }
            let served = match start(store).await {
                Ok(server) => {
                    info!(job = %job, attempt, address = %server.local_addr(), "serving the job's store");
                    Served::Up(server)
                }
                Err(reason) => {
                    warn!(job = %job, attempt, %reason, "the job's store could not start");
                    Served::Failed(reason)
                }
            };
            self.served.insert(key, served);
        }
    }

    /// Stops the stores of the attempts in `ended` (every rank of the attempt on this host has
    /// ended), before the agent reports those ends. The coordinator frees MASTER_PORT only on
    /// that report and may then lease it to another job at once, whose ranks on other hosts can
    /// arrive before this agent hears of the change: they must find nothing listening, never the
    /// old job's keys. A stopped store is not started again for the same attempt.
    pub async fn finish(&mut self, ended: &[(String, u32)]) {
        for key in ended {
            if let Some(served) = self.served.get_mut(key) {
                if let Served::Up(_) = served {
                    if let Served::Up(server) = std::mem::replace(served, Served::Finished) {
                        info!(job = %key.0, attempt = key.1, "every rank here ended: stopping the job's store");
                        server.shutdown().await;
                    }
                }
            }
        }
    }

    /// The attempts whose store this agent serves now.
    pub fn serving(&self) -> Vec<(String, u32)> {
        self.served
            .iter()
            .filter(|(_, s)| matches!(s, Served::Up(_)))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Why the store of this attempt could not start, if it could not: its ranks on this host are
    /// reported as failed to start with this reason instead of dialling a store nobody serves.
    pub fn failure(&self, job: &str, attempt: u32) -> Option<&str> {
        match self.served.get(&(job.to_string(), attempt)) {
            Some(Served::Failed(reason)) => Some(reason),
            _ => None,
        }
    }

    /// The address a store of this attempt listens on (tests, logs).
    pub fn address(&self, job: &str, attempt: u32) -> Option<SocketAddr> {
        match self.served.get(&(job.to_string(), attempt)) {
            Some(Served::Up(server)) => Some(server.local_addr()),
            _ => None,
        }
    }
}

async fn start(store: &StoreAssignment) -> Result<StoreServer, String> {
    let port =
        u16::try_from(store.port).map_err(|_| format!("port {} is not a TCP port", store.port))?;
    // MASTER_ADDR is this host's registered address; a name is served on every interface.
    let ip = store
        .address
        .parse::<IpAddr>()
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let addr = SocketAddr::new(ip, port);
    let config = StoreConfig {
        allowed_peers: allowed_peers(&store.peers),
        ..StoreConfig::default()
    };
    StoreServer::bind(addr, config).await.map_err(|e| {
        format!(
            "the job's TCPStore could not listen on {addr} (MASTER_ADDR:MASTER_PORT): {e}{}",
            if e.kind() == std::io::ErrorKind::AddrInUse {
                "; another program holds that port: keep the agent's port range (--port-range) for trainctl alone"
            } else {
                ""
            }
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainctl_store::{Namespace, StoreClient};

    #[test]
    fn peers_become_an_address_filter() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            allowed_peers(&s(&["10.0.0.1", "10.0.0.2"])),
            Some(vec![
                "10.0.0.1".parse().unwrap(),
                "10.0.0.2".parse().unwrap()
            ])
        );
        assert_eq!(
            allowed_peers(&s(&["127.0.0.2", "127.0.0.3"])),
            Some(vec![
                "127.0.0.2".parse().unwrap(),
                "127.0.0.3".parse().unwrap(),
                "127.0.0.1".parse().unwrap()
            ])
        );
        assert_eq!(allowed_peers(&s(&["10.0.0.1", "gpu-7.example"])), None);
    }

    fn assignment(port: u16) -> StoreAssignment {
        StoreAssignment {
            address: "127.0.0.1".to_string(),
            port: u32::from(port),
            peers: vec!["127.0.0.1".to_string()],
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn each_attempt_gets_a_fresh_store_and_the_old_one_stops() {
        let port = free_port();
        let mut stores = JobStores::default();
        stores.sync(&[("7".into(), 0, assignment(port))]).await;
        let addr = format!("127.0.0.1:{port}");
        let mut rank = StoreClient::connect(&addr, Namespace::Workers)
            .await
            .unwrap();
        rank.set("/attempt-0-key", b"x").await.unwrap();

        // Attempt 1 on the same port (the coordinator found no other free one).
        stores.sync(&[("7".into(), 1, assignment(port))]).await;
        assert!(
            rank.ping().await.is_err(),
            "attempt 0's connection was closed"
        );
        let mut rank = StoreClient::connect(&addr, Namespace::Workers)
            .await
            .unwrap();
        assert!(!rank.check(&["/attempt-0-key"]).await.unwrap());
        assert_eq!(stores.address("7", 1).unwrap().port(), port);

        // The attempt ends here: nothing listens any more.
        stores.sync(&[]).await;
        assert!(StoreClient::connect(&addr, Namespace::Workers)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn a_store_stops_when_its_ranks_here_ended_and_is_not_started_again() {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut stores = JobStores::default();
        let wanted = [("3".to_string(), 0, assignment(port))];
        stores.sync(&wanted).await;
        assert_eq!(stores.serving(), [("3".to_string(), 0)]);
        stores.finish(&[("3".to_string(), 0)]).await;
        assert!(StoreClient::connect(&addr, Namespace::Workers)
            .await
            .is_err());
        // The assignment is still there (the job is not over everywhere): no new store.
        stores.sync(&wanted).await;
        assert!(stores.serving().is_empty());
        assert!(StoreClient::connect(&addr, Namespace::Workers)
            .await
            .is_err());
        assert_eq!(stores.failure("3", 0), None);
    }

    #[tokio::test]
    async fn a_port_held_by_someone_else_is_a_start_failure_naming_it() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = holder.local_addr().unwrap().port();
        let mut stores = JobStores::default();
        stores.sync(&[("9".into(), 0, assignment(port))]).await;
        let reason = stores.failure("9", 0).expect("a failure");
        assert!(reason.contains(&format!("127.0.0.1:{port}")), "{reason}");
        assert!(
            reason.contains("another program holds that port"),
            "{reason}"
        );
    }
}
