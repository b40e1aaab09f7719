//! Which RDMA ports a host claims, and what [`CHECK_RDMA_PORT`](super::CHECK_RDMA_PORT) says of
//! each port (pure).
//!
//! A host claims the ports it is expected to use, and only a claimed port that is not ACTIVE
//! fails the check: a dual-port card with one port never cabled, or a storage NIC training does
//! not use, must not keep a host out of placement forever.
//!
//! - Without `--rdma-ports`: the ports that were ACTIVE when the claim was made (the agent: its
//!   discovery at start; `trainctl preflight`: now), less those `--rdma-ignore` names.
//! - With `--rdma-ports`: exactly the ports named there (each must exist), less those
//!   `--rdma-ignore` names.
//!
//! Both options take `DEVICE` (every port of the device) or `DEVICE:PORT` entries, separated by
//! commas ([`PortOptions::parse`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::discovery::{RdmaDevice, RdmaPort};

/// The option naming the ports a host claims.
pub const PORTS_OPTION: &str = "--rdma-ports";
/// The option naming ports a host never claims.
pub const IGNORE_OPTION: &str = "--rdma-ignore";
/// What both options accept, for error messages and help.
pub const ACCEPTED_FORM: &str =
    "comma-separated DEVICE (every port of the device, e.g. mlx5_0) or DEVICE:PORT (one port, from 1, e.g. mlx5_0:1) entries";

/// One entry of [`PORTS_OPTION`] or [`IGNORE_OPTION`]: a device, or one port of it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortSelector {
    /// The device name under `/sys/class/infiniband`, e.g. `mlx5_0`.
    pub device: String,
    /// The port number (from 1); `None`: every port of the device.
    pub port: Option<u32>,
}

impl PortSelector {
    /// Whether this entry names port `port` of `device`.
    pub fn matches(&self, device: &str, port: u32) -> bool {
        self.device == device && self.port.is_none_or(|p| p == port)
    }
}

impl std::fmt::Display for PortSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.device),
            None => f.write_str(&self.device),
        }
    }
}

/// The operator's choice of claimed ports: [`PORTS_OPTION`] and [`IGNORE_OPTION`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortOptions {
    /// `--rdma-ports`: exactly these are claimed. `None`: the ports ACTIVE when the claim is made.
    pub ports: Option<Vec<PortSelector>>,
    /// `--rdma-ignore`: never claimed.
    pub ignore: Vec<PortSelector>,
}

/// A bad [`PORTS_OPTION`] or [`IGNORE_OPTION`], or one that does not fit this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortOptionError {
    /// An entry that is not `DEVICE` or `DEVICE:PORT`.
    #[error("{option}: `{entry}` {problem}; accepted: {ACCEPTED_FORM}")]
    BadEntry {
        /// [`PORTS_OPTION`] or [`IGNORE_OPTION`].
        option: &'static str,
        /// The entry as given.
        entry: String,
        /// What is wrong with it.
        problem: String,
    },
    /// `--rdma-ports` with no entry at all.
    #[error("{PORTS_OPTION} is empty: name at least one port ({ACCEPTED_FORM}); to claim none, leave it out and list the devices in {IGNORE_OPTION}")]
    Empty,
    /// A `--rdma-ports` entry naming no port of this host.
    #[error(
        "{PORTS_OPTION}: `{entry}` names no RDMA port of this host; its ports are: {existing}"
    )]
    Unknown {
        /// The entry.
        entry: String,
        /// Every port the host has (`mlx5_0:1 (ACTIVE), ...`), or `none (no RDMA device)`.
        existing: String,
    },
    /// A `--rdma-ports` entry whose every port `--rdma-ignore` excludes.
    #[error("{PORTS_OPTION}: `{entry}` is entirely excluded by {IGNORE_OPTION} `{ignored_by}`: drop one of them")]
    Contradicts {
        /// The `--rdma-ports` entry.
        entry: String,
        /// The `--rdma-ignore` entry that excludes it.
        ignored_by: String,
    },
}

