//! Why a connection's live messages of a conversation are not simply sent: the
//! per-conversation delivery modes ([`ConvMode`], kept by [`Modes`]), the messages a new
//! connection holds for its first `sync` ([`Held`]), and the answers to `sync`s still
//! going out with the live messages queued behind them ([`Backlog`], [`Pending`]).
//!
//! Pure bookkeeping, no I/O: the session decides when to consult it and passes in what
//! lives elsewhere, such as whether its grace after `hello` is on.

use std::collections::VecDeque;
use std::ops::{Index, IndexMut};

use bytes::Bytes;

use crate::ids::Key;
use crate::protocol;
use crate::ws::codec;

/// Messages a new connection holds for its first `sync`, in arrival order.
#[derive(Default)]
pub(super) struct Held {
    pub(super) msgs: Vec<(Key, u64, Bytes)>,
    /// Their bytes (bounded by the outbound budget).
    pub(super) bytes: usize,
}

impl Held {
    /// Takes out the messages of `conv`, in order.
    pub(super) fn take(&mut self, conv: &Key) -> Vec<(u64, Bytes)> {
        let mut taken = Vec::new();
        self.msgs.retain(|(c, seq, frame)| {
            let keep = c != conv;
            if !keep {
                taken.push((*seq, frame.clone()));
            }
            keep
        });
        self.bytes = self.msgs.iter().map(|(_, _, f)| f.len()).sum();
        taken
    }
}

/// The answers to `sync`s still going out, in order, and the live messages of their
/// conversations that came after them.
#[derive(Default)]
pub(super) struct Backlog {
    pub(super) items: VecDeque<Pending>,
    /// Bytes of live messages in `items` (bounded by the outbound budget).
    pub(super) live_bytes: usize,
}

/// Why the live messages of one conversation are not simply sent to a connection.
#[derive(Debug)]
pub(super) struct ConvMode {
    pub(super) conv: Key,
    /// `sync`s of it asked for and not answered yet: their replays will carry the live
    /// messages that come meanwhile, which are dropped here.
    pub(super) syncs: u16,
    /// Answers of it still in the replay backlog: live messages queue behind them.
    pub(super) replays: u16,
    /// What happens to live messages once no sync is in flight.
    pub(super) then: Then,
    /// Live seqs `from..=to` dropped because the backlog behind a replay outgrew the
    /// budget: a `gap` for them follows the replay.
    pub(super) gap: Option<(u64, u64)>,
    /// A sync of it was answered on this connection: during the connection's grace its
    /// live messages are sent, not held.
    pub(super) synced: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Then {
    /// Sent (queued behind a replay while one is in the backlog).
    Send,
    /// A `gap` was sent: the client's `sync` from its start will carry them; dropped.
    Gapped,
    /// Synced from seqs the client holds but this node had not delivered yet (they
    /// reached the client through another node, or were stored before this connection
    /// took part in the conversation): seqs up to this one are dropped, the first above
    /// it ends the mode. Rare: a device moving node in the instant a message is on its way
    /// to the new node.
    Ahead(u64),
}

impl ConvMode {
    fn new(conv: &Key) -> ConvMode {
        ConvMode { conv: conv.clone(), syncs: 0, replays: 0, then: Then::Send, gap: None, synced: false }
    }

    /// Nothing special any more: live messages are simply sent.
    fn is_plain(&self) -> bool {
        self.syncs == 0 && self.replays == 0 && self.then == Then::Send && self.gap.is_none()
    }
}

/// An item of the replay backlog.
#[derive(Debug)]
pub(super) enum Pending {
    /// A replayed message.
    Msg { bytes: Bytes },
    /// A live message of a conversation with a replay ahead of it in the backlog.
    Live { bytes: Bytes },
    /// `synced`, or the `gap` of what a `limit` left out.
    Frame(Bytes),
    /// The end of one answer to a `sync` of this conversation.
    End(Key),
}

impl Pending {
    pub(super) fn len(&self) -> usize {
        match self {
            Pending::Msg { bytes } | Pending::Live { bytes } | Pending::Frame(bytes) => bytes.len(),
            Pending::End(_) => 0,
        }
    }
}

/// A connection's conversations whose live messages are not simply sent, one
/// [`ConvMode`] each. Usually empty: a conversation's mode goes once it is plain again
/// (see [`Modes::tidy`]).
#[derive(Default)]
pub(super) struct Modes(Vec<ConvMode>);

impl Index<usize> for Modes {
    type Output = ConvMode;

