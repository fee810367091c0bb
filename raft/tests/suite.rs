//! openraft's storage conformance suite against our durable log and sled state machine.

use openraft::testing::{StoreBuilder, Suite};
use raft::log::{LogOptions, LogStore};
use raft::sm_store::{SmConfig, StateMachineStore};
use raft::{StorageError, TypeConfig};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = LogStore::open(&dir.path().join("log"), LogOptions::default()).expect("open log");
        let sm =
            StateMachineStore::open(&dir.path().join("sm"), &SmConfig::default()).expect("open sm");
        Ok((dir, log, sm))
    }
}

#[test]
#[allow(clippy::result_large_err)]
fn storage_suite_passes() -> Result<(), StorageError> {
    Suite::test_all(Builder)
}
