//! Placement: choose the node for a new sandbox.
//!
//! Filter: the node accepts sandboxes (READY, not draining), its last heartbeat is fresh,
//! and it has the vCPUs and memory free (counting what its ready pool VMs hold as free:
//! the node retires them for a sandbox that needs room). Sandbox slots and node labels are
//! not looked at: a node at its `max_sandboxes` is still chosen, refuses with
//! RESOURCE_EXHAUSTED, and the scheduler offers the create to the next candidate (issue 11
//! makes placement count the slots free). Score the rest, most important
//! first: a ready warm-pool VM of the template (a create in milliseconds), the template
//! already cached (no download), then the least loaded node (spreads sandboxes, keeps
//! headroom). Equal scores are broken at random so that simultaneous schedulers or
//! bursts do not all pick the same node.
//!
//! When nothing fits, [`NoNode`] says, node by node, what is missing.

use std::fmt;

use rand::Rng;

/// What the scheduler knows of one node, at the moment of placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    /// READY (false: draining or lost).
    pub accepting: bool,
    /// Its last heartbeat is recent enough.
    pub fresh: bool,
    pub capacity_vcpus: u32,
    pub capacity_memory_mb: u64,
    /// Held by its sandboxes and pool VMs, plus creates placed there and still in flight.
    pub allocated_vcpus: u32,
    pub allocated_memory_mb: u64,
    /// The part of the allocation held by ready pool VMs (of any template), which the
    /// node retires to make room for a sandbox that needs its own boot: free for fitting,
    /// not for scoring (using it costs a pool VM).
    pub reclaimable_vcpus: u32,
    pub reclaimable_memory_mb: u64,
    /// The template's root filesystem is in its cache.
    pub template_cached: bool,
    /// Booted pool VMs of the template waiting there.
    pub ready_pool: u32,
}

impl Candidate {
    fn free_vcpus(&self) -> u32 {
        self.capacity_vcpus.saturating_sub(self.allocated_vcpus)
    }

    fn free_memory_mb(&self) -> u64 {
        self.capacity_memory_mb
            .saturating_sub(self.allocated_memory_mb)
    }

    fn fit_vcpus(&self) -> u32 {
        self.free_vcpus().saturating_add(self.reclaimable_vcpus)
    }

    fn fit_memory_mb(&self) -> u64 {
        self.free_memory_mb()
            .saturating_add(self.reclaimable_memory_mb)
    }

    /// Why the node cannot take `need`, if it cannot.
    fn unfit(&self, need: &Need) -> Option<String> {
        if !self.accepting {
            return Some("not accepting sandboxes (draining or lost)".to_owned());
        }
        if !self.fresh {
            return Some("no recent heartbeat".to_owned());
        }
        let mut missing = Vec::new();
        if self.fit_vcpus() < need.vcpus {
            missing.push(format!("{} vCPUs free", self.fit_vcpus()));
        }
        if self.fit_memory_mb() < need.memory_mb {
            missing.push(format!("{} MiB memory free", self.fit_memory_mb()));
        }
        (!missing.is_empty()).then(|| missing.join(", "))
    }

    /// The share of the node's capacity that stays free after placing `need`, 0 to 1
    /// (the mean of the vCPU and memory shares).
    fn headroom(&self, need: &Need) -> f64 {
        let share = |free: f64, cap: f64| if cap > 0.0 { free / cap } else { 0.0 };
        let cpu = share(
            f64::from(self.free_vcpus().saturating_sub(need.vcpus)),
            f64::from(self.capacity_vcpus),
        );
        let mem = share(
            self.free_memory_mb().saturating_sub(need.memory_mb) as f64,
            self.capacity_memory_mb as f64,
        );
        (cpu + mem) / 2.0
    }

    fn score(&self, need: &Need) -> f64 {
        let pool = if self.ready_pool > 0 { 4.0 } else { 0.0 };
        let cached = if self.template_cached || self.ready_pool > 0 {
            2.0
        } else {
            0.0
        };
        pool + cached + self.headroom(need)
    }
}

/// What a sandbox needs of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub vcpus: u32,
    pub memory_mb: u64,
}

/// No node can take the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoNode {
    pub need: Need,
    /// Each node and why it cannot take it; empty when no node is known.
    pub reasons: Vec<(String, String)>,
}