    fn index(&self, i: usize) -> &ConvMode {
        &self.0[i]
    }
}

impl IndexMut<usize> for Modes {
    fn index_mut(&mut self, i: usize) -> &mut ConvMode {
        &mut self.0[i]
    }
}

impl Modes {
    /// Where the mode of `conv` is, if it has one.
    pub(super) fn position(&self, conv: &Key) -> Option<usize> {
        self.0.iter().position(|m| m.conv == *conv)
    }

    /// The mode of `conv`, if it has one.
    pub(super) fn get_mut(&mut self, conv: &Key) -> Option<&mut ConvMode> {
        self.0.iter_mut().find(|m| m.conv == *conv)
    }

    /// The mode of `conv`, made plain if it had none.
    pub(super) fn mode_mut(&mut self, conv: &Key) -> &mut ConvMode {
        let i = match self.position(conv) {
            Some(i) => i,
            None => {
                self.0.push(ConvMode::new(conv));
                self.0.len() - 1
            }
        };
        &mut self.0[i]
    }

    #[cfg(test)]
    pub(super) fn mode(&self, conv: &str) -> Option<&ConvMode> {
        self.0.iter().find(|m| &*m.conv == conv)
    }

    /// Whether the live messages of `conv` wait for the client's `sync` after a `gap`.
    pub(super) fn is_gapped(&self, conv: &Key) -> bool {
        self.0.iter().any(|m| m.conv == *conv && m.then == Then::Gapped)
    }

    /// Forgets mode `i` once it is plain, unless the connection's grace is on (`grace`)
    /// and the conversation was synced during it (it is sent while the others are held).
    pub(super) fn tidy(&mut self, i: usize, grace: bool) {
        let m = &self.0[i];
        if m.is_plain() && !(grace && m.synced) {
            self.0.swap_remove(i);
        }
    }

    /// The connection's grace is over: the modes kept only because their conversation
    /// was synced during it go, like any other plain mode.
    pub(super) fn end_grace(&mut self) {
        self.0.retain(|m| !m.is_plain());
    }

    /// The client asked to `sync` `conv`: its live messages are dropped until the answer,
    /// and a gap's pause or an earlier sync's skip ends.
    pub(super) fn sync_started(&mut self, conv: &Key) {
        let m = self.mode_mut(conv);
        m.syncs = m.syncs.saturating_add(1);
        m.then = Then::Send;
    }

    /// A `sync` of `conv` was answered with a replay, which goes into the backlog; live
    /// messages then go `then`.
    pub(super) fn sync_answered(&mut self, conv: &Key, then: Then) {
        let m = self.mode_mut(conv);
        m.syncs = m.syncs.saturating_sub(1);
        m.replays += 1;
        m.synced = true;
        m.then = then;
    }

    /// `sync`s asked for and not yet answered, over all conversations.
    pub(super) fn syncs_in_flight(&self) -> usize {
        self.0.iter().map(|m| m.syncs as usize).sum()
    }

    /// A `sync` of `conv` was answered with an error, not a replay. When `gapped`, the
    /// live messages it held back are in no replay now: like after a `gap`, the
    /// conversation's live messages wait for the client's next `sync`, unless another
    /// sync in flight carries them. `grace`: whether the connection's grace is on.
    pub(super) fn sync_failed(&mut self, conv: &Key, gapped: bool, grace: bool) {
        let Some(i) = self.position(conv) else { return };
        let m = &mut self.0[i];
        m.syncs = m.syncs.saturating_sub(1);
        if gapped && m.syncs == 0 && m.replays == 0 {
            m.then = Then::Gapped;
        }
        self.tidy(i, grace);
    }