impl PortOptions {
    /// Parses the two options' values (`None`: the option was not given). Entries are trimmed;
    /// empty entries between commas are left out; a repeated entry counts once.
    pub fn parse(
        ports: Option<&str>,
        ignore: Option<&str>,
    ) -> Result<PortOptions, PortOptionError> {
        let ports = match ports {
            None => None,
            Some(v) => {
                let list = parse_list(PORTS_OPTION, v)?;
                if list.is_empty() {
                    return Err(PortOptionError::Empty);
                }
                Some(list)
            }
        };
        let ignore = match ignore {
            None => Vec::new(),
            Some(v) => parse_list(IGNORE_OPTION, v)?,
        };
        Ok(PortOptions { ports, ignore })
    }
}

fn parse_list(option: &'static str, value: &str) -> Result<Vec<PortSelector>, PortOptionError> {
    let mut out: Vec<PortSelector> = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let selector = parse_entry(option, entry)?;
        if !out.contains(&selector) {
            out.push(selector);
        }
    }
    Ok(out)
}

fn parse_entry(option: &'static str, entry: &str) -> Result<PortSelector, PortOptionError> {
    let bad = |problem: &str| PortOptionError::BadEntry {
        option,
        entry: entry.to_string(),
        problem: problem.to_string(),
    };
    let (device, port) = match entry.split_once(':') {
        Some((d, p)) => (d, Some(p)),
        None => (entry, None),
    };
    if device.is_empty() {
        return Err(bad("has no device name before `:`"));
    }
    // Kernel device names are short words (mlx5_0, ibp59s0, rxe0): no `/`, no spaces, no dots.
    if !device
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(bad(
            "has a device name with characters other than letters, digits, `_` and `-`",
        ));
    }
    let port = match port {
        None => None,
        Some("") => return Err(bad("has no port number after `:`")),
        Some(p) => match p.parse::<u32>() {
            Ok(0) => return Err(bad("names port 0: ports are numbered from 1")),
            Ok(n) => Some(n),
            Err(_) => return Err(bad(&format!("has `{p}` where a port number belongs"))),
        },
    };
    Ok(PortSelector {
        device: device.to_string(),
        port,
    })
}

/// When the claim was made: what the reason of an unclaimed port says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClaimedAt {
    /// At the agent's start, from its first discovery: later runs compare against it.
    AgentStart,
    /// Now, from this run's discovery (`trainctl preflight`, which has no history).
    Now,
}

/// Why a port is not claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unclaimed {
    /// An [`IGNORE_OPTION`] entry names it.
    Ignored(PortSelector),
    /// [`PORTS_OPTION`] was given and does not name it.
    NotNamed,
    /// It was not ACTIVE at the agent's start.
    NotActiveAtStart,
    /// It was not on the host at the agent's start.
    AppearedAfterStart,
    /// It is not ACTIVE now (`trainctl preflight`, which has no history).
    NotActive,
}

impl Unclaimed {
    /// The reason a report gives.
    pub fn reason(&self) -> String {
        match self {
            Unclaimed::Ignored(entry) => format!("not claimed: excluded by {IGNORE_OPTION} {entry}"),
            Unclaimed::NotNamed => format!("not claimed: not named in {PORTS_OPTION}"),
            Unclaimed::NotActiveAtStart => format!(
                "not claimed: was not ACTIVE at agent start; name it in {PORTS_OPTION} to require it"
            ),
            Unclaimed::AppearedAfterStart => format!(
                "not claimed: appeared after agent start; name it in {PORTS_OPTION} to require it"
            ),
            Unclaimed::NotActive => format!("not ACTIVE (name it in {PORTS_OPTION} to require it)"),
        }
    }
}

/// A port as `(device, port)`.
pub type PortKey = (String, u32);

