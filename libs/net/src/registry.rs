//! The node's record of sandbox networks and the subnet addresses leased to them,
//! persisted so that an agent restarted after a crash neither hands out an address twice
//! nor forgets a namespace it has to clean up.
//!
//! One JSON file under the state directory, read and rewritten whole under an exclusive
//! `flock(2)` on a separate lock file: every change is read-modify-write inside the lock
//! and lands by `rename(2)` of a fsynced temporary file, so a reader (another thread,
//! another agent process, the agent after a power cut) sees the old or the new file,
//! never half of one, and two allocations can never pick the same free address.
//!
//! Unscoped sandboxes lease from the unscoped range, sandboxes of a tenant scope from
//! their scope's block (module `scope`). The block of each scope in use is recorded next
//! to the leases and taken and released in the same write as the lease that needs it, so
//! a crash never leaves a scope with two blocks or a block with two scopes.
//!
//! Addresses (and blocks) are handed out round-robin from persisted cursors instead of
//! lowest-free: an address released a moment ago is the last to be reused, which keeps
//! stale ARP entries and conntrack state of a destroyed sandbox away from its successor.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::scope::AddressPlan;
use crate::{Ipv4Cidr, NetError};

const FILE: &str = "sandboxes.json";
const LOCK: &str = "sandboxes.lock";
/// Version 2 added tenant scopes. Version 1 files are read (their leases are unscoped,
/// with the whole subnet as peers) and written back as version 2, which an agent from
/// before scopes refuses instead of handing out addresses inside scope blocks.
const VERSION: u32 = 2;

/// A sandbox network as recorded: everything else about it follows from the node config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// `isolated`, `internal` or `internet`.
    pub mode: String,
    /// The routable subnet address; `None` in isolated mode.
    pub address: Option<Ipv4Addr>,
    /// Bytes per second and burst, when rate limited.
    pub rate_limit: Option<(u64, u64)>,
    /// The tenant scope, if the sandbox has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The block `address` was leased from, which is what its peers' addresses are in:
    /// its scope's block, or the unscoped range. `None` without an address, and for a
    /// lease of a version 1 file (whose peers were the whole subnet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<Ipv4Cidr>,
}

/// The block of a scope that has addressed sandboxes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ScopeBlock {
    block: Ipv4Cidr,
    /// Offset in the block where the next search for a free address starts.
    next_offset: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Contents {
    version: u32,
    subnet: Ipv4Cidr,
    /// Offset in the subnet (inside the unscoped range) where the next search for a free
    /// unscoped address starts.
    next_offset: u64,
    /// Index of the scope block the next search for a free block starts at.
    #[serde(default)]
    next_block: u64,
    /// The block of every scope with an addressed sandbox on record.
    #[serde(default)]
    scopes: BTreeMap<String, ScopeBlock>,
    sandboxes: BTreeMap<String, Record>,
}

impl Contents {
    fn empty(subnet: Ipv4Cidr) -> Self {
        Self {
            version: VERSION,
            subnet,
            // Offset 2: .0 is the network and .1 the gateway.
            next_offset: 2,
            next_block: 0,
            scopes: BTreeMap::new(),
            sandboxes: BTreeMap::new(),
        }
    }
}

/// The lease file of one node.
#[derive(Debug, Clone)]
pub(crate) struct Registry {
    path: PathBuf,
    lock: PathBuf,
    subnet: Ipv4Cidr,
    plan: AddressPlan,
    /// Addresses inside the subnet that are never leased (the gateway, a local resolver).
    reserved: Vec<Ipv4Addr>,
}

impl Registry {
    /// Opens (creating the directory when needed) and checks that an existing file was
    /// written for the same subnet: leases of another subnet would be meaningless.
    pub fn open(dir: &Path, subnet: Ipv4Cidr, reserved: Vec<Ipv4Addr>) -> Result<Self, NetError> {
        if subnet.size() < 8 {
            return Err(NetError::InvalidConfig(format!(
                "subnet {subnet} is too small: it needs a gateway, unscoped sandboxes and \
                 tenant scope blocks (at least a /29)"
            )));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| NetError::io(format!("creating {}", dir.display()), e))?;
        let registry = Self {
            path: dir.join(FILE),
            lock: dir.join(LOCK),
            subnet,
            plan: AddressPlan::new(subnet),
            reserved,
        };
        registry.update(|_| Ok(()))?;
        Ok(registry)
    }

