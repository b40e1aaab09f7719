//! Environment variables that trainctl sets for every rank, which a job spec may not set.

/// Names trainctl sets in every rank's environment (the torchrun/torchelastic contract plus
/// GPU visibility); a job's `launch.env` may not set them. Every name starting with
/// [`RESERVED_ENV_PREFIX`] is reserved too.
pub const RESERVED_ENV: &[&str] = &[
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE",
    "CUDA_VISIBLE_DEVICES",
];

/// Prefix of the names trainctl keeps for itself (`TRAINCTL_JOB_ID`, ...).
pub const RESERVED_ENV_PREFIX: &str = "TRAINCTL_";

/// Whether `key` is set by trainctl itself and so may not appear in a job's `launch.env`.
/// The comparison is exact: environment names are case-sensitive.
pub fn is_reserved_env(key: &str) -> bool {
    RESERVED_ENV.contains(&key) || key.starts_with(RESERVED_ENV_PREFIX)
}

/// Whether `key` matches `[A-Za-z_][A-Za-z0-9_]*`.
pub(crate) fn is_valid_env_name(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_names() {
        for key in [
            "RANK",
            "MASTER_PORT",
            "CUDA_VISIBLE_DEVICES",
            "TRAINCTL_JOB_ID",
            "TRAINCTL_",
        ] {
            assert!(is_reserved_env(key), "{key}");
        }
        for key in ["rank", "NCCL_DEBUG", "MY_RANK", "TRAINCTL", "PATH"] {
            assert!(!is_reserved_env(key), "{key}");
        }
    }

    #[test]
    fn env_names() {
        for key in ["A", "_", "NCCL_DEBUG", "a1_b2"] {
            assert!(is_valid_env_name(key), "{key}");
        }
        for key in ["", "1A", "A-B", "A B", "A=B", "É"] {
            assert!(!is_valid_env_name(key), "{key}");
        }
    }
}
