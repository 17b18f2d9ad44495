//! The node's standing in Redis, kept by the control thread: its lease, its presence,
//! the purge of dead nodes' presence, and (with `[cluster]` and no fixed peers) the list
//! of peers to subscribe to.
//!
//! Every [`RENEW_EVERY`] the node renews a lease key that expires after [`LEASE_TTL_MS`]
//! and sweeps: any node whose lease is gone (killed, partitioned, paused) has its
//! presence purged by whichever live node sweeps first (a purge cut short is finished by
//! the next sweep; see `store::redis`). A node
//! killed outright is thus gone from presence within `LEASE_TTL_MS + RENEW_EVERY` (4 s).
//! Presence entries and leases carry the node's epoch (its start time), so a restarted
//! node never inherits, nor protects, its previous life's entries.
//!
//! When a renewal finds the lease missing (Redis restarted without its data, or this node
//! was paused past its lease and purged), the shards write their presence again and
//! re-seed their conversations' counters above the seqs they have seen.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::mesh::{Mesh, ShardMsg, ShardWide};
use crate::node::Node;

/// How long a node's lease lives without renewal.
pub const LEASE_TTL_MS: u64 = 3000;

/// How often the lease is renewed, dead nodes swept and peers looked up.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

/// Runs for the node's life (a no-op with the embedded store).
pub async fn upkeep(node: Arc<Node>, mesh: Rc<Mesh>) {
    let Some(redis) = node.redis.clone() else { return };
    let advertise = node.cluster.as_ref().map(|c| c.advertise.clone());
    let discover = node.config.cluster.as_ref().is_some_and(|c| c.peers.is_empty());
    let mut was_up = true;
    loop {
        if node.presence_lost.swap(false, Ordering::Relaxed) {
            // Drop what is left of this node's entries; the renewal below then finds no
            // lease and the shards write every live session again.
            if let Err(e) = redis.leave().await {
                warn!(error = %e, "could not clear this node's presence");
                node.presence_lost.store(true, Ordering::Relaxed);
            }
        }
        let up = match redis.renew_lease(advertise.as_deref(), LEASE_TTL_MS).await {
            Ok(held) => {
                if !held {
                    info!("registering this node's presence in Redis");
                    for shard in 0..node.shard_count {
                        mesh.send(shard, ShardMsg::Shard(ShardWide::Reregister));
                    }
                }
                match redis.sweep().await {
                    Ok(purged) => {
                        for gone in purged {
                            info!(node = %gone, "purged the presence of a node whose lease ended");
                            node.presence_purges.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => warn!(error = %e, "sweep failed"),
                }
                if let Some(outbox) = &node.webhooks {
                    if let Err(e) = outbox.take_over().await {
                        warn!(error = %e, "webhook: could not look for a dead node's pending events");
                    }
                }
                if let (true, Some(links)) = (discover, &node.cluster) {
                    if let Ok(peers) = redis.peers().await {
                        links.bus.set_peers(peers.into_iter().map(|(_, endpoint)| endpoint).collect());
                    }
                }
                true
            }
            Err(e) => {
                if was_up {
                    warn!(error = %e, "Redis unreachable: sends answer `unavailable` until it is back");
                }
                false
            }
        };
        if up && !was_up {
            info!("Redis reachable again");
        }
        was_up = up;
        node.store_up.store(up, Ordering::Relaxed);
        glommio::timer::sleep(RENEW_EVERY).await;
    }
}

/// Leaves the cluster on a drain: the lease and this node's presence go at once instead
/// of when the lease would have expired, and the ZeroMQ sockets close.
pub async fn leave(node: &Node) {
    if let Some(redis) = &node.redis {
        let left = glommio::timer::timeout(Duration::from_secs(2), async { Ok(redis.leave().await) }).await;
        if !matches!(left, Ok(Ok(()))) {
            warn!("could not remove this node from Redis; its lease expires on its own");
        }
    }
    if let Some(links) = &node.cluster {
        links.bus.shutdown();
    }
}