/// The ports a host claims ([`claim`]), and what is needed to say why another is not claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortClaim {
    /// The claimed ports.
    pub claimed: BTreeSet<PortKey>,
    /// Every port the host had when the claim was made, with its state then.
    pub seen: BTreeMap<PortKey, String>,
    /// The options the claim was made with.
    pub options: PortOptions,
    /// When it was made.
    pub at: ClaimedAt,
}

impl PortClaim {
    /// No port claimed and none seen: a host without RDMA devices, and tests.
    pub fn none(at: ClaimedAt) -> PortClaim {
        PortClaim {
            claimed: BTreeSet::new(),
            seen: BTreeMap::new(),
            options: PortOptions::default(),
            at,
        }
    }

    /// Whether port `port` of `device` is claimed.
    pub fn is_claimed(&self, device: &str, port: u32) -> bool {
        self.claimed.contains(&(device.to_string(), port))
    }

    /// Why port `port` of `device` is not claimed (meaningful only for an unclaimed port).
    pub fn unclaimed(&self, device: &str, port: u32) -> Unclaimed {
        if let Some(entry) = self.options.ignore.iter().find(|s| s.matches(device, port)) {
            return Unclaimed::Ignored(entry.clone());
        }
        if self.options.ports.is_some() {
            return Unclaimed::NotNamed;
        }
        let seen = self.seen.contains_key(&(device.to_string(), port));
        match (self.at, seen) {
            (ClaimedAt::AgentStart, true) => Unclaimed::NotActiveAtStart,
            (ClaimedAt::AgentStart, false) => Unclaimed::AppearedAfterStart,
            (ClaimedAt::Now, _) => Unclaimed::NotActive,
        }
    }

