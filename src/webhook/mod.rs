//! Webhooks (PROTOCOL.md, "Webhooks: offline members and presence"): the HTTP delivery
//! half. What to send, and when, is decided by the callers; [`Sender`] only queues,
//! batches, signs, posts and retries, on a thread of its own.

pub mod sender;

pub use sender::{sign, Counters, Done, Event, EventKind, Sender, SenderConfig};
