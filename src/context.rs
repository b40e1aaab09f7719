//! Where the CLI finds a coordinator and its credentials, as kubectl finds a cluster in its
//! kubeconfig: flags and environment first, then a context from the config file.
//!
//! The config file is `$TRAINCTL_CONFIG`, else `$XDG_CONFIG_HOME/trainctl/config.toml`, else
//! `~/.config/trainctl/config.toml`:
//!
//! ```toml
//! current = "dev"
//! [contexts.dev]
//! server = "https://127.0.0.1:7470"
//! ca_cert = "/tmp/trainctl-dev/coordinator/tls/ca.pem"
//! token_file = "/tmp/trainctl-dev/coordinator/admin.token"   # or token = "tctl_..."
//! ```
//!
//! `trainctl dev` writes its context there (and makes it current), so the CLI reaches the dev
//! cluster with no flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

/// Where the CLI looks when nothing names a coordinator.
pub const DEFAULT_SERVER: &str = "https://127.0.0.1:7470";

/// The config file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The context used when none is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, ClusterContext>,
}

/// How to reach one cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterContext {
    /// The coordinator's URL (`https://host:port`).
    pub server: String,
    /// The cluster CA (PEM file) that signed the coordinator's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// A token, inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A file holding the token (read at each use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// Everything a client needs to reach a coordinator.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// `https://host:port` or `http://host:port`.
    pub server: String,
    pub token: Option<String>,
    /// The CA to trust (PEM text); without it, HTTPS trusts the system's roots.
    pub ca_pem: Option<String>,
}

/// The config file's path.
pub fn config_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TRAINCTL_CONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("trainctl").join("config.toml")
}