    /// The record of `id`.
    pub fn get(&self, id: &str) -> Result<Option<Record>, NetError> {
        self.update(|c| Ok(c.sandboxes.get(id).cloned()))
    }

    /// Every record.
    pub fn all(&self) -> Result<BTreeMap<String, Record>, NetError> {
        self.update(|c| Ok(c.sandboxes.clone()))
    }

    /// Records `id`, leasing an address unless `with_address` is false: from the block of
    /// `scope` (taking a free block for the scope's first addressed sandbox), or from the
    /// unscoped range. Returns the record and whether it is new; an existing record is
    /// returned unchanged, so a retried create gets the address it was given the first
    /// time.
    pub fn insert(
        &self,
        id: &str,
        mode: &str,
        with_address: bool,
        rate_limit: Option<(u64, u64)>,
        scope: Option<&str>,
    ) -> Result<(Record, bool), NetError> {
        self.update(|c| {
            if let Some(existing) = c.sandboxes.get(id) {
                return Ok((existing.clone(), false));
            }
            let (address, block) = match (with_address, scope) {
                (false, _) => (None, None),
                (true, None) => (Some(self.pick_unscoped(c)?), Some(self.plan.unscoped())),
                (true, Some(scope)) => {
                    let (addr, block) = self.pick_scoped(c, scope)?;
                    (Some(addr), Some(block))
                }
            };
            let record = Record {
                mode: mode.to_owned(),
                address,
                rate_limit,
                scope: scope.map(str::to_owned),
                block,
            };
            c.sandboxes.insert(id.to_owned(), record.clone());
            Ok((record, true))
        })
    }

    /// Forgets `id` and frees its address, and its scope's block when it was the scope's
    /// last addressed sandbox. Returns what was recorded.
    pub fn remove(&self, id: &str) -> Result<Option<Record>, NetError> {
        self.update(|c| {
            let removed = c.sandboxes.remove(id);
            if let Some(scope) = removed.as_ref().and_then(|r| r.scope.as_deref()) {
                let in_use = c
                    .sandboxes
                    .values()
                    .any(|r| r.scope.as_deref() == Some(scope) && r.address.is_some());
                if !in_use {
                    c.scopes.remove(scope);
                }
            }
            Ok(removed)
        })
    }

    /// The block of `scope` (recorded, or a free one).
    #[cfg(test)]
    pub fn scope_block(&self, scope: &str) -> Result<Option<Ipv4Cidr>, NetError> {
        self.update(|c| Ok(c.scopes.get(scope).map(|s| s.block)))
    }

    fn used(c: &Contents) -> HashSet<Ipv4Addr> {
        c.sandboxes.values().filter_map(|r| r.address).collect()
    }

    /// The next free address of the unscoped range at or after the cursor.
    fn pick_unscoped(&self, c: &mut Contents) -> Result<Ipv4Addr, NetError> {
        let range = self.plan.unscoped();
        // The unscoped range starts at the subnet's network address, so offsets in the
        // subnet and in the range are the same.
        let mut cursor = c.next_offset;
        let addr = self
            .pick_in(range, &mut cursor, &Self::used(c))
            .ok_or_else(|| NetError::Exhausted {
                subnet: format!("{range} (the range of sandboxes without a tenant scope)"),
            })?;
        c.next_offset = cursor;
        Ok(addr)
    }

    /// The next free address in the block of `scope`, taking a block first if the scope
    /// has none.
    fn pick_scoped(&self, c: &mut Contents, scope: &str) -> Result<(Ipv4Addr, Ipv4Cidr), NetError> {
        let used = Self::used(c);
        let mut entry = match c.scopes.get(scope) {
            Some(entry) => entry.clone(),
            None => ScopeBlock {
                block: self.free_block(c, &used)?,
                next_offset: 0,
            },
        };
        let addr = self
            .pick_in(entry.block, &mut entry.next_offset, &used)
            .ok_or_else(|| NetError::Exhausted {
                subnet: format!("{} (the block of tenant scope {scope})", entry.block),
            })?;
        let block = entry.block;
        c.scopes.insert(scope.to_owned(), entry);
        Ok((addr, block))
    }

