//! Sandbox records on local disk: what the node needs to find and clean up everything a
//! sandbox owns after the agent restarts, even after kill -9.
//!
//! One JSON file per VM under `<state>/vms/`, written atomically (temp file, fsync,
//! rename, fsync of the directory) *before* the resources it names are created, so that
//! a crash at any point leaves a record of everything that may exist. Records are
//! inputs from a previous run, not trusted blindly: recovery checks a recorded process
//! id against the process's command line before it kills anything.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::NodeError;

/// Largest record file read back (they are a few KiB).
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// One VM and everything it owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM id (also the file name).
    pub vm_id: String,
    /// The sandbox it serves; `None` while it waits in the warm pool.
    pub sandbox_id: Option<String>,
    pub template: String,
    pub template_digest: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    /// The VMM's run directory (sockets, logs).
    pub run_dir: PathBuf,
    /// The copy-on-write disk.
    pub disk: PathBuf,
    /// The VMM process, once started.
    pub pid: Option<u32>,
    /// Control groups the VMM was placed in.
    pub cgroups: Vec<PathBuf>,
    /// The sandbox's network namespace, if it has one.
    pub netns: Option<String>,
    /// Sandbox identity and lifetime, once handed over.
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub hostname: String,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub network_mode: String,
    pub ip: String,
    pub boot_time_ms: u32,
    /// How the disk was cloned from the template (so a restore knows its format).
    #[serde(default)]
    pub disk_method: Option<nanobox_node_storage::CowMethod>,
    /// Set while the sandbox is paused: its VM is gone, its disk and this snapshot stay.
    #[serde(default)]
    pub snapshot: Option<SnapshotRecord>,
}

/// A paused sandbox's snapshot on local disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    /// The directory holding the VMM's state files.
    pub dir: PathBuf,
    /// State plus disk bytes on local storage.
    pub size_bytes: u64,
    pub taken_at_ms: u64,
    /// A restore from it was started: if the guest ran, its disk has moved on and the
    /// snapshot is no longer consistent with it (recovery then gives the sandbox up).
    #[serde(default)]
    pub restoring: bool,
}

/// The directory of records.
#[derive(Debug, Clone)]
pub struct RecordStore {
    dir: PathBuf,
}

impl RecordStore {
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, NodeError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| NodeError::io("creating the record directory", &dir, e))?;
        Ok(Self { dir })
    }

    fn path(&self, vm_id: &str) -> PathBuf {
        self.dir.join(format!("{vm_id}.json"))
    }

    /// Writes (or replaces) a record durably.
    pub fn put(&self, record: &VmRecord) -> Result<(), NodeError> {
        let path = self.path(&record.vm_id);
        let data = serde_json::to_vec_pretty(record)
            .map_err(|e| NodeError::Internal(format!("encoding a record: {e}")))?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)
            .map_err(|e| NodeError::io("creating a record", &self.dir, e))?;
        tmp.write_all(&data)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| NodeError::io("writing a record", tmp.path(), e))?;
        tmp.persist(&path)
            .map_err(|e| NodeError::io("renaming a record", &path, e.error))?;
        sync_dir(&self.dir)
    }

    /// Removes a record (absent is fine).
    pub fn remove(&self, vm_id: &str) -> Result<(), NodeError> {
        let path = self.path(vm_id);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(NodeError::io("removing a record", &path, e)),
        }
    }

    /// Every record; unreadable files are reported and skipped (they are removed, since
    /// nothing could be recovered from them anyway).
    pub fn load_all(&self) -> Result<Vec<VmRecord>, NodeError> {
        let mut records = Vec::new();
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| NodeError::io("listing records", &self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| NodeError::io("listing records", &self.dir, e))?;
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                // Temp files of an interrupted write.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            match read_record(&path) {
                Ok(record) => records.push(record),
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "dropping an unreadable record");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(records)
    }
}

fn read_record(path: &Path) -> Result<VmRecord, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut data = Vec::new();
    file.take(MAX_RECORD_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(|e| e.to_string())?;
    if data.len() as u64 > MAX_RECORD_BYTES {
        return Err("too large".to_owned());
    }
    let record: VmRecord = serde_json::from_slice(&data).map_err(|e| e.to_string())?;
    let expected = format!("{}.json", record.vm_id);
    if path.file_name().and_then(|n| n.to_str()) != Some(expected.as_str()) {
        return Err("file name does not match the VM id".to_owned());
    }
    Ok(record)
}

fn sync_dir(dir: &Path) -> Result<(), NodeError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| NodeError::io("syncing the record directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> VmRecord {
        VmRecord {
            vm_id: id.into(),
            sandbox_id: None,
            template: "node22".into(),
            template_digest: "sha256:ab".into(),
            vcpus: 1,
            memory_mb: 128,
            run_dir: "/run/x".into(),
            disk: "/var/x.img".into(),
            pid: Some(42),
            cgroups: vec![],
            netns: None,
            created_at_ms: 0,
            expires_at_ms: 0,
            hostname: String::new(),
            env: BTreeMap::new(),
            metadata: BTreeMap::new(),
            network_mode: "isolated".into(),
            ip: String::new(),
            boot_time_ms: 0,
            disk_method: None,
            snapshot: None,
        }
    }

    #[test]
    fn records_round_trip_and_junk_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RecordStore::open(dir.path()).expect("open");
        store.put(&record("vm-a")).expect("put");
        store.put(&record("vm-b")).expect("put");
        std::fs::write(dir.path().join("junk.json"), b"{not json").expect("write");
        std::fs::write(dir.path().join(".tmpXYZ"), b"half").expect("write");
        // A record whose name does not match its id is not trusted.
        std::fs::write(
            dir.path().join("vm-c.json"),
            serde_json::to_vec(&record("vm-z")).expect("json"),
        )
        .expect("write");
        let mut ids: Vec<_> = store
            .load_all()
            .expect("load")
            .into_iter()
            .map(|r| r.vm_id)
            .collect();
        ids.sort();
        assert_eq!(ids, ["vm-a", "vm-b"]);
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 2);
        store.remove("vm-a").expect("remove");
        store.remove("vm-a").expect("remove twice");
        assert_eq!(store.load_all().expect("load").len(), 1);
    }
}
