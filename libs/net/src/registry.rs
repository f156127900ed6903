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
//! Addresses are handed out round-robin from a persisted cursor instead of lowest-free:
//! an address released a moment ago is the last to be reused, which keeps stale ARP
//! entries and conntrack state of a destroyed sandbox away from its successor.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::{Ipv4Cidr, NetError};

const FILE: &str = "sandboxes.json";
const LOCK: &str = "sandboxes.lock";
const VERSION: u32 = 1;

/// A sandbox network as recorded: everything else about it follows from the node config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// `isolated`, `internal` or `internet`.
    pub mode: String,
    /// The routable subnet address; `None` in isolated mode.
    pub address: Option<Ipv4Addr>,
    /// Bytes per second and burst, when rate limited.
    pub rate_limit: Option<(u64, u64)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Contents {
    version: u32,
    subnet: Ipv4Cidr,
    /// Offset in the subnet where the next search for a free address starts.
    next_offset: u64,
    sandboxes: BTreeMap<String, Record>,
}

/// The lease file of one node.
#[derive(Debug, Clone)]
pub(crate) struct Registry {
    path: PathBuf,
    lock: PathBuf,
    subnet: Ipv4Cidr,
    /// Addresses inside the subnet that are never leased (the gateway, a local resolver).
    reserved: Vec<Ipv4Addr>,
}

