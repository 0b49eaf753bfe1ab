//! The store to use when the inventory database cannot be opened (a
//! corrupt file, a disk gone read-only at start): every call fails with the
//! reason, so the panel and the API report it on every page, while the data
//! plane goes on serving the snapshot it has (the inventory file's, or the
//! last one it got). A broken database must never take DHCP, TFTP and HTTP
//! down with it.

use std::collections::BTreeMap;

use super::*;

/// An inventory store that is down, and says why.
#[derive(Debug, Clone)]
pub struct UnavailableStore {
    reason: String,
}

impl UnavailableStore {
    /// A store that answers every call with `reason` (say which file and
    /// what to do).
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }

    fn down<T>(&self) -> StoreResult<T> {
        Err(StoreError::Database(self.reason.clone()))
    }
}

impl InventoryStore for UnavailableStore {
    fn bmcs(&self) -> StoreResult<Vec<BmcRecord>> {
        self.down()
    }

    fn set_bmc(&self, _mac: Mac, _bmc: Option<&BmcRecord>, _actor: &str) -> StoreResult<()> {
        self.down()
    }

    fn machines(&self) -> StoreResult<Vec<MachineRecord>> {
        self.down()
    }

    fn machines_brief(&self) -> StoreResult<Vec<MachineRecord>> {
        self.down()
    }

    fn machine(&self, _mac: Mac) -> StoreResult<Option<MachineRecord>> {
        self.down()
    }

    fn put_machine(
        &self,
        _mac: Mac,
        _patch: &MachinePatch,
        _actor: &str,
    ) -> StoreResult<MachineRecord> {
        self.down()
    }

    fn put_machines(
        &self,
        _macs: &[Mac],
        _patch: &MachinePatch,
        _actor: &str,
    ) -> StoreResult<usize> {
        self.down()
    }

    fn forget_machine(&self, _mac: Mac, _actor: &str) -> StoreResult<()> {
        self.down()
    }

    fn note_seen(
        &self,
        _mac: Mac,
        _facts: &BTreeMap<String, String>,
        _at_ms: u64,
    ) -> StoreResult<bool> {
        self.down()
    }

    fn note_events(
        &self,
        _events: &[BootEvent],
        _seen: &[SeenNote],
        _server: &str,
    ) -> StoreResult<()> {
        self.down()
    }

    fn events(
        &self,
        _mac: Option<Mac>,
        _since_ms: u64,
        _limit: usize,
    ) -> StoreResult<Vec<StoredEvent>> {
        self.down()
    }

    fn prune_events(&self, _before_ms: u64) -> StoreResult<usize> {
        self.down()
    }

    fn prune_discovered(&self, _keep: usize) -> StoreResult<usize> {
        self.down()
    }

    fn images(&self) -> StoreResult<Vec<ImageRecord>> {
        self.down()
    }

    fn image(&self, _name: &str) -> StoreResult<Option<ImageRecord>> {
        self.down()
    }

    fn add_image(&self, _image: &ImageRecord, _actor: &str) -> StoreResult<()> {
        self.down()
    }

    fn remove_image(&self, _name: &str, _actor: &str) -> StoreResult<()> {
        self.down()
    }

    fn update_image_files(&self, _name: &str, _files: &[FileCheck]) -> StoreResult<()> {
        self.down()
    }

    fn pools(&self) -> StoreResult<Vec<PoolRecord>> {
        self.down()
    }

    fn put_pool(&self, _pool: &PoolRecord, _actor: &str) -> StoreResult<()> {
        self.down()
    }

    fn delete_pool(&self, _name: &str, _actor: &str) -> StoreResult<()> {
        self.down()
    }

    fn assign_pool(&self, _name: &str, _image: Option<&str>, _actor: &str) -> StoreResult<usize> {
        self.down()
    }

    fn unknown_policy(&self) -> StoreResult<(UnknownPolicy, u32)> {
        self.down()
    }

    fn set_unknown_policy(
        &self,
        _policy: UnknownPolicy,
        _poll_seconds: u32,
        _actor: &str,
    ) -> StoreResult<()> {
        self.down()
    }

    fn add_user(
        &self,
        _name: &str,
        _password_hash: &str,
        _scope: Scope,
        _actor: &str,
    ) -> StoreResult<()> {
        self.down()
    }

    fn user(&self, _name: &str) -> StoreResult<Option<UserRecord>> {
        self.down()
    }

    fn users(&self) -> StoreResult<Vec<UserRecord>> {
        self.down()
    }

    fn remove_user(&self, _: &str, _: &str) -> StoreResult<usize> {
        self.down()
    }

    fn edit_image(&self, _: &str, _: &ImageEdit, _: &str, _: &str) -> StoreResult<ImageRecord> {
        self.down()
    }

    fn image_revisions(&self, _: &str) -> StoreResult<Vec<ImageRevision>> {
        self.down()
    }

    fn create_session(&self, _id_hash: &str, _session: &SessionRecord) -> StoreResult<()> {
        self.down()
    }

    fn session(&self, _id_hash: &str, _now_ms: u64) -> StoreResult<Option<SessionRecord>> {
        self.down()
    }

    fn delete_session(&self, _id_hash: &str) -> StoreResult<()> {
        self.down()
    }

    fn add_token(
        &self,
        _name: &str,
        _user: &str,
        _scope: Scope,
        _secret_hash: &str,
        _actor: &str,
    ) -> StoreResult<i64> {
        self.down()
    }

    fn token(&self, _secret_hash: &str, _now_ms: u64) -> StoreResult<Option<TokenRecord>> {
        self.down()
    }

    fn tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        self.down()
    }

    fn revoke_token(&self, _id: i64, _actor: &str) -> StoreResult<()> {
        self.down()
    }

    fn audit(&self, _limit: usize) -> StoreResult<Vec<AuditEntry>> {
        self.down()
    }

    fn record_audit(
        &self,
        _actor: &str,
        _action: &str,
        _target: &str,
        _detail: &str,
    ) -> StoreResult<()> {
        self.down()
    }

    fn note_one_shots_used(&self, _used: &[(Mac, u64)]) -> StoreResult<()> {
        self.down()
    }

    fn one_shots_used(&self) -> StoreResult<Vec<(Mac, u64)>> {
        self.down()
    }

    fn note_server_files(&self, _report: &ServerFiles) -> StoreResult<()> {
        self.down()
    }

    fn server_files(&self) -> StoreResult<Vec<ServerFiles>> {
        self.down()
    }

    fn export(&self) -> StoreResult<InventoryDump> {
        self.down()
    }

    fn import(&self, _dump: &InventoryDump) -> StoreResult<()> {
        self.down()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_reports_the_reason() {
        let store = UnavailableStore::new("bootfleet.db: file is not a database");
        let error = store.machines().unwrap_err().to_string();
        assert!(error.contains("file is not a database"), "{error}");
        assert!(store
            .put_machine(Mac([2; 6]), &MachinePatch::default(), "t")
            .is_err());
        assert!(snapshot_from_store(&store, 1).is_err());
    }
}
