//! Warm pools: per template, VMs booted ahead of time so that a create only has to hand
//! one over (configure its identity), which takes milliseconds instead of a boot.
//!
//! A background task tops every pool up to `min_ready` (never past `max_ready`, never
//! past the node's capacity), right after a VM is taken and every
//! `replenish_interval`; it retires VMs idle longer than `max_idle` (they are replaced
//! while the pool is under `min_ready`, so long-idle VMs are recycled), VMs of a
//! template digest that is no longer current, and every VM of a template that is gone
//! (deleted, or not READY again yet). Boots run in the background; a create never waits
//! for a refill.

use std::sync::{Arc, Weak};
use std::time::Instant;

use crate::node::{lock, Inner, PoolState, Pooled};

/// The longest a pool boot waits for the creates in flight to end: under a steady stream
/// of creates the pool still refills.
const MAX_DEFER: std::time::Duration = std::time::Duration::from_secs(2);
use crate::{NodeError, PoolTarget};

/// The refill loop; ends when the node is dropped.
pub(crate) async fn refiller(node: Weak<Inner>) {
    let (interval, wake) = match node.upgrade() {
        Some(inner) => (inner.config.pool.replenish_interval, inner.refill.clone()),
        None => return,
    };
    loop {
        {
            let Some(inner) = node.upgrade() else { return };
            for target in inner.config.pool.targets.clone() {
                if let Err(e) = top_up(&inner, &target).await {
                    tracing::debug!(template = %target.template, error = %e, "pool not topped up");
                }
            }
        }
        // Not holding the node while waiting, so that dropping it ends this loop.
        let _ = tokio::time::timeout(interval, wake.notified()).await;
    }
}