    /// The next block at or after the block cursor that no scope holds and no lease is
    /// in (a lease of a version 1 file may be anywhere in the subnet).
    fn free_block(&self, c: &mut Contents, used: &HashSet<Ipv4Addr>) -> Result<Ipv4Cidr, NetError> {
        let count = self.plan.block_count();
        let held: HashSet<Ipv4Cidr> = c.scopes.values().map(|s| s.block).collect();
        for step in 0..count {
            let index = (c.next_block + step) % count;
            let Some(block) = self.plan.block(index) else {
                continue;
            };
            if held.contains(&block) || used.iter().any(|a| block.contains(*a)) {
                continue;
            }
            c.next_block = (index + 1) % count;
            return Ok(block);
        }
        Err(NetError::Exhausted {
            subnet: format!(
                "{} (all {count} tenant scope blocks are in use)",
                self.subnet
            ),
        })
    }

    /// The next leasable address of `range` at or after `*cursor` (an offset in the
    /// range), wrapping once around it; moves the cursor past it.
    fn pick_in(
        &self,
        range: Ipv4Cidr,
        cursor: &mut u64,
        used: &HashSet<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        let size = range.size();
        for step in 0..size {
            let offset = (*cursor + step) % size;
            let Some(addr) = range.nth(offset) else {
                continue;
            };
            // The subnet's network and broadcast addresses are not hosts.
            if !self.plan.is_host(addr) || self.reserved.contains(&addr) || used.contains(&addr) {
                continue;
            }
            *cursor = (offset + 1) % size;
            return Some(addr);
        }
        None
    }

