//! The node's webhook outbox: events decided by the shards (`conv::offline` for
//! `message.offline`, the user owners for `user.online` / `user.offline`) go to the
//! webhook sender's thread, which signs, batches and retries them (`webhook`).
//!
//! On one node the events live in the sender's memory. In a cluster each event is first
//! kept in Redis under this node run (`rp:{ctl}:wh:{node}:<epoch>`) and forgotten once it is
//! delivered or dropped; a node run that dies with events pending leaves them there, and
//! the next node whose upkeep finds the run's lease gone takes them over and sends them
//! (PROTOCOL.md: "events pending on a node that dies are taken over by another node once
//! its lease expires"). Delivery is at least once: receivers dedupe by `id`.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::WebhookConfig;
use crate::store::{RedisStore, StoreError};
use crate::webhook::{Counters, Event, EventKind, Sender, SenderConfig};

/// The node's webhook outbox (shared by every shard; `Send + Sync`).
pub struct Outbox {
    sender: Sender,
    redis: Option<RedisStore>,
    /// `webhook.offline_delay_ms`.
    pub offline_delay_ms: u64,
}

impl Outbox {
    /// Starts the sender's thread. With `redis` (a cluster), finished events are removed
    /// from Redis by that thread.
    pub fn start(config: &WebhookConfig, redis: Option<RedisStore>) -> std::io::Result<Outbox> {
        let sender_config = SenderConfig {
            url: config.url.clone(),
            secret: config.secret.clone(),
            timeout_ms: config.timeout_ms,
            max_batch: config.max_batch,
            max_attempts: config.max_attempts,
            queue_max: config.queue_max,
            ..SenderConfig::default()
        };
        let forget = redis.clone();
        let done: crate::webhook::Done = Box::new(move |ids: &[String]| {
            let Some(redis) = &forget else { return };
            // On the sender's own thread: waiting here blocks no shard.
            let cmds = redis.hook_done_cmds(ids);
            match redis.pool().submit(cmds).map(|rx| rx.recv()) {
                Ok(Ok(Ok(_))) => {}
                _ => warn!(
                    events = ids.len(),
                    "webhook: delivered events not removed from Redis (sent again later)"
                ),
            }
        });
        let sender = Sender::start(sender_config, done)?;
        Ok(Outbox { sender, redis, offline_delay_ms: config.offline_delay_ms })
    }

    /// Sends an event: kept in Redis first in a cluster (so a dead node's events are sent
    /// by another), then handed to the sender. Never fails: an event Redis could not
    /// keep is still sent from memory.
    pub async fn emit(&self, kind: EventKind, id: String, json: String) {
        if let Some(redis) = &self.redis {
            if let Err(e) = redis.hook_pending(&id, &json).await {
                warn!(id = %id, error = %e, "webhook: event not kept in Redis; sent from memory only");
            }
        }
        self.sender.submit(Event { id, kind, json });
    }

    /// Takes over the pending events of dead node runs (a cluster; see `HOOK_CLAIM`).
    pub async fn take_over(&self) -> Result<usize, StoreError> {
        let Some(redis) = &self.redis else { return Ok(0) };
        let events = redis.hook_claim().await?;
        let n = events.len();
        if n > 0 {
            info!(events = n, "webhook: took over the pending events of a node that is gone");
        }
        for (id, json) in events {
            let kind = kind_of(&json);
            self.sender.submit(Event { id, kind, json });
        }
        Ok(n)
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.sender.counters()
    }

    /// Tries to deliver what is queued within `wait` (a drain); what is left stays in
    /// Redis for another node in a cluster.
    pub fn stop(&self, wait: Duration) {
        self.sender.stop(wait);
    }
}

/// The kind of a stored event, from its `type` field.
fn kind_of(json: &str) -> EventKind {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        kind: &'a str,
    }
    let typed = serde_json::from_str::<Typed>(json).ok();
    EventKind::ALL
        .into_iter()
        .find(|k| typed.as_ref().is_some_and(|t| t.kind == k.label()))
        .unwrap_or(EventKind::MessageOffline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_event_keeps_its_kind() {
        assert_eq!(kind_of(r#"{"type":"user.offline","id":"x"}"#), EventKind::UserOffline);
        assert_eq!(kind_of(r#"{"id":"x","type":"user.online"}"#), EventKind::UserOnline);
        assert_eq!(kind_of(r#"{"type":"message.offline"}"#), EventKind::MessageOffline);
    }
}