/// Reads the config file; an absent file is an empty one.
pub fn load(path: &Path) -> anyhow::Result<ConfigFile> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("read {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Saves `context` as `name` in the config file at `path` (created 0600) and makes it current.
pub fn save(path: &Path, name: &str, context: ClusterContext) -> anyhow::Result<()> {
    let mut file = load(path)?;
    file.contexts.insert(name.to_string(), context);
    file.current = Some(name.to_string());
    let text = toml::to_string(&file).context("encode the config file")?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    trainctl_tls::write_private_file(path, text.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

/// Points context `name` at `servers` (URLs), leaving everything else (and which context is
/// current) as it is; `false` when there is no such context or nothing changed.
pub fn update_servers(path: &Path, name: &str, servers: &[String]) -> anyhow::Result<bool> {
    let mut file = load(path)?;
    let Some(context) = file.contexts.get_mut(name) else {
        return Ok(false);
    };
    let joined = servers.join(",");
    if servers.is_empty() || context.server == joined {
        return Ok(false);
    }
    context.server = joined;
    let current = file.current.clone();
    let context = context.clone();
    save(path, name, context)?;
    // `save` makes the context current; put back the one that was.
    let mut file = load(path)?;
    file.current = current;
    let text = toml::to_string(&file).context("encode the config file")?;
    trainctl_tls::write_private_file(path, text.as_bytes())
        .with_context(|| format!("write {}", path.display()))?;
    Ok(true)
}

/// `host:port` → a URL: HTTPS unless it names `http://`. A comma-separated list (the
/// coordinators of one cluster) becomes a list of URLs.
pub fn server_url(addr: &str) -> String {
    addr.split(',')
        .map(|a| a.trim().trim_end_matches('/'))
        .filter(|a| !a.is_empty())
        .map(|a| {
            if a.contains("://") {
                a.to_string()
            } else {
                format!("https://{a}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The hosts and ports of a server URL list, for comparing addresses written different ways.
fn authorities(urls: &str) -> std::collections::BTreeSet<&str> {
    urls.split(',')
        .map(|url| {
            let rest = url.split_once("://").map_or(url, |(_, r)| r);
            rest.split('/').next().unwrap_or(rest)
        })
        .collect()
}

/// What flags and environment said (each `None` when not given).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub addr: Option<String>,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub context: Option<String>,
}

/// The connection the CLI uses: flags and environment win; a context (named, or the current
/// one) fills in the rest. A context's credentials are used only for its own server, so a
/// token never goes to a coordinator it was not made for.
pub fn resolve(
    overrides: &Overrides,
    file: &ConfigFile,
    path: &Path,
) -> anyhow::Result<Connection> {
    let context = match &overrides.context {
        Some(name) => Some(file.contexts.get(name).with_context(|| {
            format!(
                "no context named `{name}` in {} (known: {})",
                path.display(),
                file.contexts.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?),
        None => file.current.as_ref().and_then(|c| file.contexts.get(c)),
    };
    let server = match (&overrides.addr, context) {
        (Some(addr), _) => server_url(addr),
        (None, Some(c)) => server_url(&c.server),
        (None, None) => DEFAULT_SERVER.to_string(),
    };
    // The context's credentials, if they belong to this server (or the context was named).
    let context = context.filter(|c| {
        // Any of the context's coordinators (a cluster's members share its credentials).
        overrides.context.is_some()
            || authorities(&server).is_subset(&authorities(&server_url(&c.server)))
    });
    let token = match (&overrides.token, context) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(c)) => match (&c.token, &c.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| {
                        format!(
                            "read the token file {} (from {})",
                            f.display(),
                            path.display()
                        )
                    })?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        },
        (None, None) => None,
    };
    let ca_path = overrides
        .ca_cert
        .clone()
        .or_else(|| context.and_then(|c| c.ca_cert.clone()));
    let ca_pem = match ca_path {
        Some(p) => Some(
            std::fs::read_to_string(&p)
                .with_context(|| format!("read the CA certificate {}", p.display()))?,
        ),
        None => None,
    };
    if server.split(',').any(|s| s.starts_with("http://"))
        && token.is_some()
        && overrides.token.is_none()
    {
        bail!("refusing to send the token of context to {server} over plain HTTP; use https://");
    }
    Ok(Connection {
        server,
        token,
        ca_pem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> (tempfile::TempDir, ConfigFile, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("admin.token");
        std::fs::write(&token_file, "tctl_from_file\n").unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "CA PEM").unwrap();
        let mut f = ConfigFile {
            current: Some("dev".into()),
            ..Default::default()
        };
        f.contexts.insert(
            "dev".into(),
            ClusterContext {
                server: "https://127.0.0.1:7470".into(),
                ca_cert: Some(ca),
                token: None,
                token_file: Some(token_file),
            },
        );
        f.contexts.insert(
            "prod".into(),
            ClusterContext {
                server: "https://prod:7470".into(),
                token: Some("tctl_prod".into()),
                ..Default::default()
            },
        );
        let path = dir.path().join("config.toml");
        (dir, f, path)
    }

    #[test]
    fn flags_win_and_contexts_fill_in_only_for_their_own_server() {
        let (_dir, f, path) = file();
        let table: &[(Overrides, &str, Option<&str>, bool)] = &[
            // Nothing given: the current context, whole.
            (
                Overrides::default(),
                "https://127.0.0.1:7470",
                Some("tctl_from_file"),
                true,
            ),
            // The same server written bare: still the context's credentials.
            (
                Overrides {
                    addr: Some("127.0.0.1:7470".into()),
                    ..Default::default()
                },
                "https://127.0.0.1:7470",
                Some("tctl_from_file"),
                true,
            ),
            // Another server: none of the current context's credentials go there.
            (
                Overrides {
                    addr: Some("10.0.0.9:7470".into()),
                    ..Default::default()
                },
                "https://10.0.0.9:7470",
                None,
                false,
            ),
            // A named context.
            (
                Overrides {
                    context: Some("prod".into()),
                    ..Default::default()
                },
                "https://prod:7470",
                Some("tctl_prod"),
                false,
            ),
            // A token flag wins.
            (
                Overrides {
                    token: Some("tctl_flag".into()),
                    ..Default::default()
                },
                "https://127.0.0.1:7470",
                Some("tctl_flag"),
                true,
            ),
        ];
        for (overrides, server, token, has_ca) in table {
            let c = resolve(overrides, &f, &path).unwrap();
            assert_eq!(c.server, *server, "{overrides:?}");
            assert_eq!(c.token.as_deref(), *token, "{overrides:?}");
            assert_eq!(c.ca_pem.is_some(), *has_ca, "{overrides:?}");
        }
        let e = resolve(
            &Overrides {
                context: Some("nope".into()),
                ..Default::default()
            },
            &f,
            &path,
        )
        .unwrap_err();
        assert!(e.to_string().contains("no context named `nope`"), "{e}");
    }

    #[test]
    fn no_file_means_the_default_server() {
        let c = resolve(
            &Overrides::default(),
            &ConfigFile::default(),
            Path::new("/nonexistent"),
        )
        .unwrap();
        assert_eq!(c.server, DEFAULT_SERVER);
        assert!(c.token.is_none());
    }

    #[test]
    fn save_then_load_round_trips_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, f, path) = file();
        let dev = f.contexts["dev"].clone();
        save(&path, "dev", dev.clone()).unwrap();
        save(
            &path,
            "other",
            ClusterContext {
                server: "https://x:1".into(),
                ..Default::default()
            },
        )
        .unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.current.as_deref(), Some("other"));
        assert_eq!(back.contexts["dev"], dev);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