    /// `mlx5_0:1, mlx5_1:1`, or `none`: for logs.
    pub fn claimed_list(&self) -> String {
        if self.claimed.is_empty() {
            return "none".to_string();
        }
        self.claimed
            .iter()
            .map(|(d, p)| format!("{d}:{p}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Notes for the operator on the options (not failures): `--rdma-ignore` entries that match
    /// no port of the host when the claim was made.
    pub fn warnings(&self) -> Vec<String> {
        self.options
            .ignore
            .iter()
            .filter(|s| !self.seen.keys().any(|(d, p)| s.matches(d, *p)))
            .map(|s| format!("{IGNORE_OPTION}: `{s}` matches no RDMA port of this host"))
            .collect()
    }
}

fn is_active(state: &str) -> bool {
    state.eq_ignore_ascii_case("ACTIVE")
}

/// The ports a host claims (pure): with `options.ports`, exactly the ports its entries name
/// (an entry naming no port of `devices` is an error listing what exists); without, the ports of
/// `devices` that are ACTIVE; in both cases less those `options.ignore` names.
pub fn claim(
    devices: &[RdmaDevice],
    options: &PortOptions,
    at: ClaimedAt,
) -> Result<PortClaim, PortOptionError> {
    let seen: BTreeMap<PortKey, String> = devices
        .iter()
        .flat_map(|d| {
            d.ports
                .iter()
                .map(move |p| ((d.name.clone(), p.port), p.state.clone()))
        })
        .collect();
    let ignored = |(d, p): &PortKey| options.ignore.iter().any(|s| s.matches(d, *p));
    let claimed: BTreeSet<PortKey> = match &options.ports {
        None => seen
            .iter()
            .filter(|(k, state)| is_active(state) && !ignored(k))
            .map(|(k, _)| k.clone())
            .collect(),
        Some(entries) => {
            let mut claimed = BTreeSet::new();
            for entry in entries {
                let named: Vec<&PortKey> =
                    seen.keys().filter(|(d, p)| entry.matches(d, *p)).collect();
                if named.is_empty() {
                    return Err(PortOptionError::Unknown {
                        entry: entry.to_string(),
                        existing: existing(&seen),
                    });
                }
                let kept: Vec<&PortKey> = named.iter().copied().filter(|k| !ignored(k)).collect();
                if kept.is_empty() {
                    let (d, p) = named[0];
                    let by = options
                        .ignore
                        .iter()
                        .find(|s| s.matches(d, *p))
                        .map(ToString::to_string)
                        .unwrap_or_default();
                    return Err(PortOptionError::Contradicts {
                        entry: entry.to_string(),
                        ignored_by: by,
                    });
                }
                claimed.extend(kept.into_iter().cloned());
            }
            claimed
        }
    };
    Ok(PortClaim {
        claimed,
        seen,
        options: options.clone(),
        at,
    })
}

fn existing(seen: &BTreeMap<PortKey, String>) -> String {
    if seen.is_empty() {
        return "none (no RDMA device)".to_string();
    }
    seen.iter()
        .map(|((d, p), state)| {
            let state = if state.is_empty() {
                "unknown state"
            } else {
                state
            };
            format!("{d}:{p} ({state})")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the checks make of one port in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortStatus {
    /// Claimed and ACTIVE: passes, and gets a loopback write.
    Up,
    /// Claimed and not ACTIVE now: fails (a cable, switch port or subnet manager).
    Down {
        /// The state word now (may be empty: unknown).
        state: String,
    },
    /// Claimed, and no longer on the host at all (the device fell off the bus or its driver
    /// unloaded): fails.
    Gone,
    /// Not claimed: neither required nor written to; reported as skipped with the reason.
    Unclaimed(Unclaimed),
}

/// One port of a run: its subject (`mlx5_0 port 1`), where it is, and its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortVerdict<'a> {
    /// The device's name.
    pub device: String,
    /// The port number.
    pub port: u32,
    /// The port as discovered now; `None` for a [`PortStatus::Gone`] port.
    pub facts: Option<&'a RdmaPort>,
    /// What the checks make of it.
    pub status: PortStatus,
}

impl PortVerdict<'_> {
    /// The check's subject: `mlx5_0 port 1`.
    pub fn subject(&self) -> String {
        format!("{} port {}", self.device, self.port)
    }
}

/// Each port of `devices` (this run's discovery), in their order, then each claimed port that
/// is no longer there, with what the checks make of it (pure).
pub fn judge<'a>(claim: &PortClaim, devices: &'a [RdmaDevice]) -> Vec<PortVerdict<'a>> {
    let mut out: Vec<PortVerdict<'a>> = Vec::new();
    let mut present: BTreeSet<PortKey> = BTreeSet::new();
    for d in devices {
        for p in &d.ports {
            present.insert((d.name.clone(), p.port));
            let status = if !claim.is_claimed(&d.name, p.port) {
                PortStatus::Unclaimed(claim.unclaimed(&d.name, p.port))
            } else if is_active(&p.state) {
                PortStatus::Up
            } else {
                PortStatus::Down {
                    state: p.state.clone(),
                }
            };
            out.push(PortVerdict {
                device: d.name.clone(),
                port: p.port,
                facts: Some(p),
                status,
            });
        }
    }
    for (d, p) in claim.claimed.iter().filter(|k| !present.contains(*k)) {
        out.push(PortVerdict {
            device: d.clone(),
            port: *p,
            facts: None,
            status: PortStatus::Gone,
        });
    }
    out
}

/// Notes for the operator (not failures): each port that is not ACTIVE and not claimed, other
/// than those [`IGNORE_OPTION`] excludes on purpose (`mlx5_1 port 2 is DOWN: not ACTIVE (...)`).
pub fn unclaimed_down(verdicts: &[PortVerdict<'_>]) -> Vec<String> {
    verdicts
        .iter()
        .filter_map(|v| match (&v.status, v.facts) {
            (PortStatus::Unclaimed(why), Some(p))
                if !is_active(&p.state) && !matches!(why, Unclaimed::Ignored(_)) =>
            {
                let state = if p.state.is_empty() {
                    "in an unknown state"
                } else {
                    &p.state
                };
                Some(format!("{} is {state}: {}", v.subject(), why.reason()))
            }
            _ => None,
        })
        .collect()
}
