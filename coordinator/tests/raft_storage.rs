//! openraft's own storage conformance suite against the redb log store and state machine.

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};
use trainctl_coordinator::raft::log_store::LogStore;
use trainctl_coordinator::raft::state_machine::StateMachineStore;
use trainctl_coordinator::raft::{StorageError, TypeConfig};

struct RedbStores;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for RedbStores {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db =
            Arc::new(redb::Database::create(dir.path().join("state.redb")).expect("create db"));
        let log = LogStore::open(db.clone()).expect("open log");
        let sm = StateMachineStore::open(
            db,
            dir.path().join("snapshots"),
            trainctl_coordinator::logs::LogStore::new(dir.path().join("logs")),
        )
        .expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn redb_stores_pass_openraft_storage_suite() {
    Suite::test_all(RedbStores).expect("openraft storage suite");
}
