//! Every example spec under `jobs/examples/` (at any depth) parses and validates, so an
//! example added there is checked without touching this test.

use std::fs;
use std::path::{Path, PathBuf};

use trainctl_jobs::JobSpec;

fn toml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("read directory entry").path();
        if path.is_dir() {
            toml_files(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "toml") {
            found.push(path);
        }
    }
}

#[test]
fn every_example_spec_parses_and_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files = Vec::new();
    toml_files(&dir, &mut files);
    files.sort();
    assert!(
        files.iter().any(|f| f.ends_with("ddp-example.toml")),
        "no ddp-example.toml among {files:?}"
    );
    let failures: Vec<String> = files
        .iter()
        .filter_map(|file| {
            let origin = file
                .strip_prefix(&dir)
                .unwrap_or(file)
                .display()
                .to_string();
            let source = fs::read_to_string(file).unwrap_or_else(|e| panic!("read {origin}: {e}"));
            JobSpec::from_toml(&source, &origin)
                .err()
                .map(|e| e.to_string())
        })
        .collect();
    assert!(
        failures.is_empty(),
        "invalid example specs:\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_builtin_example_is_a_2x2_gang_of_trainctl() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ddp-example.toml");
    let source = fs::read_to_string(&path).expect("read ddp-example.toml");
    let spec = JobSpec::from_toml(&source, "ddp-example.toml").expect("valid example");
    assert_eq!(spec.world_size(), 4);
    assert_eq!(
        spec.launch.command,
        ["trainctl", "example-train", "--steps", "30", "--seed", "7"]
    );
    assert_eq!(spec.launch.workdir, None);
}

#[test]
fn the_elastic_example_is_a_2_to_4_host_gang_with_checkpoints() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/elastic-example.toml");
    let source = fs::read_to_string(&path).expect("read elastic-example.toml");
    let spec = JobSpec::from_toml(&source, "elastic-example.toml").expect("valid example");
    assert_eq!(
        spec.launch.command,
        ["trainctl", "example-train", "--steps", "200", "--seed", "7"]
    );
    assert_eq!(spec.resources.node_range(), (2, 4));
    assert!(spec.resources.is_elastic());
    assert_eq!((spec.min_world_size(), spec.world_size()), (2, 4));
    assert_eq!(spec.failure.max_restarts, 3);
    assert_eq!(spec.failure.hang_timeout_ms, Some(30_000));
    let checkpoint = spec.checkpoint.expect("a [checkpoint] table");
    assert_eq!(
        checkpoint.expand_dir(12, &spec.name),
        "/tmp/trainctl-ckpt/12"
    );
    assert_eq!(checkpoint.keep, Some(3));
    assert_eq!(checkpoint.signal_number(), Some(10));
    assert_eq!(checkpoint.grace_ms, 20_000);
}

#[test]
fn the_torch_example_keeps_two_checkpoints() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ddp-torch/ddp-torch.toml");
    let source = fs::read_to_string(&path).expect("read ddp-torch.toml");
    let spec = JobSpec::from_toml(&source, "ddp-torch.toml").expect("valid example");
    assert_eq!(spec.resources.node_range(), (2, 2));
    assert_eq!(spec.failure.max_restarts, 2);
    let checkpoint = spec.checkpoint.expect("a [checkpoint] table");
    assert_eq!(checkpoint.dir, "/tmp/trainctl-ckpt/{job}");
    assert_eq!(checkpoint.keep, Some(2));
    assert_eq!(checkpoint.signal, None);
}