impl Registry {
    /// Opens (creating the directory when needed) and checks that an existing file was
    /// written for the same subnet: leases of another subnet would be meaningless.
    pub fn open(dir: &Path, subnet: Ipv4Cidr, reserved: Vec<Ipv4Addr>) -> Result<Self, NetError> {
        if subnet.size() < 4 {
            return Err(NetError::InvalidConfig(format!(
                "subnet {subnet} is too small: it needs a gateway and at least one sandbox"
            )));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| NetError::io(format!("creating {}", dir.display()), e))?;
        let registry = Self {
            path: dir.join(FILE),
            lock: dir.join(LOCK),
            subnet,
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

    /// Records `id`, leasing an address unless `with_address` is false. Returns the record
    /// and whether it is new; an existing record is returned unchanged, so a retried
    /// create gets the address it was given the first time.
    pub fn insert(
        &self,
        id: &str,
        mode: &str,
        with_address: bool,
        rate_limit: Option<(u64, u64)>,
    ) -> Result<(Record, bool), NetError> {
        self.update(|c| {
            if let Some(existing) = c.sandboxes.get(id) {
                return Ok((existing.clone(), false));
            }
            let address = if with_address {
                Some(self.pick(c)?)
            } else {
                None
            };
            let record = Record {
                mode: mode.to_owned(),
                address,
                rate_limit,
            };
            c.sandboxes.insert(id.to_owned(), record.clone());
            Ok((record, true))
        })
    }

    /// Forgets `id` and frees its address. Returns what was recorded.
    pub fn remove(&self, id: &str) -> Result<Option<Record>, NetError> {
        self.update(|c| Ok(c.sandboxes.remove(id)))
    }

    /// The next free address at or after the cursor, wrapping once around the subnet.
    fn pick(&self, c: &mut Contents) -> Result<Ipv4Addr, NetError> {
        let size = self.subnet.size();
        let used: std::collections::HashSet<Ipv4Addr> =
            c.sandboxes.values().filter_map(|r| r.address).collect();
        for step in 0..size {
            let offset = (c.next_offset + step) % size;
            // The network and broadcast addresses are not hosts.
            if offset == 0 || offset == size - 1 {
                continue;
            }
            let Some(addr) = self.subnet.nth(offset) else {
                continue;
            };
            if self.reserved.contains(&addr) || used.contains(&addr) {
                continue;
            }
            c.next_offset = (offset + 1) % size;
            return Ok(addr);
        }
        Err(NetError::Exhausted {
            subnet: self.subnet.to_string(),
        })
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
        let out = f(&mut contents)?;
        if serde_json::to_vec(&contents).map_err(|e| self.corrupt(e))? != before
            || !self.path.exists()
        {
            self.write(&serde_json::to_vec_pretty(&contents).map_err(|e| self.corrupt(e))?)?;
        }
        Ok(out)
    }

    fn read(&self) -> Result<Contents, NetError> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Contents {
                    version: VERSION,
                    subnet: self.subnet,
                    // Offset 2: .0 is the network and .1 the gateway.
                    next_offset: 2,
                    sandboxes: BTreeMap::new(),
                });
            }
            Err(e) => return Err(NetError::io(format!("reading {}", self.path.display()), e)),
        };
        let contents: Contents = serde_json::from_slice(&text).map_err(|e| self.corrupt(e))?;
        if contents.version != VERSION {
            return Err(self.state_error(format!("version {} is not {VERSION}", contents.version)));
        }
        if contents.subnet != self.subnet && contents.sandboxes.is_empty() {
            // Nothing leased: the new subnet simply takes over.
            return Ok(Contents {
                subnet: self.subnet,
                next_offset: 2,
                ..contents
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
            Registry::open(dir.path(), subnet("10.100.0.0/29"), vec![ip("10.100.0.1")]).unwrap();
        // /29: .0 network, .1 gateway, .7 broadcast: .2-.6 are leasable.
        let mut got = Vec::new();
        for i in 0..5 {
            let (rec, new) = reg
                .insert(&format!("s{i}"), "internal", true, None)
                .unwrap();
            assert!(new);
            got.push(rec.address.unwrap());
        }
        let want: Vec<Ipv4Addr> = (2..=6).map(|n| ip(&format!("10.100.0.{n}"))).collect();
        assert_eq!(got, want);
        let err = reg.insert("s5", "internal", true, None).unwrap_err();
        assert!(err.is_exhausted(), "{err}");
        // Isolated sandboxes are recorded without an address, even when the subnet is full.
        let (iso, _) = reg.insert("iso", "isolated", false, None).unwrap();
        assert_eq!(iso.address, None);

        // Idempotent on the id.
        let (again, new) = reg.insert("s3", "internal", true, None).unwrap();
        assert!(!new);
        assert_eq!(again.address, Some(ip("10.100.0.5")));

        // A released address comes back, and only once.
        assert_eq!(
            reg.remove("s1").unwrap().unwrap().address,
            Some(ip("10.100.0.3"))
        );
        assert_eq!(reg.remove("s1").unwrap(), None);
        let (rec, _) = reg
            .insert("s6", "internet", true, Some((1000, 2000)))
            .unwrap();
        assert_eq!(rec.address, Some(ip("10.100.0.3")));
        assert!(reg
            .insert("s7", "internal", true, None)
            .unwrap_err()
            .is_exhausted());
    }

    #[test]
    fn a_released_address_is_reused_last() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path(), subnet("10.100.0.0/24"), vec![]).unwrap();
        let (a, _) = reg.insert("a", "internal", true, None).unwrap();
        reg.remove("a").unwrap();
        let (b, _) = reg.insert("b", "internal", true, None).unwrap();
        assert_ne!(a.address, b.address);
    }

    #[test]
    fn leases_survive_a_reload_and_a_subnet_change_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let net = subnet("10.100.0.0/16");
        let first = Registry::open(dir.path(), net, vec![]).unwrap();
        let (a, _) = first.insert("a", "internet", true, Some((5, 6))).unwrap();
        let (b, _) = first.insert("b", "internal", true, None).unwrap();
        drop(first);

        let reloaded = Registry::open(dir.path(), net, vec![]).unwrap();
        assert_eq!(reloaded.get("a").unwrap().unwrap(), a);
        let (c, _) = reloaded.insert("c", "internal", true, None).unwrap();
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
        let (d, _) = moved.insert("d", "internal", true, None).unwrap();
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
                            reg.insert(&format!("t{t}-{i}"), "internal", true, None)
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
