//! How the `trainctl run` launchers of one run meet, round after round, through the control
//! keyspace of the run's store (which worker clients can never see).
//!
//! One round is one attempt of the whole gang. In round `r` every launcher:
//! 1. joins: `ADD r/joined 1` gives its arrival order; with `--node-rank` (static) it claims that
//!    rank (a second claim is an error), else (c10d) its order is its node rank. It publishes its
//!    worker count under `r/node/<rank>`.
//! 2. waits for the round to close: static rounds close with every node; c10d rounds close at
//!    `MAX` nodes, or `last_call_timeout` after `MIN` joined ([`close_decision`]). The first
//!    launcher to decide writes `r/closed` with compare-and-set, so all see the same size.
//! 3. waits for `r/ready`: the launcher that serves the store empties the worker keyspace
//!    ([`trainctl_store::StoreServer::reset_workers`]) once the round closed, then sets it. Every
//!    launcher stopped its previous workers before joining, so no worker of round `r-1` sees
//!    round `r`'s keys.
//! 4. runs its workers, then reports how they ended into `r/outcome` (compare-and-set: the first
//!    failure wins; the last success writes `succeeded`). Every launcher watches `r/outcome` and
//!    stops its workers as soon as another node's failed, as torchrun's agents do.
//! 5. when the run ends there, counts itself in `r/outcome_read`; the last one sets
//!    `r/outcome_read_by_all`, which the launcher serving the store waits for (at most
//!    [`EXIT_BARRIER_TIMEOUT`]) before it exits and the store with it.
//!
//! Keys are prefixed with the run id, so two runs sharing a store (`trainctl store`) never meet.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use trainctl_store::{Namespace, StoreClient};

/// How long one `WAIT` on the store blocks before it is renewed (the store never times out a
/// wait; the client does).
const WAIT_SLICE: Duration = Duration::from_secs(3600);
/// Pause between looks at the joined count while a c10d round is open.
const POLL: Duration = Duration::from_millis(50);
/// How long the launcher that serves the store waits, once the run ended, for the others to
/// read how it ended before it stops serving (torch's exit barrier timeout).
pub const EXIT_BARRIER_TIMEOUT: Duration = Duration::from_secs(300);

/// What one node runs in a closed round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundPlan {
    /// The round (= attempt, `TORCHELASTIC_RESTART_COUNT`).
    pub round: u32,
    /// This node's rank (`GROUP_RANK`).
    pub node_rank: u32,
    /// Nodes in the round (`GROUP_WORLD_SIZE`).
    pub nnodes: u32,
    /// Global rank of this node's local rank 0.
    pub rank_offset: u32,
    /// Workers in the round (`WORLD_SIZE`).
    pub world_size: u32,
    /// Restarts after failures so far (`TORCHELASTIC_RESTART_COUNT`): a round that follows a
    /// node joining does not count, as in torch.
    pub restart_count: u32,
}

/// What joining a round gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// This node runs in the round.
    Plan(RoundPlan),
    /// The round went on without this node (it arrived after it closed, or it was full); it has
    /// ended (this node asked a running one to end so that the gang grows), so join the next.
    Later,
    /// The run succeeded before this node was needed.
    RunOver,
}

/// How the gang's round ended, as every node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoundOutcome {
    /// Every node's workers succeeded.
    Succeeded,
    /// Some node's workers failed (the first to report): `failed <node_rank> <host>`.
    Failed(String),
    /// A launcher was stopped by a signal: `stopped <node_rank> <host>`.
    Stopped(String),
    /// A node arrived while the gang ran below `MAX` nodes: every node stops its workers and the
    /// gang restarts at the new size, using no restart (torch's membership change): `grow <host>`.
    Grow(String),
}

impl RoundOutcome {
    fn parse(value: &[u8]) -> RoundOutcome {
        let text = String::from_utf8_lossy(value).into_owned();
        if text == "succeeded" {
            RoundOutcome::Succeeded
        } else if let Some(rest) = text.strip_prefix("stopped ") {
            RoundOutcome::Stopped(rest.to_string())
        } else if let Some(rest) = text.strip_prefix("grow ") {
            RoundOutcome::Grow(rest.to_string())
        } else {
            RoundOutcome::Failed(text.strip_prefix("failed ").unwrap_or(&text).to_string())
        }
    }
}

