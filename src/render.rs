//! Human-readable output of the CLI: tables and job details, in kubectl/Nomad style.

use std::borrow::Cow;
use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use trainctl_coordinator::api::access::{AuditView, TokenView};
use trainctl_coordinator::api::cluster::ClusterView;
use trainctl_coordinator::api::{
    AllocationView, AttemptView, CheckpointView, GpuView, JobDetail, JobSummary, NodeView,
};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// "3s", "4m", "2h", "5d".
fn age(since_ms: u64) -> String {
    let s = now_ms().saturating_sub(since_ms) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn duration(from_ms: u64, to_ms: u64) -> String {
    format!("{:.1}s", to_ms.saturating_sub(from_ms) as f64 / 1000.0)
}

/// Whether printing `c` raw could drive the terminal: C0 and C1 controls and DEL (a line break or
/// tab only where `in_cell`), and the bidirectional overrides that reorder what is shown.
fn unsafe_char(c: char, in_cell: bool) -> bool {
    (c.is_control() && (in_cell || !matches!(c, '\n' | '\t')))
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn escape(s: &str, in_cell: bool) -> Cow<'_, str> {
    if !s.chars().any(|c| unsafe_char(c, in_cell)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c, in_cell) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `s` with every character that could drive a terminal (ESC and the other C0/C1 controls, DEL,
/// bidi overrides) written as a Rust escape (`\u{1b}`); line breaks and tabs stay. Every string the
/// CLI prints that came from the network (names, reasons, messages, errors) goes through this, so a
/// node name or failure reason can never move the cursor, retitle the window or clear the screen.
/// Rank output (`logs`) is the user's own program's and is printed as it is, like `kubectl logs`.
pub fn terminal_safe(s: &str) -> Cow<'_, str> {
    escape(s, false)
}

/// Lays out rows in columns separated by two spaces. Cells are escaped ([`terminal_safe`], and
/// line breaks too) so that a cell is one line and the columns stay aligned.
pub(crate) fn table(rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<Cow<'_, str>>> = rows
        .iter()
        .map(|r| r.iter().map(|cell| escape(cell, true)).collect())
        .collect();
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{:<width$}  ", cell.as_ref(), width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The job listing.
pub fn job_table(jobs: &[JobSummary]) -> String {
    if jobs.is_empty() {
        return "no jobs\n".to_string();
    }
    let mut rows = vec![["ID", "NAME", "STATE", "GANG", "AGE", "DETAIL"]
        .map(String::from)
        .to_vec()];
    for j in jobs {
        rows.push(vec![
            j.id.clone(),
            j.name.clone(),
            j.state.clone(),
            format!("{}x{}", j.nodes, j.procs_per_node),
            age(j.submitted_at_ms),
            j.pending_reason
                .clone()
                .or_else(|| j.reason.clone())
                .unwrap_or_default(),
        ]);
    }
    table(&rows)
}

/// One line on where a job is: its state and why.
pub fn state_line(d: &JobDetail) -> String {
    let s = &d.summary;
    let line = match s.state.as_str() {
        "pending" => format!(
            "pending: {}",
            s.pending_reason.as_deref().unwrap_or("queued")
        ),
        "starting" | "running" => {
            let hosts: Vec<String> = d
                .allocation
                .iter()
                .map(|a| format!("{} ({})", a.node, a.address))
                .collect();
            format!(
                "{} on {}; rendezvous {}:{}",
                s.state,
                hosts.join(", "),
                d.master_addr.as_deref().unwrap_or("?"),
                d.master_port.unwrap_or(0)
            )
        }
        other => match &s.reason {
            Some(r) => format!("{other}: {r}"),
            None => other.to_string(),
        },
    };
    terminal_safe(&line).into_owned()
}

/// Checkpoints shown by `status`: the newest few.
const STATUS_CHECKPOINTS: usize = 3;

/// `word`, or `word` + "s" unless `n` is 1.
fn plural(n: u32, word: &str) -> String {
    if n == 1 {
        word.to_string()
    } else {
        format!("{word}s")
    }
}

/// `1 host`, `2 hosts`.
pub fn count(n: u32, word: &str) -> String {
    format!("{n} {}", plural(n, word))
}

/// The gang's size: `2 hosts x 1 rank = world size 2`, or for an elastic job
/// `2 of 2:4 hosts x 1 rank = world size 2`.
pub fn size_line(d: &JobDetail) -> String {
    let s = &d.summary;
    let [min, max] = d.node_range;
    let hosts = if min != max {
        format!("{} of {min}:{max} {}", d.current_nodes, plural(max, "host"))
    } else {
        count(d.current_nodes.max(s.nodes), "host")
    };
    let world = if min != max {
        d.current_nodes * s.procs_per_node
    } else {
        s.world_size
    };
    format!(
        "{hosts} x {} = world size {world}{}{}",
        count(s.procs_per_node, "rank"),
        if s.gpus_per_node > 0 {
            format!(", {} per host", count(s.gpus_per_node, "GPU"))
        } else {
            String::new()
        },
        if d.spec.resources.fabric.is_any() {
            String::new()
        } else {
            format!(
                ", every host on {} (fabric = \"{}\")",
                d.spec.resources.fabric.describe(),
                d.spec.resources.fabric
            )
        }
    )
}

/// Hosts whose rank environment `status` shows; `-o json` has them all.
const STATUS_ENV_HOSTS: usize = 4;

/// The GPU, NCCL and RDMA variables of the ranks on each host, with why; empty when there is nothing
/// to say (a CPU job: only `CUDA_VISIBLE_DEVICES=` hiding every GPU).
pub fn launch_env(d: &JobDetail) -> String {
    let says_something = |a: &&AllocationView| {
        a.launch_env
            .iter()
            .any(|e| !(e.name == "CUDA_VISIBLE_DEVICES" && e.value.as_deref() == Some("")))
    };
    let hosts: Vec<&AllocationView> = d.allocation.iter().filter(says_something).collect();
    let mut out = String::new();
    for a in hosts.iter().take(STATUS_ENV_HOSTS) {
        let _ = writeln!(out, "{}:", a.node);
        for e in &a.launch_env {
            let setting = match &e.value {
                Some(v) => format!("{}={v}", e.name),
                None => format!("{} unset", e.name),
            };
            let ranks = match e.local_ranks.as_slice() {
                [] => String::new(),
                [one] => format!(" [local rank {one}]"),
                many => format!(
                    " [local ranks {}]",
                    many.iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            let _ = writeln!(out, "  {setting}{ranks}: {}", e.reason);
        }
    }
    if hosts.len() > STATUS_ENV_HOSTS {
        let _ = writeln!(
            out,
            "and {} more hosts (all: trainctl status {} -o json)",
            hosts.len() - STATUS_ENV_HOSTS,
            d.summary.id
        );
    }
    out
}

/// The attempt history: one row per launch of the gang.
pub fn attempt_table(attempts: &[AttemptView]) -> String {
    let mut rows = vec![["ATTEMPT", "HOSTS", "WORLD", "STARTED", "DURATION", "END"]
        .map(String::from)
        .to_vec()];
    for a in attempts {
        rows.push(vec![
            a.attempt.to_string(),
            a.nodes.join(","),
            a.world_size.to_string(),
            format!("{} ago", age(a.started_at_ms)),
            match a.ended_at_ms {
                Some(end) => duration(a.started_at_ms, end),
                None => format!("{} (running)", duration(a.started_at_ms, now_ms())),
            },
            match a.end.as_deref() {
                None => "-".to_string(),
                Some(end) => match end.split_once('\n') {
                    // The rest (last output, traceback) is in `status`'s reason and in `logs --attempt`.
                    Some((first, _)) => format!("{first} (...)"),
                    None => end.to_string(),
                },
            },
        ]);
    }
    table(&rows)
}

/// A possibly multi-line text with every line after the first indented by `indent`.
pub fn indent_rest(text: &str, indent: &str) -> String {
    text.trim_end().replace('\n', &format!("\n{indent}"))
}

/// Committed checkpoints, newest first.
pub fn checkpoint_table(checkpoints: &[CheckpointView]) -> String {
    if checkpoints.is_empty() {
        return "no checkpoints committed\n".to_string();
    }
    let mut rows = vec![["STEP", "ATTEMPT", "AGE", "PATH", "METRICS"]
        .map(String::from)
        .to_vec()];
    for c in checkpoints.iter().rev() {
        rows.push(vec![
            c.step.to_string(),
            c.attempt.to_string(),
            age(c.committed_at_ms),
            c.path.clone(),
            c.metrics
                .as_ref()
                .filter(|m| !m.is_null())
                .map(|m| m.to_string())
                .unwrap_or_default(),
        ]);
    }
    table(&rows)
}

/// Everything about one job.
pub fn job_detail(d: &JobDetail) -> String {
    let s = &d.summary;
    let mut out = String::new();
    let _ = writeln!(out, "job {} ({}): {}", s.id, s.name, s.state);
    if let Some(r) = &s.pending_reason {
        let _ = writeln!(out, "  waiting: {r}");
    }
    if let Some(r) = &s.reason {
        let _ = writeln!(out, "  reason: {}", indent_rest(r, "    "));
    }
    let _ = writeln!(out, "  gang: {}", size_line(d));
    let _ = writeln!(
        out,
        "  restarts: {}/{} (rank failures and hangs count; host losses, resizes and drains do not)",
        d.restarts, d.max_restarts
    );
    if let Some(r) = &d.resume_from {
        let _ = writeln!(
            out,
            "  started from: step {} of job {} ({})",
            r.step,
            r.job.as_deref().unwrap_or("?"),
            r.path
        );
    }
    let _ = writeln!(out, "  command: {:?}", d.spec.launch.command);
    match (s.started_at_ms, s.finished_at_ms) {
        (Some(a), Some(b)) => {
            let _ = writeln!(
                out,
                "  ran for {} (queued {})",
                duration(a, b),
                duration(s.submitted_at_ms, a)
            );
        }
        (Some(a), None) => {
            let _ = writeln!(out, "  started {} ago", age(a));
        }
        _ => {
            let _ = writeln!(out, "  submitted {} ago", age(s.submitted_at_ms));
        }
    }
    if let (Some(addr), Some(port)) = (&d.master_addr, d.master_port) {
        let _ = writeln!(
            out,
            "  rendezvous: MASTER_ADDR={addr} MASTER_PORT={port}, attempt {}",
            d.attempt
        );
    }
    if !d.ranks.is_empty() {
        let mut rows = vec![["RANK", "HOST", "LOCAL", "STATE", "EXIT", "PID", "MESSAGE"]
            .map(String::from)
            .to_vec()];
        for r in &d.ranks {
            rows.push(vec![
                r.rank.to_string(),
                r.node.clone(),
                r.local_rank.to_string(),
                r.state.clone(),
                r.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                // A multi-line message (the last output) is in full in the reason above, and a
                // message the reason already quotes is not repeated.
                r.message
                    .as_deref()
                    .map(|m| match m.split_once('\n') {
                        _ if !m.is_empty()
                            && s.reason.as_deref().is_some_and(|x| x.contains(m)) =>
                        {
                            "(in the reason above)".to_string()
                        }
                        Some((first, _)) => format!("{first} (...)"),
                        None => m.to_string(),
                    })
                    .unwrap_or_default(),
            ]);
        }
        for line in table(&rows).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    let env = launch_env(d);
    if !env.is_empty() {
        let _ = writeln!(
            out,
            "  rank environment (GPU, NCCL, RDMA; a job's own launch.env wins):"
        );
        for line in env.lines() {
            let _ = writeln!(out, "    {line}");
        }
    }
    if !d.attempts.is_empty() {
        let _ = writeln!(out, "  attempts:");
        for line in attempt_table(&d.attempts).lines() {
            let _ = writeln!(out, "    {line}");
        }
        // The newest attempt that failed with more to say than one line: say it in full.
        let last_failure = d.attempts.iter().rev().find_map(|a| {
            a.end
                .as_deref()
                .filter(|e| e.contains('\n') && s.reason.as_deref() != Some(*e))
                .map(|e| (a.attempt, e))
        });
        if let Some((attempt, end)) = last_failure {
            let _ = writeln!(
                out,
                "  attempt {attempt} ended: {}",
                indent_rest(end, "    ")
            );
        }
    }
    if d.spec.checkpoint.is_some() || !d.checkpoints.is_empty() {
        let shown = d.checkpoints.len().min(STATUS_CHECKPOINTS);
        let _ = writeln!(
            out,
            "  checkpoints: {} committed{}",
            d.checkpoints.len(),
            if shown < d.checkpoints.len() {
                format!(
                    ", newest {shown} shown (all: `trainctl checkpoints {}`)",
                    s.id
                )
            } else {
                String::new()
            }
        );
        if shown > 0 {
            let newest = &d.checkpoints[d.checkpoints.len() - shown..];
            for line in checkpoint_table(newest).lines() {
                let _ = writeln!(out, "    {line}");
            }
        }
    }
    terminal_safe(&out).into_owned()
}

/// Nodes whose GPUs and RDMA ports `trainctl nodes` lists under the table; past this many, it
/// points at `-o json` instead, so the listing of a large cluster stays one line a node.
pub const DEVICE_LISTING_NODES_MAX: usize = 16;

/// The node listing: one row a node, then (for up to [`DEVICE_LISTING_NODES_MAX`] nodes) a table
/// of GPUs and one of RDMA ports, each saying plainly when no node has any.
pub fn node_table(nodes: &[NodeView]) -> String {
    if nodes.is_empty() {
        return "no nodes: start an agent with `trainctl agent --coordinator ADDR --data-dir DIR`\n".to_string();
    }
    let mut rows = vec![[
        "NAME", "ADDRESS", "STATUS", "CPUS", "MEMORY", "GPUS", "FABRIC", "CONTAIN", "JOBS",
    ]
    .map(String::from)
    .to_vec()];
    for n in nodes {
        let mut status = match &n.status_reason {
            Some(r) if n.status != "up" => format!("{} ({r})", n.status),
            _ => n.status.clone(),
        };
        if n.drained {
            status.push_str(",DRAINED");
        }
        if n.unhealthy.is_some() {
            status.push_str(",UNHEALTHY");
        }
        rows.push(vec![
            n.name.clone(),
            n.address.clone(),
            status,
            format!("{}/{}", n.cpus_allocated, n.cpus),
            format!(
                "{}/{} GiB",
                n.memory_allocated_mib / 1024,
                n.memory_mib / 1024
            ),
            if n.gpus == 0 {
                "none".to_string()
            } else {
                format!("{}/{} {}", n.gpus_allocated, n.gpus, n.gpu_models.join(","))
            },
            fabric_column(n),
            contain_column(&n.containment),
            if n.jobs.is_empty() {
                "-".to_string()
            } else {
                n.jobs.join(",")
            },
        ]);
    }
    let mut out = table(&rows);
    // Why each unhealthy node failed its pre-flight: too long for a column.
    for n in nodes {
        if let Some(reason) = &n.unhealthy {
            out.push_str(&format!(
                "{} is unhealthy (no new work until its pre-flight passes): {}\n",
                n.name,
                terminal_safe(reason)
            ));
        }
    }
    if nodes.len() > DEVICE_LISTING_NODES_MAX {
        out.push_str(&format!(
            "\nGPUs and RDMA ports of {} nodes: trainctl nodes -o json\n",
            nodes.len()
        ));
        return out;
    }
    out.push('\n');
    out.push_str(&gpu_table(nodes));
    out.push('\n');
    out.push_str(&rdma_table(nodes));
    out
}

/// The FABRIC column: the fabrics of the ACTIVE ports, with how many ports of how many are
/// ACTIVE; `none` without RDMA devices; `-` from a coordinator that does not report it.
fn fabric_column(n: &NodeView) -> String {
    let ports: Vec<_> = n.rdma_devices.iter().flat_map(|d| &d.ports).collect();
    if n.rdma_devices.is_empty() {
        return if n.fabric.is_empty() && !n.rdma.is_empty() {
            format!("{} ports", n.rdma.len())
        } else {
            "none".to_string()
        };
    }
    let active = ports.iter().filter(|p| p.state == "ACTIVE").count();
    let words = match n.fabric.as_str() {
        "InfiniBand" => "IB",
        "RoCE" => "RoCE",
        "InfiniBand and RoCE" => "IB+RoCE",
        _ => "no active port",
    };
    format!("{words} {active}/{} up", ports.len())
}

/// A GPU's UUID cut to its first 8 hex digits (`GPU-3f2a1b4c`); other names as they are.
fn short_uuid(uuid: &str) -> String {
    match uuid.strip_prefix("GPU-") {
        Some(rest) => format!("GPU-{}", rest.chars().take(8).collect::<String>()),
        None => uuid.to_string(),
    }
}

/// The GPUs of every node: model, memory, short UUID, NUMA node, nearest RDMA devices and
/// anything that needs attention (MIG on, ECC off, retired pages, uncorrectable errors).
fn gpu_table(nodes: &[NodeView]) -> String {
    if nodes.iter().all(|n| n.gpu_devices.is_empty()) {
        return "no GPUs on any node\n".to_string();
    }
    let mut rows = vec![[
        "NODE",
        "GPU",
        "MODEL",
        "MEMORY",
        "UUID",
        "NUMA",
        "NEAREST NIC",
        "NOTES",
    ]
    .map(String::from)
    .to_vec()];
    for n in nodes {
        if n.gpu_devices.is_empty() {
            rows.push(vec![n.name.clone(), "none".to_string()]);
        }
        for g in &n.gpu_devices {
            rows.push(vec![
                n.name.clone(),
                format!("{}{}", g.index, if g.allocated { "*" } else { "" }),
                g.name.clone(),
                if g.memory_mib == 0 {
                    "-".to_string()
                } else {
                    format!("{} GiB", g.memory_mib / 1024)
                },
                short_uuid(&g.uuid),
                g.numa_node.map_or("-".to_string(), |n| n.to_string()),
                nearest_nics(g),
                gpu_notes(g),
            ]);
        }
    }
    let mut out = table(&rows);
    out.push_str("(* held by a job)\n");
    out
}

/// The RDMA devices nearest a GPU: `mlx5_0 PIX`, `mlx5_0,mlx5_1 NODE`; `-` when unknown.
fn nearest_nics(g: &GpuView) -> String {
    let Some(best) = g.nic_affinity.first() else {
        return "-".to_string();
    };
    let names: Vec<&str> = g
        .nic_affinity
        .iter()
        .filter(|a| a.link == best.link)
        .map(|a| a.rdma_device.as_str())
        .collect();
    format!("{} {}", names.join(","), best.link)
}

fn gpu_notes(g: &GpuView) -> String {
    let mut notes = Vec::new();
    if g.mig_mode == "enabled" {
        notes.push("MIG on".to_string());
    }
    if g.ecc_mode == "disabled" {
        notes.push("ECC off".to_string());
    }
    if g.retired_pages_pending {
        notes.push("retired pages pending (reset the GPU)".to_string());
    }
    if g.uncorrectable_ecc_errors > 0 {
        notes.push(format!(
            "{} uncorrectable ECC errors",
            g.uncorrectable_ecc_errors
        ));
    }
    if !g.nvlink_peers.is_empty() {
        notes.push(format!("NVLink to {}", g.nvlink_peers.len()));
    }
    if notes.is_empty() {
        "-".to_string()
    } else {
        notes.join(", ")
    }
}

/// The RDMA ports of every node: state, link layer, rate, netdev (RoCE), NUMA node, and the
/// RoCE v2 GID indexes.
fn rdma_table(nodes: &[NodeView]) -> String {
    if nodes.iter().all(|n| n.rdma_devices.is_empty()) {
        return "no RDMA devices on any node\n".to_string();
    }
    let mut rows = vec![[
        "NODE",
        "PORT",
        "STATE",
        "LINK",
        "RATE",
        "NETDEV",
        "NUMA",
        "ROCE V2 GIDS",
    ]
    .map(String::from)
    .to_vec()];
    for n in nodes {
        if n.rdma_devices.is_empty() {
            rows.push(vec![n.name.clone(), "none".to_string()]);
        }
        for d in &n.rdma_devices {
            for p in &d.ports {
                let v2: Vec<String> = p
                    .gids
                    .iter()
                    .filter(|g| g.kind == "RoCE v2")
                    .map(|g| g.index.to_string())
                    .collect();
                rows.push(vec![
                    n.name.clone(),
                    format!("{}/{}", d.name, p.port),
                    p.state.clone(),
                    p.link_layer.clone(),
                    p.rate.clone(),
                    if p.netdev.is_empty() {
                        "-".to_string()
                    } else {
                        p.netdev.clone()
                    },
                    d.numa_node.map_or("-".to_string(), |n| n.to_string()),
                    if v2.is_empty() {
                        "-".to_string()
                    } else {
                        v2.join(",")
                    },
                ]);
            }
        }
    }
    table(&rows)
}

/// The CONTAIN column: `cgroup2 (cpu, memory)` as is; `process groups` without its reason (in
/// `-o json`); `-` from an agent that does not report it.
fn contain_column(containment: &str) -> String {
    match containment {
        "" => "-".to_string(),
        c if c.starts_with("process groups") => "process groups".to_string(),
        c => c.to_string(),
    }
}

/// `trainctl cluster`: a line on the leader, term and cluster id, then one row per member.
pub fn cluster(view: &ClusterView) -> String {
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    let leader = match &view.leader {
        Some(l) => format!("{} ({})", l.id, l.address),
        None => "none (an election is under way)".to_string(),
    };
    let mut out = terminal_safe(&format!(
        "leader {leader}, term {}, cluster {}\n",
        view.term,
        view.cluster_id.as_deref().unwrap_or("-")
    ))
    .into_owned();
    let mut rows = vec![["ID", "ADDRESS", "ROLE", "VOTER", "LAST INDEX", "LAG"]
        .map(String::from)
        .to_vec()];
    for m in &view.members {
        rows.push(vec![
            if m.this_server {
                format!("{} (this)", m.id)
            } else {
                m.id.to_string()
            },
            m.address.clone(),
            m.role.clone(),
            m.voter.to_string(),
            opt(m.last_log_index),
            opt(m.lag),
        ]);
    }
    out.push_str(&table(&rows));
    out
}

/// A moment as "in 3h" or "5m ago".
pub fn time_ms(at_ms: u64) -> String {
    let now = now_ms();
    if at_ms > now {
        let s = (at_ms - now) / 1000;
        match s {
            0..=119 => format!("in {s}s"),
            120..=7199 => format!("in {}m", s / 60),
            7200..=172_799 => format!("in {}h", s / 3600),
            _ => format!("in {}d", s / 86_400),
        }
    } else {
        format!("{} ago", age(at_ms))
    }
}

/// `trainctl token list`.
pub fn token_table(tokens: &[TokenView]) -> String {
    if tokens.is_empty() {
        return "no tokens\n".to_string();
    }
    let mut rows = vec![[
        "ID",
        "NAME",
        "ROLE",
        "NAMESPACE",
        "CREATED",
        "BY",
        "EXPIRES",
        "STATE",
        "NODES",
    ]
    .map(String::from)
    .to_vec()];
    for t in tokens {
        let state = match (t.revoked_at_ms, t.expires_at_ms) {
            (Some(at), _) => format!("revoked {}", time_ms(at)),
            (None, Some(at)) if at <= now_ms() => "expired".to_string(),
            _ => "active".to_string(),
        };
        rows.push(vec![
            t.id.clone(),
            t.name.clone(),
            t.role.clone(),
            t.namespace.clone().unwrap_or_else(|| "-".into()),
            age(t.created_at_ms),
            t.created_by.clone(),
            t.expires_at_ms.map_or_else(|| "never".into(), time_ms),
            state,
            if t.nodes.is_empty() {
                "-".into()
            } else {
                t.nodes.join(",")
            },
        ]);
    }
    table(&rows)
}

/// `trainctl audit`.
pub fn audit_table(entries: &[AuditView]) -> String {
    if entries.is_empty() {
        return "no changes recorded\n".to_string();
    }
    let mut rows = vec![["AGE", "BY", "ACTION", "OUTCOME"]
        .map(String::from)
        .to_vec()];
    for e in entries {
        rows.push(vec![
            age(e.at_ms),
            e.by.clone(),
            e.action.clone(),
            e.outcome.clone(),
        ]);
    }
    table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_from_the_network_cannot_drive_the_terminal() {
        let hostile = "node\x1b]0;owned\x07\x1b[2J\u{9b}31m\u{202e}x\x7f";
        let safe = terminal_safe(hostile);
        assert!(!safe.chars().any(|c| c.is_control()), "{safe}");
        assert!(safe.contains("\\u{1b}]0;owned"), "{safe}");
        // Line breaks stay in texts (a traceback), and are escaped in table cells.
        assert_eq!(terminal_safe("a\nb\tc"), "a\nb\tc");
        let text = table(&[
            vec!["NAME".into(), "REASON".into()],
            vec![hostile.into(), "lost\nsecond line\x1b[0m".into()],
        ]);
        assert!(!text.contains('\x1b'), "{text}");
        assert_eq!(text.lines().count(), 2, "{text}");
        let widths: Vec<usize> = text
            .lines()
            .map(|l| l.find("REASON").unwrap_or(0))
            .collect();
        assert!(
            text.lines()
                .nth(1)
                .unwrap()
                .contains("  lost\\nsecond line\\u{1b}[0m"),
            "{text}"
        );
        assert!(widths[0] > 0);
    }

    #[test]
    fn cluster_shows_the_leader_line_and_one_row_per_member() {
        use trainctl_coordinator::api::cluster::{MemberView, ServerRef};
        let member = |id: u64, role: &str, last: Option<u64>, lag: Option<u64>| MemberView {
            id,
            address: format!("10.0.0.{id}:7470"),
            role: role.into(),
            voter: role != "learner",
            this_server: id == 1,
            last_log_index: last,
            matched_index: None,
            lag,
        };
        let view = ClusterView {
            cluster_id: Some("abc".into()),
            this_server: 1,
            leader: Some(ServerRef {
                id: 1,
                address: "10.0.0.1:7470".into(),
            }),
            term: 3,
            last_log_index: Some(42),
            last_applied_index: Some(42),
            snapshot_index: None,
            membership_index: Some(1),
            millis_since_quorum_ack: Some(5),
            members: vec![
                member(1, "leader", Some(42), Some(0)),
                member(2, "learner", None, None),
            ],
        };
        let text = cluster(&view);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "leader 1 (10.0.0.1:7470), term 3, cluster abc");
        let words = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            words(lines[1]),
            ["ID", "ADDRESS", "ROLE", "VOTER", "LAST", "INDEX", "LAG"]
        );
        assert_eq!(
            words(lines[2]),
            ["1", "(this)", "10.0.0.1:7470", "leader", "true", "42", "0"]
        );
        assert_eq!(
            words(lines[3]),
            ["2", "10.0.0.2:7470", "learner", "false", "-", "-"]
        );
    }

    #[test]
    fn counts_are_plural_aware() {
        assert_eq!(count(1, "host"), "1 host");
        assert_eq!(count(2, "rank"), "2 ranks");
        assert_eq!(count(0, "GPU"), "0 GPUs");
    }

    #[test]
    fn attempt_table_shows_the_first_line_of_a_long_end() {
        let attempts = vec![
            AttemptView {
                attempt: 0,
                nodes: vec!["node-1".into(), "node-2".into()],
                world_size: 2,
                started_at_ms: 1_000,
                ended_at_ms: Some(3_500),
                end: Some("rank 1 on node-2 exited with code 1\nlast output:\n  boom".into()),
            },
            AttemptView {
                attempt: 1,
                nodes: vec!["node-1".into()],
                world_size: 1,
                started_at_ms: 4_000,
                ended_at_ms: Some(5_000),
                end: Some("succeeded".into()),
            },
        ];
        let text = attempt_table(&attempts);
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(text.contains("node-1,node-2  2      "), "{text}");
        assert!(
            text.contains("2.5s      rank 1 on node-2 exited with code 1 (...)"),
            "{text}"
        );
        assert!(!text.contains("boom"), "{text}");
        assert!(
            text.lines()
                .last()
                .unwrap()
                .ends_with("1.0s      succeeded"),
            "{text}"
        );
    }

    #[test]
    fn drained_nodes_say_so() {
        let node = |name: &str, drained: bool| NodeView {
            name: name.into(),
            address: "127.0.0.2".into(),
            hostname: "h".into(),
            status: "up".into(),
            status_reason: None,
            cpus: 2,
            cpus_allocated: 0,
            memory_mib: 1024,
            memory_allocated_mib: 0,
            gpus: 0,
            gpus_allocated: 0,
            gpu_models: vec![],
            rdma: vec![],
            jobs: vec![],
            drained,
            containment: if drained {
                "process groups (no cgroup2 mounted)".into()
            } else {
                "cgroup2 (cpu, memory)".into()
            },
            ..NodeView::default()
        };
        let text = node_table(&[node("node-1", false), node("node-2", true)]);
        assert!(text.contains(" cgroup2 (cpu, memory) "), "{text}");
        assert!(text.contains(" process groups "), "{text}");
        assert!(text.lines().nth(1).unwrap().contains(" up "), "{text}");
        assert!(
            text.lines().nth(2).unwrap().contains(" up,DRAINED "),
            "{text}"
        );
    }

    #[test]
    fn unhealthy_nodes_say_why() {
        let node = |name: &str, unhealthy: Option<&str>| NodeView {
            name: name.into(),
            status: "up".into(),
            unhealthy: unhealthy.map(str::to_string),
            ..NodeView::default()
        };
        let text = node_table(&[
            node("node-1", None),
            node(
                "node-2",
                Some("gpu-copy on GPU-1: host-to-device 0.9 GB/s is below 3 GB/s"),
            ),
        ]);
        assert!(text.lines().nth(1).unwrap().contains(" up "), "{text}");
        assert!(
            text.lines().nth(2).unwrap().contains(" up,UNHEALTHY "),
            "{text}"
        );
        assert!(
            text.contains("node-2 is unhealthy (no new work until its pre-flight passes): gpu-copy on GPU-1: host-to-device 0.9 GB/s is below 3 GB/s\n"),
            "{text}"
        );
        assert!(!text.contains("node-1 is unhealthy"), "{text}");
    }

    #[test]
    fn nodes_without_devices_say_so_plainly() {
        let node = NodeView {
            name: "laptop".into(),
            status: "up".into(),
            fabric: "no RDMA devices".into(),
            ..NodeView::default()
        };
        let text = node_table(&[node]);
        assert!(text.lines().nth(1).unwrap().contains(" none "), "{text}");
        assert!(text.contains("\nno GPUs on any node\n"), "{text}");
        assert!(text.contains("\nno RDMA devices on any node\n"), "{text}");
    }

    #[test]
    fn gpus_and_rdma_ports_are_listed_under_the_table() {
        use trainctl_coordinator::api::{
            NicAffinityView, RdmaDeviceView, RdmaGidView, RdmaPortView,
        };
        let gpu = |index: u32, uuid: &str| GpuView {
            index,
            uuid: uuid.into(),
            name: "NVIDIA H200".into(),
            memory_mib: 143_771,
            allocated: index == 0,
            numa_node: Some(index),
            nic_affinity: vec![
                NicAffinityView {
                    rdma_device: "mlx5_0".into(),
                    link: "PIX".into(),
                },
                NicAffinityView {
                    rdma_device: "mlx5_1".into(),
                    link: "SYS".into(),
                },
            ],
            retired_pages_pending: index == 1,
            ..GpuView::default()
        };
        let port = |state: &str, layer: &str, netdev: &str| RdmaPortView {
            port: 1,
            state: state.into(),
            link_layer: layer.into(),
            rate: "400 Gb/sec (4X NDR)".into(),
            netdev: netdev.into(),
            gid_count: 2,
            gids: vec![
                RdmaGidView {
                    index: 2,
                    gid: "fe80:0000:0000:0000:0000:0000:0000:0001".into(),
                    kind: "IB/RoCE v1".into(),
                },
                RdmaGidView {
                    index: 3,
                    gid: "fe80:0000:0000:0000:0000:0000:0000:0001".into(),
                    kind: "RoCE v2".into(),
                },
            ],
        };
        let gpu_host = NodeView {
            name: "gpu-1".into(),
            status: "up".into(),
            gpus: 2,
            gpus_allocated: 1,
            gpu_models: vec!["NVIDIA H200".into()],
            fabric: "RoCE".into(),
            gpu_devices: vec![
                gpu(0, "GPU-3f2a1b4c-0000-1111-2222-333344445555"),
                gpu(1, "GPU-99999999-0000-1111-2222-333344445555"),
            ],
            rdma_devices: vec![
                RdmaDeviceView {
                    name: "mlx5_0".into(),
                    numa_node: Some(0),
                    ports: vec![port("ACTIVE", "Ethernet", "eth2")],
                    ..RdmaDeviceView::default()
                },
                RdmaDeviceView {
                    name: "mlx5_1".into(),
                    ports: vec![port("DOWN", "Ethernet", "eth3")],
                    ..RdmaDeviceView::default()
                },
            ],
            ..NodeView::default()
        };
        let cpu_host = NodeView {
            name: "cpu-1".into(),
            status: "up".into(),
            fabric: "no RDMA devices".into(),
            ..NodeView::default()
        };
        let text = node_table(&[gpu_host, cpu_host]);
        let line = |start: &str| {
            text.lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .find(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no line `{start}` in\n{text}"))
        };
        assert!(
            line("gpu-1 ").contains(" 1/2 NVIDIA H200 RoCE 1/2 up "),
            "{text}"
        );
        assert!(line("cpu-1 ").contains(" none none "), "{text}");
        assert_eq!(
            line("gpu-1 0*"),
            "gpu-1 0* NVIDIA H200 140 GiB GPU-3f2a1b4c 0 mlx5_0 PIX -"
        );
        assert!(
            line("gpu-1 1 ").ends_with("retired pages pending (reset the GPU)"),
            "{text}"
        );
        assert_eq!(line("cpu-1 none"), "cpu-1 none");
        assert_eq!(
            line("gpu-1 mlx5_0/1"),
            "gpu-1 mlx5_0/1 ACTIVE Ethernet 400 Gb/sec (4X NDR) eth2 0 3"
        );
        assert!(line("gpu-1 mlx5_1/1").contains(" DOWN "), "{text}");
        assert!(!text.contains("no GPUs on any node"), "{text}");
    }

    #[test]
    fn a_large_cluster_lists_devices_in_json_only() {
        let nodes: Vec<NodeView> = (0..=DEVICE_LISTING_NODES_MAX)
            .map(|i| NodeView {
                name: format!("node-{i}"),
                status: "up".into(),
                ..NodeView::default()
            })
            .collect();
        let text = node_table(&nodes);
        assert!(
            text.contains("GPUs and RDMA ports of 17 nodes: trainctl nodes -o json"),
            "{text}"
        );
        assert!(!text.contains("no GPUs on any node"), "{text}");
    }

    #[test]
    fn checkpoints_are_listed_newest_first() {
        let ck = |step: u64| CheckpointView {
            path: format!("/ckpt/step-{step}"),
            step,
            committed_at_ms: now_ms(),
            attempt: 0,
            job: Some("1".into()),
            metrics: None,
        };
        let text = checkpoint_table(&[ck(10), ck(20)]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("20 "), "{text}");
        assert!(lines[2].starts_with("10 "), "{text}");
        assert_eq!(checkpoint_table(&[]), "no checkpoints committed\n");
    }

    /// A job's detail as a coordinator sends it, with `allocation` as given.
    fn detail_with(allocation: serde_json::Value, fabric: &str) -> JobDetail {
        serde_json::from_value(serde_json::json!({
            "id": "7", "name": "ddp", "state": "running", "nodes": 2, "procs_per_node": 2,
            "world_size": 4, "gpus_per_node": 2, "submitted_at_ms": 0, "started_at_ms": null,
            "finished_at_ms": null, "reason": null, "pending_reason": null,
            "attempt": 0, "master_addr": "10.0.0.1", "master_port": 29500,
            "allocation": allocation, "ranks": [], "restarts": 0, "max_restarts": 0,
            "current_nodes": 2, "node_range": [2, 2], "attempts": [], "checkpoints": [],
            "resume_from": null,
            "spec": {"name": "ddp", "launch": {"command": ["python3"], "workdir": null, "env": {}},
                     "resources": {"nodes": 2, "min_nodes": 2, "procs_per_node": 2,
                                   "gpus_per_node": 2, "cpus_per_node": 2,
                                   "memory_per_node_mib": 0, "fabric": fabric},
                     "failure": {"max_restarts": 0}}
        }))
        .unwrap()
    }

    fn share(node: &str, launch_env: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"node": node, "address": "10.0.0.1", "group_rank": 0, "gpus": [0, 1],
                           "cpus": 2, "memory_mib": 0, "released": false, "launch_env": launch_env})
    }

    #[test]
    fn status_shows_the_rank_environment_and_why() {
        let env = serde_json::json!([
            {"name": "CUDA_VISIBLE_DEVICES", "value": "GPU-a,GPU-b", "set_by": "trainctl",
             "reason": "the job's 2 GPUs on this host, by UUID"},
            {"name": "NCCL_IB_HCA", "value": "=mlx5_0:1", "set_by": "trainctl",
             "reason": "the ACTIVE InfiniBand port nearest GPU-a (PIX)", "local_ranks": [0]},
            {"name": "NCCL_IB_HCA", "value": "mlx5", "set_by": "job",
             "reason": "the job's launch.env sets it", "local_ranks": [1, 3]},
            {"name": "NCCL_IB_GID_INDEX", "value": null, "set_by": "unset",
             "reason": "NCCL picks one"}
        ]);
        let d = detail_with(serde_json::json!([share("node-1", env)]), "ib");
        let text = job_detail(&d);
        for line in [
            "  gang: 2 hosts x 2 ranks = world size 4, 2 GPUs per host, every host on InfiniBand (fabric = \"ib\")",
            "  rank environment (GPU, NCCL, RDMA; a job's own launch.env wins):",
            "    node-1:",
            "      CUDA_VISIBLE_DEVICES=GPU-a,GPU-b: the job's 2 GPUs on this host, by UUID",
            "      NCCL_IB_HCA==mlx5_0:1 [local rank 0]: the ACTIVE InfiniBand port nearest GPU-a (PIX)",
            "      NCCL_IB_HCA=mlx5 [local ranks 1, 3]: the job's launch.env sets it",
            "      NCCL_IB_GID_INDEX unset: NCCL picks one",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }

        // A CPU job: nothing to say, no section; an older coordinator sends no launch_env at all.
        let cpu = serde_json::json!([{"name": "CUDA_VISIBLE_DEVICES", "value": "",
            "set_by": "trainctl", "reason": "the job holds no GPU on this host"}]);
        let d = detail_with(serde_json::json!([share("node-1", cpu)]), "any");
        let text = job_detail(&d);
        assert!(!text.contains("rank environment"), "{text}");
        assert!(!text.contains("fabric"), "{text}");
        let mut old = share("node-1", serde_json::json!(null));
        old.as_object_mut().unwrap().remove("launch_env");
        assert!(launch_env(&detail_with(serde_json::json!([old]), "any")).is_empty());

        // Many hosts: the first few, and where the rest are.
        let hosts: Vec<serde_json::Value> = (0..6)
            .map(|i| {
                share(
                    &format!("node-{i}"),
                    serde_json::json!([{"name": "NCCL_SOCKET_IFNAME", "value": "=eth0",
                        "set_by": "trainctl", "reason": "r"}]),
                )
            })
            .collect();
        let text = launch_env(&detail_with(serde_json::Value::Array(hosts), "any"));
        assert_eq!(
            text.matches("NCCL_SOCKET_IFNAME==eth0: r").count(),
            4,
            "{text}"
        );
        assert!(
            text.ends_with("and 2 more hosts (all: trainctl status 7 -o json)\n"),
            "{text}"
        );
    }
}
