//! `trainctl token | audit | whoami | ca`: access control from the command line.

use std::process::ExitCode;

use anyhow::Context;

use crate::{render, CaCmd, Output, Target, TokenCmd};

pub async fn token(command: TokenCmd) -> anyhow::Result<ExitCode> {
    match command {
        TokenCmd::Create {
            name,
            role,
            namespace,
            ttl,
            target,
        } => {
            let name = name.unwrap_or_else(|| {
                // A short random suffix, from the same generator as submission keys.
                let random = trainctl_coordinator::api::new_idempotency_key();
                format!("{role}-{}", &random[..4])
            });
            let created = target
                .client()?
                .create_token(&serde_json::json!({
                    "name": name,
                    "role": role,
                    "namespace": namespace,
                    "ttl": ttl,
                }))
                .await?;
            match target.output {
                Output::Json => outln!("{}", serde_json::to_string_pretty(&created)?),
                Output::Human => {
                    // The token alone on stdout, for `TOKEN=$(trainctl token create ...)`.
                    println!("{}", created.token);
                    errln!(
                        "created token {} `{}` (role {}{}{}); it is shown only this once",
                        created.view.id,
                        created.view.name,
                        created.view.role,
                        created
                            .view
                            .namespace
                            .as_ref()
                            .map(|n| format!(", namespace {n}"))
                            .unwrap_or_default(),
                        created
                            .view
                            .expires_at_ms
                            .map(|t| format!(", expires {}", render::time_ms(t)))
                            .unwrap_or_default()
                    );
                    if created.view.role == "agent" {
                        errln!(
                            "start an agent with: trainctl agent --coordinator URL --ca-cert ca.pem --join-token <token> --data-dir DIR"
                        );
                    }
                }
            }
        }
        TokenCmd::List { target } => {
            let tokens = target.client()?.tokens().await?;
            match target.output {
                Output::Json => outln!("{}", serde_json::to_string_pretty(&tokens)?),
                Output::Human => print!("{}", render::token_table(&tokens)),
            }
        }
        TokenCmd::Revoke { id, target } => {
            let view = target.client()?.revoke_token(&id).await?;
            match target.output {
                Output::Json => outln!("{}", serde_json::to_string_pretty(&view)?),
                Output::Human => {
                    outln!("token {} `{}` revoked", view.id, view.name);
                    if !view.nodes.is_empty() {
                        outln!(
                            "agents that joined with it lost their identity; drained: {}",
                            view.nodes.join(", ")
                        );
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn audit(target: &Target) -> anyhow::Result<ExitCode> {
    let entries = target.client()?.audit().await?;
    match target.output {
        Output::Json => outln!("{}", serde_json::to_string_pretty(&entries)?),
        Output::Human => print!("{}", render::audit_table(&entries)),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn whoami(target: &Target) -> anyhow::Result<ExitCode> {
    let who = target.client()?.whoami().await?;
    match target.output {
        Output::Json => outln!("{}", serde_json::to_string_pretty(&who)?),
        Output::Human => outln!(
            "{} (role {}{})",
            who.name,
            who.role,
            who.namespace
                .map(|n| format!(", namespace {n}"))
                .unwrap_or_default()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn ca(command: CaCmd) -> anyhow::Result<ExitCode> {
    trainctl_tls::install_crypto_provider();
    match command {
        CaCmd::Init { dir } => {
            if dir.join("ca.pem").exists() || dir.join("ca.key").exists() {
                anyhow::bail!(
                    "{} already holds a CA (ca.pem or ca.key); choose another --dir",
                    dir.display()
                );
            }
            let ca = trainctl_tls::ClusterCa::load_or_create(&dir)
                .with_context(|| format!("create a CA in {}", dir.display()))?;
            outln!(
                "made a cluster CA in {} (ca.pem, and ca.key readable by you only); fingerprint {}",
                dir.display(),
                ca.fingerprint()
            );
        }
        CaCmd::Issue { ca_dir, names, out } => {
            let read = |f: &str| {
                let p = ca_dir.join(f);
                std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))
            };
            let ca = trainctl_tls::ClusterCa::from_pem(&read("ca.pem")?, &read("ca.key")?)?;
            let issued = ca.issue_server(&names)?;
            let out = out.unwrap_or_else(|| ca_dir.clone());
            std::fs::create_dir_all(&out)?;
            let stem = names[0].replace(['/', ':'], "_");
            let cert = out.join(format!("{stem}.pem"));
            let key = out.join(format!("{stem}.key"));
            std::fs::write(&cert, &issued.cert_pem)
                .with_context(|| format!("write {}", cert.display()))?;
            trainctl_tls::write_private_file(&key, issued.key_pem.as_bytes())
                .with_context(|| format!("write {}", key.display()))?;
            outln!(
                "issued a certificate for {} signed by the CA in {}: {} and {}",
                names.join(", "),
                ca_dir.display(),
                cert.display(),
                key.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