/// What a c10d round should do now: pure, so it can be table-tested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseDecision {
    /// Keep waiting for nodes.
    Wait,
    /// Close the round with this many nodes.
    Close(u32),
    /// Fewer than `MIN` nodes came within the join timeout.
    TimedOut,
}

/// `joined` nodes so far; `min_reached_for`: how long the round has had `MIN` nodes (if it has);
/// `waited`: how long this launcher has waited in all.
pub fn close_decision(
    joined: u32,
    min: u32,
    max: u32,
    min_reached_for: Option<Duration>,
    waited: Duration,
    last_call: Duration,
    join_timeout: Duration,
) -> CloseDecision {
    if joined >= max {
        CloseDecision::Close(max)
    } else if joined >= min && min_reached_for.is_some_and(|t| t >= last_call) {
        CloseDecision::Close(joined)
    } else if joined < min && waited >= join_timeout {
        CloseDecision::TimedOut
    } else {
        CloseDecision::Wait
    }
}

/// Global rank offset of `node_rank` and the world size, from every node's worker count (node
/// rank order): torchrun's contiguous ranks per node.
pub fn rank_layout(nprocs: &[u32], node_rank: u32) -> (u32, u32) {
    let offset = nprocs[..node_rank as usize].iter().sum();
    (offset, nprocs.iter().sum())
}

/// One launcher's side of the rendezvous.
pub struct Rendezvous {
    client: StoreClient,
    endpoint: String,
    prefix: String,
    host: String,
    /// `--node-rank` (static rendezvous), else ranks by arrival (c10d).
    static_rank: Option<u32>,
    min: u32,
    max: u32,
    join_timeout: Duration,
    last_call: Duration,
}