impl fmt::Display for NoNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no node has capacity for {} vCPUs and {} MiB memory",
            self.need.vcpus, self.need.memory_mb
        )?;
        if self.reasons.is_empty() {
            return f.write_str(": no node is registered");
        }
        f.write_str(": ")?;
        for (i, (node, why)) in self.reasons.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{node}: {why}")?;
        }
        Ok(())
    }
}

impl std::error::Error for NoNode {}

/// The candidates that can take `need`, best first (ties in random order), or why none can.
pub fn rank<R: Rng + ?Sized>(
    candidates: &[Candidate],
    need: Need,
    rng: &mut R,
) -> Result<Vec<usize>, NoNode> {
    let mut reasons = Vec::new();
    let mut fit: Vec<(usize, f64, u32)> = Vec::new();
    for (i, c) in candidates.iter().enumerate() {
        match c.unfit(&need) {
            Some(why) => reasons.push((c.id.clone(), why)),
            None => fit.push((i, c.score(&need), rng.random())),
        }
    }
    if fit.is_empty() {
        return Err(NoNode { need, reasons });
    }
    // Higher score first; the random key orders equal scores.
    fit.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)));
    Ok(fit.into_iter().map(|(i, _, _)| i).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> Candidate {
        Candidate {
            id: id.into(),
            accepting: true,
            fresh: true,
            capacity_vcpus: 8,
            capacity_memory_mb: 8192,
            allocated_vcpus: 0,
            allocated_memory_mb: 0,
            reclaimable_vcpus: 0,
            reclaimable_memory_mb: 0,
            template_cached: false,
            ready_pool: 0,
        }
    }

    const NEED: Need = Need {
        vcpus: 2,
        memory_mb: 1024,
    };

    fn first(candidates: &[Candidate]) -> String {
        let order = rank(candidates, NEED, &mut rand::rng()).unwrap();
        candidates[order[0]].id.clone()
    }

    #[test]
    fn pool_beats_cache_beats_load() {
        let mut busy_pool = node("pool");
        busy_pool.ready_pool = 1;
        busy_pool.allocated_vcpus = 6;
        let mut cached = node("cached");
        cached.template_cached = true;
        let empty = node("empty");
        assert_eq!(first(&[empty.clone(), cached.clone(), busy_pool]), "pool");
        assert_eq!(first(&[empty.clone(), cached]), "cached");
        let mut loaded = node("loaded");
        loaded.allocated_memory_mb = 4096;
        assert_eq!(first(&[loaded, empty]), "empty");
    }

    #[test]
    fn ready_pool_vms_count_as_room() {
        // Full of pool VMs: a create fits (the node retires pool VMs for it), but a node
        // with the same room truly free still scores higher.
        let mut pooled = node("pooled");
        pooled.allocated_vcpus = 8;
        pooled.allocated_memory_mb = 8192;
        pooled.reclaimable_vcpus = 4;
        pooled.reclaimable_memory_mb = 4096;
        assert_eq!(first(std::slice::from_ref(&pooled)), "pooled");
        let mut half = node("half");
        half.allocated_vcpus = 4;
        half.allocated_memory_mb = 4096;
        assert_eq!(first(&[pooled.clone(), half]), "half");
        pooled.reclaimable_memory_mb = 512;
        let err = rank(&[pooled], NEED, &mut rand::rng()).unwrap_err();
        assert!(err.to_string().contains("512 MiB memory free"), "{err}");
    }

    #[test]
    fn ties_are_broken_at_random() {
        let nodes = [node("a"), node("b")];
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            seen.insert(first(&nodes));
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
    }

    #[test]
    fn nodes_that_cannot_take_it_are_named_with_what_is_missing() {
        let mut full = node("full");
        full.allocated_vcpus = 7;
        full.allocated_memory_mb = 8000;
        let mut draining = node("draining");
        draining.accepting = false;
        let mut silent = node("silent");
        silent.fresh = false;
        let err = rank(&[full, draining, silent], NEED, &mut rand::rng()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("no node has capacity for 2 vCPUs and 1024 MiB memory: "),
            "{text}"
        );
        assert!(
            text.contains("full: 1 vCPUs free, 192 MiB memory free"),
            "{text}"
        );
        assert!(text.contains("draining: not accepting"), "{text}");
        assert!(text.contains("silent: no recent heartbeat"), "{text}");
        let none = rank(&[], NEED, &mut rand::rng()).unwrap_err();
        assert!(none.to_string().ends_with("no node is registered"));
    }
}