async fn top_up(inner: &Arc<Inner>, target: &PoolTarget) -> Result<(), NodeError> {
    let template = match inner.templates.resolve(&target.template, None).await {
        Ok(template) => template,
        // The template is gone (NOT_FOUND: deleted) or not usable (its first warmup runs
        // or failed, after a delete): its VMs can serve no create. An unreachable
        // database is no such news, and keeps them.
        Err(e @ (NodeError::NotFound { .. } | NodeError::FailedPrecondition(_))) => {
            let retired = {
                let mut pools = lock(&inner.pools);
                let pool = pools.entry(target.template.clone()).or_default();
                // VMs still booting for the old digest are retired as they finish.
                pool.digest.clear();
                std::mem::take(&mut pool.ready)
            };
            for pooled in retired {
                tracing::info!(vm = %pooled.booted.record.vm_id, template = %target.template, "retiring a pooled VM of a template that is gone");
                retire(inner, pooled).await;
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    // Retire what is stale or idle too long.
    let retired: Vec<Pooled> = {
        let mut pools = lock(&inner.pools);
        let pool = pools.entry(target.template.clone()).or_default();
        let max_idle = inner.config.pool.max_idle;
        let mut retired = Vec::new();
        if pool.digest != template.digest {
            pool.digest = template.digest.clone();
            retired.append(&mut pool.ready);
        }
        let (keep, old): (Vec<Pooled>, Vec<Pooled>) = std::mem::take(&mut pool.ready)
            .into_iter()
            .partition(|p| p.ready_at.elapsed() < max_idle);
        pool.ready = keep;
        retired.extend(old);
        retired
    };
    for pooled in retired {
        tracing::info!(vm = %pooled.booted.record.vm_id, template = %target.template, "retiring a pooled VM");
        retire(inner, pooled).await;
    }
    // Boot what is missing, in the background.
    let missing = {
        let mut pools = lock(&inner.pools);
        let pool = pools.entry(target.template.clone()).or_default();
        let have = pool.ready.len() as u32 + pool.starting;
        let want = target.min_ready.min(target.max_ready);
        let missing = want.saturating_sub(have);
        pool.starting += missing;
        missing
    };
    for _ in 0..missing {
        let inner = inner.clone();
        let target = target.clone();
        let template = template.clone();
        tokio::spawn(async move {
            let result = boot_one(&inner, &target, &template).await;
            let stale = {
                let mut pools = lock(&inner.pools);
                let pool = pools.entry(target.template.clone()).or_default();
                pool.starting = pool.starting.saturating_sub(1);
                match result {
                    Ok(pooled) if pool.digest == template.digest => {
                        pool.ready.push(pooled);
                        None
                    }
                    Ok(pooled) => Some(pooled),
                    Err(e) => {
                        tracing::warn!(template = %target.template, error = %e, "pool boot failed");
                        None
                    }
                }
            };
            if let Some(pooled) = stale {
                retire(&inner, pooled).await;
            }
        });
    }
    Ok(())
}

async fn boot_one(
    inner: &Arc<Inner>,
    target: &PoolTarget,
    template: &crate::ResolvedTemplate,
) -> Result<Pooled, NodeError> {
    // A boot is CPU-heavy background work: a few at a time, and out of the way of the
    // creates in flight, which are what someone is waiting for.
    let _permit = inner
        .pool_boots
        .acquire()
        .await
        .map_err(|_| NodeError::Internal("the pool's boot permits are gone".to_owned()))?;
    let defer_until = tokio::time::Instant::now() + MAX_DEFER;
    loop {
        let idle = inner.creates_idle.notified();
        tokio::pin!(idle);
        // Registered before looking, so that the last create ending in between wakes it.
        idle.as_mut().enable();
        if lock(&inner.creating).is_empty() {
            break;
        }
        if tokio::time::timeout_at(defer_until, idle).await.is_err() {
            break;
        }
    }
    inner.reserve(target.vcpus, target.memory_mb, false)?;
    let result = async {
        let cached = inner
            .cache
            .acquire(&template.rootfs_key)
            .await
            .map_err(|e| NodeError::Unavailable {
                context: "fetching the template",
                message: crate::describe(&e),
            })?;
        let vm_id = format!("pool-{:016x}", rand::random::<u64>());
        let rate = match target.network_mode {
            nanobox_core::NetworkMode::Internet => {
                inner.config.default_rate_limit.map(crate::node::rate_limit)
            }
            _ => None,
        };
        inner
            .booter
            .boot(
                vm_id,
                template,
                cached,
                crate::vm::VmShape {
                    vcpus: target.vcpus,
                    memory_mb: target.memory_mb,
                    mode: target.network_mode,
                    rate_limit: rate,
                    tenant_scope: None,
                },
            )
            .await
    }
    .await;
    crate::metrics::vm_booted("pool", result.as_ref().ok().map(|b| b.boot_time));
    match result {
        Ok(booted) => {
            tracing::info!(vm = %booted.record.vm_id, template = %target.template, boot_ms = booted.boot_time.as_millis() as u64, "pooled VM ready");
            Ok(Pooled {
                booted,
                ready_at: Instant::now(),
            })
        }
        Err(e) => {
            inner.release(target.vcpus, target.memory_mb, false);
            Err(e)
        }
    }
}

async fn retire(inner: &Inner, pooled: Pooled) {
    let booted = pooled.booted;
    let (vcpus, memory) = (booted.record.vcpus, booted.record.memory_mb);
    inner.booter.teardown(Some(booted.vm), &booted.record).await;
    inner.release(vcpus, memory, false);
}

/// Takes capacity for a sandbox that needs its own boot, retiring ready pooled VMs
/// (the longest idle first, of any template) when vCPUs or memory are short and
/// retiring them would make enough room: a VM booted ahead of time must not turn away a
/// sandbox someone is asking for now. The refill loop boots them again once there is
/// room. Nothing is retired for a create that would not fit anyway.
pub(crate) async fn reserve_for_sandbox(
    inner: &Inner,
    vcpus: u32,
    memory_mb: u32,
) -> Result<(), NodeError> {
    loop {
        let short = match inner.reserve(vcpus, memory_mb, true) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let Some(victims) = victims_for(inner, vcpus, memory_mb) else {
            return Err(short);
        };
        for victim in victims {
            tracing::info!(vm = %victim.booted.record.vm_id, "retiring a pooled VM to make room for a sandbox");
            retire(inner, victim).await;
        }
    }
}

/// Takes out of their pools the fewest ready VMs (oldest first) whose capacity, with
/// what is free, fits `vcpus` and `memory_mb`; `None` if even all of them would not (or
/// the sandbox slots are full, which pooled VMs do not hold).
fn victims_for(inner: &Inner, vcpus: u32, memory_mb: u32) -> Option<Vec<Pooled>> {
    let capacity = inner.config.capacity;
    let mut pools = lock(&inner.pools);
    let allocated = *lock(&inner.allocated);
    if allocated.sandboxes >= capacity.max_sandboxes {
        return None;
    }
    let mut free_vcpus = capacity.vcpus.saturating_sub(allocated.vcpus);
    let mut free_memory = capacity.memory_mb.saturating_sub(allocated.memory_mb);
    let mut ready: Vec<(Instant, nanobox_core::TemplateName, usize)> = pools
        .iter()
        .flat_map(|(name, pool)| {
            pool.ready
                .iter()
                .enumerate()
                .map(move |(i, p)| (p.ready_at, name.clone(), i))
        })
        .collect();
    ready.sort_by_key(|(at, _, _)| *at);
    let mut chosen = Vec::new();
    for (_, name, i) in ready {
        if free_vcpus >= vcpus && free_memory >= u64::from(memory_mb) {
            break;
        }
        let record = &pools.get(&name)?.ready.get(i)?.booted.record;
        free_vcpus += record.vcpus;
        free_memory += u64::from(record.memory_mb);
        chosen.push((name, i));
    }
    if chosen.is_empty() || free_vcpus < vcpus || free_memory < u64::from(memory_mb) {
        return None;
    }
    // Highest index first, so that removing one does not move the others.
    chosen.sort_by_key(|(_, i)| std::cmp::Reverse(*i));
    let victims = chosen
        .into_iter()
        .filter_map(|(name, i)| pools.get_mut(&name).map(|pool| pool.ready.remove(i)))
        .collect();
    Some(victims)
}

/// Destroys every pooled VM (shutdown).
pub(crate) async fn drain(inner: &Arc<Inner>) {
    let all: Vec<Pooled> = {
        let mut pools = lock(&inner.pools);
        pools
            .values_mut()
            .flat_map(|p: &mut PoolState| std::mem::take(&mut p.ready))
            .collect()
    };
    for pooled in all {
        retire(inner, pooled).await;
    }
}