impl Rendezvous {
    /// Connects to the run's store at `endpoint`, retrying until `join_timeout` (the launcher that
    /// serves it may start later).
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        endpoint: &str,
        run_id: &str,
        host: &str,
        static_rank: Option<u32>,
        min: u32,
        max: u32,
        join_timeout: Duration,
        last_call: Duration,
    ) -> anyhow::Result<Rendezvous> {
        let client = connect_retrying(endpoint, join_timeout).await?;
        Ok(Rendezvous {
            client,
            endpoint: endpoint.to_string(),
            prefix: format!("trainctl/run/{run_id}"),
            host: host.to_string(),
            static_rank,
            min,
            max,
            join_timeout,
            last_call,
        })
    }

    fn key(&self, round: u32, name: &str) -> String {
        format!("{}/r{round}/{name}", self.prefix)
    }

    /// Joins round `round` with `nproc` workers and waits for it to close and for the store to be
    /// ready. `restarts`: the restarts used so far, as this node knows them (`None` for a node
    /// that just arrived: it learns them from the round). `reset_store` runs on the launcher that
    /// serves the store, once the round closed.
    pub async fn join(
        &mut self,
        round: u32,
        nproc: u32,
        restarts: Option<u32>,
        reset_store: Option<&(dyn Fn() + Send + Sync)>,
    ) -> anyhow::Result<Joined> {
        let started = Instant::now();
        let order = self.client.add(&self.key(round, "joined"), 1).await? as u32 - 1;
        if self.static_rank.is_none()
            && (order >= self.max || self.client.check(&[&self.key(round, "closed")]).await?)
        {
            return self.late(round).await;
        }
        let restarts_key = self.key(round, "restarts");
        if let Some(r) = restarts {
            self.client
                .compare_set(&restarts_key, b"", r.to_string().as_bytes())
                .await?;
        }
        let node_rank = match self.static_rank {
            Some(rank) => {
                let claims = self
                    .client
                    .add(&self.key(round, &format!("claim/{rank}")), 1)
                    .await?;
                if claims > 1 {
                    bail!(
                        "two launchers claim --node-rank {rank} in this run (round {round}); give each host its own --node-rank from 0 to {}",
                        self.max - 1
                    );
                }
                rank
            }
            None => order,
        };
        if node_rank >= self.max {
            bail!(
                "round {round} of the rendezvous at {} already has {} nodes (--nnodes max); this host ({}) is not needed: a running gang does not grow yet",
                self.endpoint,
                self.max,
                self.host
            );
        }
        self.client
            .set(
                &self.key(round, &format!("node/{node_rank}")),
                format!("{nproc} {}", self.host).as_bytes(),
            )
            .await?;
        let nnodes = self.wait_closed(round, started).await?;
        if node_rank >= nnodes {
            // The round closed just before this node described itself.
            return self.late(round).await;
        }
        let keys: Vec<String> = (0..nnodes)
            .map(|n| self.key(round, &format!("node/{n}")))
            .collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.wait_keys(&refs, self.join_timeout.saturating_sub(started.elapsed()))
            .await
            .with_context(|| format!("round {round}: not every node described itself"))?;
        let nprocs: Vec<u32> = self
            .client
            .multi_get(&refs)
            .await?
            .iter()
            .map(|v| {
                String::from_utf8_lossy(v)
                    .split(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            })
            .collect();
        let (rank_offset, world_size) = rank_layout(&nprocs, node_rank);
        if let Some(reset) = reset_store {
            reset();
            self.client.set(&self.key(round, "ready"), b"1").await?;
        }
        let ready = self.key(round, "ready");
        self.wait_keys(&[&ready], self.join_timeout)
            .await
            .context("the launcher serving the store did not start the round")?;
        self.wait_keys(&[&restarts_key], self.join_timeout)
            .await
            .with_context(|| format!("round {round}: no node said how many restarts were used"))?;
        let restart_count = String::from_utf8_lossy(&self.client.get(&restarts_key).await?)
            .parse()
            .with_context(|| format!("round {round}: a restart count that is not a number"))?;
        Ok(Joined::Plan(RoundPlan {
            round,
            node_rank,
            nnodes,
            rank_offset,
            world_size,
            restart_count,
        }))
    }

    /// This node came after round `round` closed (or found it full): once the round has closed,
    /// if it runs below `MAX` nodes, ask every node to end it so that the gang grows; then wait
    /// for how it ended.
    async fn late(&mut self, round: u32) -> anyhow::Result<Joined> {
        let closed = self.key(round, "closed");
        let outcome = self.key(round, "outcome");
        wait_forever(&mut self.client, &closed).await?;
        let nnodes: u32 = String::from_utf8_lossy(&self.client.get(&closed).await?)
            .parse()
            .unwrap_or(self.max);
        if nnodes < self.max {
            let grow = format!("grow {}", self.host);
            self.client
                .compare_set(&outcome, b"", grow.as_bytes())
                .await?;
        }
        wait_forever(&mut self.client, &outcome).await?;
        Ok(
            match RoundOutcome::parse(&self.client.get(&outcome).await?) {
                RoundOutcome::Succeeded => Joined::RunOver,
                _ => Joined::Later,
            },
        )
    }

    async fn wait_closed(&mut self, round: u32, started: Instant) -> anyhow::Result<u32> {
        let closed = self.key(round, "closed");
        if self.static_rank.is_some() {
            // Static: the round is every node; the last to join closes it.
            let joined = self.client.add(&self.key(round, "joined"), 0).await? as u32;
            if joined >= self.max {
                self.client
                    .compare_set(&closed, b"", self.max.to_string().as_bytes())
                    .await?;
            }
        } else {
            let mut min_reached: Option<Instant> = None;
            loop {
                if self.client.check(&[&closed]).await? {
                    break;
                }
                let joined = self.client.add(&self.key(round, "joined"), 0).await? as u32;
                if joined >= self.min && min_reached.is_none() {
                    min_reached = Some(Instant::now());
                }
                match close_decision(
                    joined,
                    self.min,
                    self.max,
                    min_reached.map(|t| t.elapsed()),
                    started.elapsed(),
                    self.last_call,
                    self.join_timeout,
                ) {
                    CloseDecision::Wait => tokio::time::sleep(POLL).await,
                    CloseDecision::Close(n) => {
                        self.client
                            .compare_set(&closed, b"", n.to_string().as_bytes())
                            .await?;
                        break;
                    }
                    CloseDecision::TimedOut => bail!(
                        "rendezvous timed out: {joined} of at least {} nodes joined round {round} at {} within {:?} (--rdzv-conf join_timeout)",
                        self.min,
                        self.endpoint,
                        self.join_timeout
                    ),
                }
            }
        }
        self.wait_keys(&[&closed], self.join_timeout.saturating_sub(started.elapsed()))
            .await
            .with_context(|| {
                format!(
                    "rendezvous timed out: round {round} at {} did not gather {} nodes within {:?} (--rdzv-conf join_timeout)",
                    self.endpoint, self.max, self.join_timeout
                )
            })?;
        let value = self.client.get(&closed).await?;
        String::from_utf8_lossy(&value)
            .parse()
            .with_context(|| format!("round {round}: a closed count that is not a number"))
    }

    async fn wait_keys(&mut self, keys: &[&str], timeout: Duration) -> anyhow::Result<()> {
        self.client
            .wait(keys, timeout.max(Duration::from_millis(1)))
            .await
            .map_err(anyhow::Error::from)
    }

    /// Reports how this node's workers ended and returns the round's outcome once it is known.
    pub async fn finish(
        &mut self,
        plan: &RoundPlan,
        local: LocalEnd,
    ) -> anyhow::Result<RoundOutcome> {
        let outcome = self.key(plan.round, "outcome");
        match local {
            LocalEnd::Succeeded => {
                let done = self
                    .client
                    .add(&self.key(plan.round, "succeeded"), 1)
                    .await?;
                if done >= i64::from(plan.nnodes) {
                    self.client.compare_set(&outcome, b"", b"succeeded").await?;
                }
            }
            LocalEnd::Failed => {
                let value = format!("failed {} {}", plan.node_rank, self.host);
                self.client
                    .compare_set(&outcome, b"", value.as_bytes())
                    .await?;
            }
            LocalEnd::Stopped => {
                let value = format!("stopped {} {}", plan.node_rank, self.host);
                self.client
                    .compare_set(&outcome, b"", value.as_bytes())
                    .await?;
            }
        }
        wait_forever(&mut self.client, &outcome).await?;
        let result = RoundOutcome::parse(&self.client.get(&outcome).await?);
        // The exit barrier: the last launcher to read the outcome says so, and the launcher that
        // serves the store waits for that before it stops serving
        // ([`Rendezvous::wait_every_node_finished`]).
        let read = self
            .client
            .add(&self.key(plan.round, "outcome_read"), 1)
            .await?;
        if read >= i64::from(plan.nnodes) {
            self.client
                .set(&self.key(plan.round, "outcome_read_by_all"), b"1")
                .await?;
        }
        Ok(result)
    }

    /// Waits, at most `timeout`, until every launcher of the round has read its outcome in
    /// [`Rendezvous::finish`]. The launcher that serves the store calls it before it exits, so
    /// no other launcher loses the store (a connection reset, exit 1) while it still reads how
    /// the run ended: torch's exit barrier.
    pub async fn wait_every_node_finished(
        &mut self,
        plan: &RoundPlan,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let key = self.key(plan.round, "outcome_read_by_all");
        self.wait_keys(&[&key], timeout).await.with_context(|| {
            format!(
                "not every one of the {} nodes read how round {} ended within {timeout:?}",
                plan.nnodes, plan.round
            )
        })
    }
}