    /// The end of one answer of `conv` left the replay backlog. Returns the `gap` frame
    /// for live messages dropped behind it, if any (the conversation then waits for the
    /// client's `sync`). `grace`: whether the connection's grace is on.
    pub(super) fn replay_done(&mut self, conv: &Key, grace: bool) -> Option<Bytes> {
        let i = self.position(conv)?;
        let m = &mut self.0[i];
        m.replays = m.replays.saturating_sub(1);
        let mut gap = None;
        if m.replays == 0 {
            if let Some((from, to)) = m.gap.take() {
                if m.syncs == 0 {
                    m.then = Then::Gapped;
                    gap = Some(codec::text_frame(&protocol::gap_json(conv, from, to)));
                }
            }
        }
        self.tidy(i, grace);
        gap
    }

    /// After a `gap` of `conv`, its live messages wait for the client's `sync` (which
    /// replays from the gap on), so the connection never sees them out of order.
    pub(super) fn set_gapped(&mut self, conv: &Key) {
        let m = self.mode_mut(conv);
        if m.syncs == 0 {
            m.then = Then::Gapped;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn ids(modes: &Modes) -> Vec<(String, u16, u16, Then)> {
        modes.0.iter().map(|m| (m.conv.to_string(), m.syncs, m.replays, m.then)).collect()
    }

    #[test]
    fn a_failed_sync_holds_live_messages_for_the_next_one() {
        let mut modes = Modes::default();
        let (a, b): (Key, Key) = (Arc::from("a"), Arc::from("b"));
        // Found by the soak: during a Redis restart a sync answered `unavailable`, the live
        // messages it had held back were in no replay, and the next one arrived past them.
        modes.sync_started(&a);
        modes.sync_failed(&a, true, false);
        assert_eq!(ids(&modes), vec![("a".into(), 0, 0, Then::Gapped)]);
        // The client's retry ends it once its replay is out.
        modes.sync_started(&a);
        modes.sync_answered(&a, Then::Send);
        assert_eq!(modes.replay_done(&a, false), None);
        assert!(ids(&modes).is_empty(), "a plain conversation keeps no mode");
        // With another sync of it in flight, that one's replay carries them.
        modes.sync_started(&b);
        modes.sync_started(&b);
        modes.sync_failed(&b, true, false);
        assert_eq!(ids(&modes), vec![("b".into(), 1, 0, Then::Send)]);
        // Not a member: nothing stays behind.
        modes.sync_failed(&b, false, false);
        assert!(ids(&modes).is_empty());
    }

    #[test]
    fn live_messages_dropped_behind_a_replay_become_one_gap_after_it() {
        let mut modes = Modes::default();
        let a: Key = Arc::from("a");
        modes.sync_started(&a);
        modes.sync_answered(&a, Then::Send);
        modes[0].gap = Some((7, 9));
        let gap = modes.replay_done(&a, false).expect("a gap after the replay");
        let text: serde_json::Value = serde_json::from_slice(&gap[2..]).expect("json");
        assert_eq!(text, serde_json::json!({"op": "gap", "conv": "a", "from": 7, "to": 9}));
        assert_eq!(modes.mode("a").map(|m| m.then), Some(Then::Gapped), "live waits for the sync");
    }

    #[test]
    fn during_the_grace_a_synced_conversation_keeps_its_mode() {
        let mut modes = Modes::default();
        let (a, b): (Key, Key) = (Arc::from("a"), Arc::from("b"));
        modes.sync_answered(&a, Then::Send);
        assert_eq!(modes.replay_done(&a, true), None);
        assert!(modes.mode("a").is_some_and(|m| m.synced && m.is_plain()), "sent, not held");
        // A conversation whose join skip ended is held like any other.
        modes.mode_mut(&b).then = Then::Ahead(3);
        modes[1].then = Then::Send;
        modes.tidy(1, true);
        assert!(modes.mode("b").is_none());
        modes.tidy(0, false);
        assert!(modes.0.is_empty(), "the grace is over");
    }
}
