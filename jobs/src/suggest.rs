//! "Did you mean ...?" for unknown keys: known aliases from other launchers, then edit distance,
//! then keys that belong in another table.

/// Every key the schema knows, as (table path, key); the root table's path is "".
pub(crate) const KNOWN_KEYS: &[(&str, &str)] = &[
    ("", "name"),
    ("", "launch"),
    ("", "resources"),
    ("", "failure"),
    ("", "checkpoint"),
    ("launch", "command"),
    ("launch", "workdir"),
    ("launch", "env"),
    ("resources", "nodes"),
    ("resources", "min_nodes"),
    ("resources", "procs_per_node"),
    ("resources", "gpus_per_node"),
    ("resources", "cpus_per_node"),
    ("resources", "memory_per_node_mib"),
    ("resources", "fabric"),
    ("failure", "max_restarts"),
    ("failure", "hang_timeout"),
    ("failure", "hang_timeout_ms"),
    ("checkpoint", "dir"),
    ("checkpoint", "signal"),
    ("checkpoint", "grace"),
    ("checkpoint", "grace_ms"),
    ("checkpoint", "keep"),
];

/// Names users bring from torchrun, Slurm, Kubernetes and Docker, as (alias, table path, key).
const ALIASES: &[(&str, &str, &str)] = &[
    ("job_name", "", "name"),
    ("cmd", "launch", "command"),
    ("argv", "launch", "command"),
    ("args", "launch", "command"),
    ("entrypoint", "launch", "command"),
    ("cwd", "launch", "workdir"),
    ("working_dir", "launch", "workdir"),
    ("workingdir", "launch", "workdir"),
    ("environment", "launch", "env"),
    ("env_vars", "launch", "env"),
    ("nnodes", "resources", "nodes"),
    ("num_nodes", "resources", "nodes"),
    ("hosts", "resources", "nodes"),
    ("nproc_per_node", "resources", "procs_per_node"),
    ("nprocs_per_node", "resources", "procs_per_node"),
    ("ntasks_per_node", "resources", "procs_per_node"),
    ("ranks_per_node", "resources", "procs_per_node"),
    ("procs", "resources", "procs_per_node"),
    ("gpus", "resources", "gpus_per_node"),
    ("num_gpus", "resources", "gpus_per_node"),
    ("cpus", "resources", "cpus_per_node"),
    ("num_cpus", "resources", "cpus_per_node"),
    ("memory", "resources", "memory_per_node_mib"),
    ("mem", "resources", "memory_per_node_mib"),
    ("memory_mib", "resources", "memory_per_node_mib"),
    ("memory_per_node", "resources", "memory_per_node_mib"),
    ("network", "resources", "fabric"),
    ("interconnect", "resources", "fabric"),
    ("rdma", "resources", "fabric"),
    ("restarts", "failure", "max_restarts"),
    ("retries", "failure", "max_restarts"),
    ("max_retries", "failure", "max_restarts"),
    ("min_nnodes", "resources", "min_nodes"),
    ("min_hosts", "resources", "min_nodes"),
    ("nodes_min", "resources", "min_nodes"),
    ("max_nodes", "resources", "nodes"),
    ("timeout", "failure", "hang_timeout"),
    ("hang_timeout_s", "failure", "hang_timeout"),
    ("watchdog_timeout", "failure", "hang_timeout"),
    ("progress_timeout", "failure", "hang_timeout"),
    ("ckpt", "", "checkpoint"),
    ("checkpointing", "", "checkpoint"),
    ("checkpoint_dir", "checkpoint", "dir"),
    ("ckpt_dir", "checkpoint", "dir"),
    ("path", "checkpoint", "dir"),
    ("directory", "checkpoint", "dir"),
    ("save_dir", "checkpoint", "dir"),
    ("stop_signal", "checkpoint", "signal"),
    ("grace_period", "checkpoint", "grace"),
    ("grace_period_ms", "checkpoint", "grace_ms"),
    ("keep_last", "checkpoint", "keep"),
    ("max_to_keep", "checkpoint", "keep"),
    ("save_total_limit", "checkpoint", "keep"),
    ("keep_last_n", "checkpoint", "keep"),
];