/// How this node's workers ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalEnd {
    /// All exited 0.
    Succeeded,
    /// Some failed.
    Failed,
    /// The launcher was told to stop.
    Stopped,
}

/// Waits (on a connection of its own) until round `round` has an outcome that is not a success,
/// and returns it: the caller stops its workers then.
pub async fn watch_for_failure(
    endpoint: &str,
    run_id: &str,
    round: u32,
) -> anyhow::Result<RoundOutcome> {
    let mut client = StoreClient::connect(endpoint, Namespace::Control).await?;
    let key = format!("trainctl/run/{run_id}/r{round}/outcome");
    wait_forever(&mut client, &key).await?;
    Ok(RoundOutcome::parse(&client.get(&key).await?))
}

/// Waits for `key` however long it takes (a round may run for days), renewing the `WAIT` every
/// [`WAIT_SLICE`].
async fn wait_forever(client: &mut StoreClient, key: &str) -> anyhow::Result<()> {
    loop {
        match client.wait(&[key], WAIT_SLICE).await {
            Ok(()) => return Ok(()),
            Err(trainctl_store::StoreError::Timeout { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

async fn connect_retrying(endpoint: &str, timeout: Duration) -> anyhow::Result<StoreClient> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        match StoreClient::connect(endpoint, Namespace::Control).await {
            Ok(client) => return Ok(client),
            Err(e) if started.elapsed() >= timeout => {
                return Err(anyhow::Error::from(e).context(format!(
                    "could not reach the rendezvous store at {endpoint} within {timeout:?}: is the first node (--node-rank 0, or the --rdzv-endpoint host) running `trainctl run`?"
                )))
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c10d_rounds_close_at_max_or_after_the_last_call() {
        let s = Duration::from_secs;
        // (joined, min, max, min reached for, waited) -> decision; last call 30 s, join timeout 600 s.
        let rows = [
            (1, 2, 4, None, s(1), CloseDecision::Wait),
            (4, 2, 4, Some(s(0)), s(1), CloseDecision::Close(4)),
            (3, 2, 4, Some(s(10)), s(20), CloseDecision::Wait),
            (3, 2, 4, Some(s(30)), s(40), CloseDecision::Close(3)),
            (1, 2, 4, None, s(600), CloseDecision::TimedOut),
            (2, 2, 4, Some(s(5)), s(600), CloseDecision::Wait),
            (1, 1, 1, Some(s(0)), s(0), CloseDecision::Close(1)),
        ];
        for (joined, min, max, reached, waited, want) in rows {
            assert_eq!(
                close_decision(joined, min, max, reached, waited, s(30), s(600)),
                want,
                "joined {joined} of {min}:{max}, min reached for {reached:?}, waited {waited:?}"
            );
        }
    }

    #[test]
    fn ranks_are_contiguous_per_node() {
        assert_eq!(rank_layout(&[2, 2, 2], 0), (0, 6));
        assert_eq!(rank_layout(&[2, 2, 2], 2), (4, 6));
        assert_eq!(rank_layout(&[4, 1, 3], 2), (5, 8));
    }

    #[test]
    fn outcomes_read_back() {
        assert_eq!(RoundOutcome::parse(b"succeeded"), RoundOutcome::Succeeded);
        assert_eq!(
            RoundOutcome::parse(b"failed 1 host-b"),
            RoundOutcome::Failed("1 host-b".into())
        );
        assert_eq!(
            RoundOutcome::parse(b"stopped 0 host-a"),
            RoundOutcome::Stopped("0 host-a".into())
        );
        assert_eq!(
            RoundOutcome::parse(b"grow host-c"),
            RoundOutcome::Grow("host-c".into())
        );
    }

    #[tokio::test]
    async fn three_launchers_meet_and_one_failure_ends_the_round_for_all() {
        let server = trainctl_store::StoreServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            trainctl_store::StoreConfig::default(),
        )
        .await
        .unwrap();
        let endpoint = server.local_addr().to_string();
        let server = std::sync::Arc::new(server);
        let mut tasks = Vec::new();
        for node in 0..3u32 {
            let endpoint = endpoint.clone();
            let server = server.clone();
            tasks.push(tokio::spawn(async move {
                let mut rdzv = Rendezvous::connect(
                    &endpoint,
                    "t1",
                    &format!("host-{node}"),
                    Some(node),
                    3,
                    3,
                    Duration::from_secs(10),
                    Duration::from_secs(1),
                )
                .await
                .unwrap();
                let reset = move || server.reset_workers();
                let reset: &(dyn Fn() + Send + Sync) = &reset;
                let Joined::Plan(plan) = rdzv
                    .join(0, node + 1, Some(0), (node == 0).then_some(reset))
                    .await
                    .unwrap()
                else {
                    panic!("node {node} did not get a plan")
                };
                let end = if node == 1 {
                    LocalEnd::Failed
                } else {
                    LocalEnd::Succeeded
                };
                let finished = rdzv.finish(&plan, end).await.unwrap();
                (plan, finished)
            }));
        }
        let mut plans = Vec::new();
        for t in tasks {
            plans.push(t.await.unwrap());
        }
        // Workers 1 + 2 + 3 = 6, contiguous by node rank.
        let offsets: Vec<(u32, u32, u32)> = plans
            .iter()
            .map(|(p, _)| (p.node_rank, p.rank_offset, p.world_size))
            .collect();
        assert_eq!(offsets, [(0, 0, 6), (1, 1, 6), (2, 3, 6)]);
        for (_, outcome) in &plans {
            assert_eq!(outcome, &RoundOutcome::Failed("1 host-1".into()));
        }
    }
}