    /// Runs `f` on the contents under the lock and writes them back if they changed.
    fn update<T>(
        &self,
        f: impl FnOnce(&mut Contents) -> Result<T, NetError>,
    ) -> Result<T, NetError> {
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock)
            .map_err(|e| NetError::io(format!("opening {}", self.lock.display()), e))?;
        let _lock = Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, errno)| {
            NetError::io(
                format!("locking {}", self.lock.display()),
                std::io::Error::from(errno),
            )
        })?;
        let mut contents = self.read()?;
        let before = serde_json::to_vec(&contents).map_err(|e| self.corrupt(e))?;
        contents.version = VERSION;
        let out = f(&mut contents)?;
        if serde_json::to_vec(&contents).map_err(|e| self.corrupt(e))? != before
            || !self.path.exists()
        {
            self.write(&serde_json::to_vec_pretty(&contents).map_err(|e| self.corrupt(e))?)?;
        }
        Ok(out)
    }

    /// The contents as stored (a version 1 file keeps its version number here, so that
    /// `update` sees the upgrade as a change and writes it back).
    fn read(&self) -> Result<Contents, NetError> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Contents::empty(self.subnet));
            }
            Err(e) => return Err(NetError::io(format!("reading {}", self.path.display()), e)),
        };
        let contents: Contents = serde_json::from_slice(&text).map_err(|e| self.corrupt(e))?;
        if !(1..=VERSION).contains(&contents.version) {
            return Err(self.state_error(format!(
                "version {} is not one this agent reads (1 to {VERSION})",
                contents.version
            )));
        }
        if contents.subnet != self.subnet && contents.sandboxes.is_empty() {
            // Nothing leased: the new subnet simply takes over.
            return Ok(Contents {
                version: contents.version,
                ..Contents::empty(self.subnet)
            });
        }
        if contents.subnet != self.subnet {
            return Err(self.state_error(format!(
                "it holds leases of {} but the subnet is now {}; destroy those sandboxes \
                 (or move the file away) before changing the subnet",
                contents.subnet, self.subnet
            )));
        }
        Ok(contents)
    }

    fn write(&self, bytes: &[u8]) -> Result<(), NetError> {
        let tmp = self.path.with_extension("json.tmp");
        let io = |what: &str, e| NetError::io(format!("{what} {}", tmp.display()), e);
        let mut file = File::create(&tmp).map_err(|e| io("creating", e))?;
        file.write_all(bytes).map_err(|e| io("writing", e))?;
        file.sync_all().map_err(|e| io("syncing", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io("renaming", e))?;
        // The rename is durable only once the directory is.
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| NetError::io(format!("syncing {}", dir.display()), e))?;
        }
        Ok(())
    }

    fn corrupt(&self, e: serde_json::Error) -> NetError {
        self.state_error(e.to_string())
    }

    fn state_error(&self, message: String) -> NetError {
        NetError::State {
            path: self.path.clone(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn leases_are_unique_reserved_skipped_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let reg =
            Registry::open(dir.path(), subnet("10.100.0.0/28"), vec![ip("10.100.0.1")]).unwrap();
        // /28: the unscoped range is .0-.7; .0 is the network, .1 the gateway: .2-.7.
        let mut got = Vec::new();
        for i in 0..6 {
            let (rec, new) = reg
                .insert(&format!("s{i}"), "internal", true, None, None)
                .unwrap();
            assert!(new);
            assert_eq!(rec.block, Some(subnet("10.100.0.0/29")));
            got.push(rec.address.unwrap());
        }
        let want: Vec<Ipv4Addr> = (2..=7).map(|n| ip(&format!("10.100.0.{n}"))).collect();
        assert_eq!(got, want);
        let err = reg.insert("s6", "internal", true, None, None).unwrap_err();
        assert!(err.is_exhausted(), "{err}");
        // Isolated sandboxes are recorded without an address, even when the range is full.
        let (iso, _) = reg.insert("iso", "isolated", false, None, None).unwrap();
        assert_eq!(iso.address, None);

        // Idempotent on the id.
        let (again, new) = reg.insert("s3", "internal", true, None, None).unwrap();
        assert!(!new);
        assert_eq!(again.address, Some(ip("10.100.0.5")));

        // A released address comes back, and only once.
        assert_eq!(
            reg.remove("s1").unwrap().unwrap().address,
            Some(ip("10.100.0.3"))
        );
        assert_eq!(reg.remove("s1").unwrap(), None);
        let (rec, _) = reg
            .insert("s7", "internet", true, Some((1000, 2000)), None)
            .unwrap();
        assert_eq!(rec.address, Some(ip("10.100.0.3")));
        assert!(reg
            .insert("s8", "internal", true, None, None)
            .unwrap_err()
            .is_exhausted());
    }

    #[test]
    fn scopes_lease_from_their_own_block_which_is_freed_with_its_last_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let reg =
            Registry::open(dir.path(), subnet("10.100.0.0/29"), vec![ip("10.100.0.1")]).unwrap();
        // /29: unscoped .0-.3 (.2, .3 leasable); blocks .4/31 and .6/31 (.7 is broadcast).
        let (a1, _) = reg.insert("a1", "internal", true, None, Some("a")).unwrap();
        let (a2, _) = reg.insert("a2", "internet", true, None, Some("a")).unwrap();
        assert_eq!(a1.scope.as_deref(), Some("a"));
        assert_eq!(
            (a1.address, a2.address),
            (Some(ip("10.100.0.4")), Some(ip("10.100.0.5")))
        );
        assert_eq!(a1.block, Some(subnet("10.100.0.4/31")));
        assert_eq!(a2.block, a1.block);
        let err = reg
            .insert("a3", "internal", true, None, Some("a"))
            .unwrap_err();
        assert!(
            err.is_exhausted() && err.to_string().contains("tenant scope a"),
            "{err}"
        );

        let (b1, _) = reg.insert("b1", "internal", true, None, Some("b")).unwrap();
        assert_eq!(b1.address, Some(ip("10.100.0.6")));
        assert_eq!(b1.block, Some(subnet("10.100.0.6/31")));
        // No block left for a third scope; unscoped sandboxes are not affected.
        let err = reg
            .insert("c1", "internal", true, None, Some("c"))
            .unwrap_err();
        assert!(
            err.is_exhausted() && err.to_string().contains("blocks"),
            "{err}"
        );
        let (u, _) = reg.insert("u", "internal", true, None, None).unwrap();
        assert_eq!(u.address, Some(ip("10.100.0.2")));
        // A scoped isolated sandbox needs no block.
        let (iso, _) = reg
            .insert("iso", "isolated", false, None, Some("c"))
            .unwrap();
        assert_eq!((iso.address, iso.block), (None, None));
        assert_eq!(reg.scope_block("c").unwrap(), None);

        // The block stays with its scope until the last addressed sandbox of it goes.
        reg.remove("a1").unwrap();
        assert_eq!(reg.scope_block("a").unwrap(), Some(subnet("10.100.0.4/31")));
        assert!(reg
            .insert("c1", "internal", true, None, Some("c"))
            .unwrap_err()
            .is_exhausted());
        let (a3, _) = reg.insert("a3", "internal", true, None, Some("a")).unwrap();
        assert_eq!(a3.address, Some(ip("10.100.0.4")));
        reg.remove("b1").unwrap();
        assert_eq!(reg.scope_block("b").unwrap(), None);
        let (c1, _) = reg.insert("c1", "internal", true, None, Some("c")).unwrap();
        assert_eq!(c1.block, Some(subnet("10.100.0.6/31")));

        // Scopes survive a reload.
        let reloaded =
            Registry::open(dir.path(), subnet("10.100.0.0/29"), vec![ip("10.100.0.1")]).unwrap();
        assert_eq!(reloaded.get("a2").unwrap().unwrap(), a2);
        assert_eq!(reloaded.scope_block("c").unwrap(), c1.block);
    }

    /// A lease file from before tenant scopes: its leases stay (unscoped, peers the whole
    /// subnet), no scope block is taken over one of them, and it is written back as the
    /// current version.
    #[test]
    fn a_version_1_file_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = r#"{
            "version": 1,
            "subnet": "10.100.0.0/29",
            "next_offset": 5,
            "sandboxes": {
                "old": { "mode": "internal", "address": "10.100.0.4", "rate_limit": null }
            }
        }"#;
        std::fs::write(dir.path().join(FILE), v1).unwrap();
        let reg =
            Registry::open(dir.path(), subnet("10.100.0.0/29"), vec![ip("10.100.0.1")]).unwrap();
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(text.contains(&format!("\"version\": {VERSION}")), "{text}");
        let old = reg.get("old").unwrap().unwrap();
        assert_eq!((old.scope, old.block), (None, None));
        let (a, _) = reg.insert("a", "internal", true, None, Some("a")).unwrap();
        assert_eq!(a.block, Some(subnet("10.100.0.6/31")));
        // The old cursor is past the unscoped range: it wraps into it.
        let (u, _) = reg.insert("u", "internal", true, None, None).unwrap();
        assert_eq!(u.address, Some(ip("10.100.0.2")));

        std::fs::write(
            dir.path().join(FILE),
            v1.replace("\"version\": 1", "\"version\": 9"),
        )
        .unwrap();
        let err = Registry::open(dir.path(), subnet("10.100.0.0/29"), vec![]).unwrap_err();
        assert!(matches!(err, NetError::State { .. }), "{err}");
    }

    #[test]
    fn a_released_address_is_reused_last() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path(), subnet("10.100.0.0/24"), vec![]).unwrap();
        let (a, _) = reg.insert("a", "internal", true, None, None).unwrap();
        reg.remove("a").unwrap();
        let (b, _) = reg.insert("b", "internal", true, None, None).unwrap();
        assert_ne!(a.address, b.address);
    }

    #[test]
    fn leases_survive_a_reload_and_a_subnet_change_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let net = subnet("10.100.0.0/16");
        let first = Registry::open(dir.path(), net, vec![]).unwrap();
        let (a, _) = first
            .insert("a", "internet", true, Some((5, 6)), None)
            .unwrap();
        let (b, _) = first.insert("b", "internal", true, None, None).unwrap();
        drop(first);

        let reloaded = Registry::open(dir.path(), net, vec![]).unwrap();
        assert_eq!(reloaded.get("a").unwrap().unwrap(), a);
        let (c, _) = reloaded.insert("c", "internal", true, None, None).unwrap();
        assert_ne!(c.address, a.address);
        assert_ne!(c.address, b.address);
        assert_eq!(reloaded.all().unwrap().len(), 3);

        let err = Registry::open(dir.path(), subnet("10.101.0.0/16"), vec![]).unwrap_err();
        assert!(matches!(err, NetError::State { .. }), "{err}");
        // With nothing leased, a new subnet takes over.
        for id in ["a", "b", "c"] {
            reloaded.remove(id).unwrap();
        }
        let moved = Registry::open(dir.path(), subnet("10.101.0.0/16"), vec![]).unwrap();
        let (d, _) = moved.insert("d", "internal", true, None, None).unwrap();
        assert_eq!(d.address, Some(ip("10.101.0.2")));
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        assert!(matches!(
            Registry::open(dir.path(), net, vec![]).unwrap_err(),
            NetError::State { .. }
        ));
    }

    /// Two registries on one directory (as two agent processes would be) allocating from
    /// many threads at once never hand out one address twice.
    #[test]
    fn concurrent_allocations_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let net = subnet("10.100.0.0/16");
        let regs = [
            Registry::open(dir.path(), net, vec![]).unwrap(),
            Registry::open(dir.path(), net, vec![]).unwrap(),
        ];
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let reg = regs[t % 2].clone();
                std::thread::spawn(move || {
                    (0..25)
                        .map(|i| {
                            reg.insert(&format!("t{t}-{i}"), "internal", true, None, None)
                                .unwrap()
                                .0
                                .address
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<Ipv4Addr> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let total = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), total);
        assert_eq!(regs[0].all().unwrap().len(), 200);
    }
}