/// The hint for an unknown `key` found in the table at `table` ("" for the root), e.g.
/// "did you mean `command`?", or `None` when nothing is close.
pub(crate) fn did_you_mean(table: &str, key: &str) -> Option<String> {
    let lower = key.to_ascii_lowercase().replace('-', "_");
    let (home, canonical) = ALIASES
        .iter()
        .find(|(alias, _, _)| *alias == lower)
        .map(|&(_, t, k)| (t, k))
        .or_else(|| closest(table, &lower).map(|k| (table, k)))
        .or_else(|| {
            KNOWN_KEYS
                .iter()
                .find(|(t, k)| *t != table && *k == lower)
                .copied()
        })?;
    Some(if home == table {
        format!("did you mean `{canonical}`?")
    } else if home.is_empty() {
        format!(
            "did you mean the top-level `{canonical}`? top-level keys go before the first [table] header"
        )
    } else {
        format!("did you mean `{canonical}` in the [{home}] table?")
    })
}

/// The known key of `table` closest to `key`, if it is close enough to be a typo.
fn closest(table: &str, key: &str) -> Option<&'static str> {
    KNOWN_KEYS
        .iter()
        .filter(|(t, _)| *t == table)
        .map(|&(_, k)| (edit_distance(key, k), k))
        .filter(|&(d, k)| d <= (k.len().max(key.len()) / 3).max(1))
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k)
}

/// Edit distance counting an insertion, deletion, substitution or swap of two adjacent
/// characters as one edit (optimal string alignment), so "nmae" is one edit from "name".
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // d[i][j]: distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("comand", "command"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("nmae", "name"), 1);
    }

    #[test]
    fn suggestions() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("launch", "comand", Some("did you mean `command`?")),
            ("launch", "Command", Some("did you mean `command`?")),
            ("resources", "node", Some("did you mean `nodes`?")),
            ("resources", "nproc_per_node", Some("`procs_per_node`?")),
            ("resources", "gpus", Some("`gpus_per_node`?")),
            ("", "nodes", Some("`nodes` in the [resources] table")),
            ("launch", "name", Some("the top-level `name`")),
            ("", "resource", Some("did you mean `resources`?")),
            ("launch", "image", None),
            ("resources", "xyz", None),
            ("resources", "fabrc", Some("did you mean `fabric`?")),
            ("resources", "interconnect", Some("did you mean `fabric`?")),
            ("", "fabric", Some("`fabric` in the [resources] table")),
            ("resources", "min_nnodes", Some("did you mean `min_nodes`?")),
            (
                "failure",
                "hang_timout",
                Some("did you mean `hang_timeout`?"),
            ),
            ("failure", "timeout", Some("did you mean `hang_timeout`?")),
            ("checkpoint", "max_to_keep", Some("did you mean `keep`?")),
            ("checkpoint", "path", Some("did you mean `dir`?")),
            ("checkpoint", "grace_period", Some("did you mean `grace`?")),
            ("", "ckpt", Some("did you mean `checkpoint`?")),
            ("", "checkpoints", Some("did you mean `checkpoint`?")),
            ("", "dir", Some("`dir` in the [checkpoint] table")),
            (
                "launch",
                "save_dir",
                Some("`dir` in the [checkpoint] table"),
            ),
        ];
        for &(table, key, want) in cases {
            let got = did_you_mean(table, key);
            match want {
                Some(w) => assert!(
                    got.as_deref().is_some_and(|g| g.contains(w)),
                    "{table}.{key}: got {got:?}, want {w:?}"
                ),
                None => assert_eq!(got, None, "{table}.{key}"),
            }
        }
    }
}
