//! A conversation's delivery order on one node of a cluster: messages and membership
//! changes, handed on strictly by seq ([`Holdback`]).

use bytes::Bytes;

use crate::ids::Key;
use crate::mesh::SessionRef;

/// A message waiting for its turn in [`Holdback`]. `exclude` is the sending session
/// (a local send) that must not get its own message.
pub type Held = (Bytes, Option<SessionRef>);

/// A membership change of a conversation, placed in its order: made when the
/// conversation's last seq was `at`, so messages up to `at` go to the members before it
/// and later ones to the members after it, on every node alike.
#[derive(Debug)]
pub struct MembersChange {
    pub at: u64,
    pub version: u64,
    pub added: Vec<Key>,
    pub removed: Vec<Key>,
}

/// What a [`Holdback`] hands on next.
pub enum Step {
    Msg(u64, Held),
    Members(MembersChange),
}

/// The owner shard's delivery order for one conversation in a cluster: messages are
/// sequenced in Redis by whichever node took the send, so they reach this node out of
/// order (a local send can come back from Redis before an earlier seq from another node
/// arrives over ZeroMQ). The owner hands them to its shards strictly by seq: a message
/// ahead of the next expected one waits here, and a hole that lasts past
/// [`REPAIR_AFTER_MS`] is filled from the store.
#[derive(Debug, Default)]
pub struct Holdback {
    /// The highest seq handed to the shards (or known to every local session, as the
    /// baseline read when the node took an interest).
    delivered: u64,
    /// The highest seq known to exist: arrived, or seen in a store read.
    highest: u64,
    held: std::collections::BTreeMap<u64, Held>,
    /// A repair is scheduled or running.
    pub repair_pending: bool,
    /// When the last message arrived (shard milliseconds), for the tail check.
    pub active_ms: u64,
    /// A tail check is queued.
    pub check_queued: bool,
    /// The conversation's members version that this node's view of its membership (the
    /// shards' indexes) reflects. A message taken under a newer one means a change this
    /// node missed (a `members` message lost between nodes): delivery waits while the
    /// member set is read again (see [`Shard::reconcile`]).
    pub members_version: u64,
    /// The newest members version heard of (from a message or a change).
    pub members_wanted: u64,
    /// The member set is being read again: nothing is handed on meanwhile.
    pub reconciling: bool,
    /// Membership changes made after seqs this node has not handed on yet, oldest first:
    /// each is handed on once the order reaches its seq.
    parked: std::collections::VecDeque<MembersChange>,
}

impl Holdback {
    /// Starts after `baseline`: seqs up to it are the clients' to `sync`. The membership
    /// the node's sessions were joined under is `members_version`.
    pub fn new(baseline: u64, members_version: u64) -> Holdback {
        Holdback {
            delivered: baseline,
            highest: baseline,
            members_version,
            members_wanted: members_version,
            ..Holdback::default()
        }
    }

    /// A message or change was taken under members version `version`: true when this node
    /// must read the member set again before it hands anything more on (and was not
    /// already doing so).
    pub fn needs_reconcile(&mut self, version: u64) -> bool {
        self.members_wanted = self.members_wanted.max(version);
        if self.members_wanted <= self.members_version || self.reconciling {
            return false;
        }
        self.reconciling = true;
        true
    }

    /// The member set was read again, under `version` (the changes up to it waiting for
    /// their seq are in it). True when a newer change was heard of meanwhile (read once
    /// more).
    pub fn reconciled(&mut self, version: u64) -> bool {
        self.parked.retain(|change| change.version > version);
        self.members_version = self.members_version.max(version);
        self.reconciling = self.members_wanted > self.members_version;
        self.reconciling
    }

    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The highest seq this node knows of (the floor for a store that lost its data).
    pub fn highest(&self) -> u64 {
        self.highest.max(self.delivered)
    }

    /// Offers a message; false when it is old or already waiting (dropped).
    pub fn offer(&mut self, seq: u64, held: Held) -> bool {
        self.highest = self.highest.max(seq);
        if seq <= self.delivered || self.held.contains_key(&seq) {
            return false;
        }
        self.held.insert(seq, held);
        true
    }

    /// A store read saw `last` as the conversation's last seq.
    pub fn saw(&mut self, last: u64) {
        self.highest = self.highest.max(last);
    }

    /// The next membership change of this node's view (`change.version` is one past
    /// `members_version`): it takes its place in the order, after seq `change.at`.
    pub fn place(&mut self, change: MembersChange) {
        self.highest = self.highest.max(change.at);
        self.members_version = change.version;
        self.members_wanted = self.members_wanted.max(change.version);
        self.parked.push_back(change);
    }

    /// What comes next in order, if it is here: a membership change whose seq has been
    /// handed on, else the next message (nothing while the member set is read again).
    pub fn next_step(&mut self) -> Option<Step> {
        if self.reconciling {
            return None;
        }
        if self.parked.front().is_some_and(|change| change.at <= self.delivered) {
            return self.parked.pop_front().map(Step::Members);
        }
        let entry = self.held.first_entry()?;
        if *entry.key() != self.delivered + 1 {
            return None;
        }
        let (seq, held) = entry.remove_entry();
        self.delivered = seq;
        Some(Step::Msg(seq, held))
    }

    /// The hole to repair, as `(after, upto)`: seqs `after+1 ..= upto` are missing.
    pub fn hole(&self) -> Option<(u64, u64)> {
        if self.highest() <= self.delivered {
            return None;
        }
        let upto = match self.held.first_key_value() {
            Some((&first, _)) if first == self.delivered + 1 => return None,
            Some((&first, _)) => first - 1,
            None => self.highest,
        };
        Some((self.delivered, upto))
    }

    /// Seqs up to `seq` are gone from the store too: skip them (the sessions are told
    /// with a `gap`).
    pub fn skip_to(&mut self, seq: u64) {
        self.delivered = self.delivered.max(seq);
        self.highest = self.highest.max(seq);
        while let Some(entry) = self.held.first_entry() {
            if *entry.key() > self.delivered {
                break;
            }
            entry.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Held {
        (Bytes::from(vec![n]), None)
    }

    fn drain(h: &mut Holdback) -> Vec<u64> {
        steps(h).into_iter().map(|s| s.parse().unwrap()).collect()
    }

    /// Seqs as numbers, membership changes as `v<version>`.
    fn steps(h: &mut Holdback) -> Vec<String> {
        std::iter::from_fn(|| {
            h.next_step().map(|step| match step {
                Step::Msg(seq, _) => seq.to_string(),
                Step::Members(change) => format!("v{}", change.version),
            })
        })
        .collect()
    }

    fn change(at: u64, version: u64) -> MembersChange {
        MembersChange { at, version, added: vec![Key::from("u")], removed: vec![] }
    }

    #[test]
    fn a_membership_change_takes_its_place_between_two_messages() {
        let mut h = Holdback::new(10, 1);
        h.offer(12, frame(2));
        h.place(change(12, 2));
        h.place(change(13, 3));
        assert_eq!(h.members_version, 3, "later messages are expected under the newest version");
        assert_eq!(steps(&mut h), Vec::<String>::new(), "11 is missing: the changes wait too");
        h.offer(11, frame(1));
        h.offer(14, frame(4));
        assert_eq!(steps(&mut h), vec!["11", "12", "v2"], "13 is missing: v3 waits for it");
        h.offer(13, frame(3));
        assert_eq!(steps(&mut h), vec!["13", "v3", "14"]);
        h.place(change(14, 4));
        assert_eq!(steps(&mut h), vec!["v4"], "made at a seq already handed on: at once");
    }

    #[test]
    fn a_reconcile_replaces_the_changes_it_read() {
        let mut h = Holdback::new(10, 1);
        h.place(change(12, 2));
        h.place(change(15, 3));
        assert!(h.needs_reconcile(5), "a message under v5: v4 was missed");
        h.offer(11, frame(1));
        assert!(h.reconciled(2), "a read older than v5: read again");
        assert_eq!(steps(&mut h), Vec::<String>::new(), "nothing while reading");
        assert!(!h.reconciled(5));
        for seq in 12..=16 {
            h.offer(seq, frame(seq as u8));
        }
        assert_eq!(steps(&mut h), vec!["11", "12", "13", "14", "15", "16"], "v2 and v3 were in the read");
    }

    #[test]
    fn holdback_delivers_in_seq_order() {
        let mut h = Holdback::new(10, 0);
        assert!(!h.offer(10, frame(0)), "at or below the baseline: old");
        assert!(h.offer(12, frame(2)));
        assert_eq!(drain(&mut h), Vec::<u64>::new(), "11 is missing");
        assert_eq!(h.hole(), Some((10, 11)));
        assert!(h.offer(11, frame(1)));
        assert!(!h.offer(11, frame(1)), "twice");
        assert_eq!(drain(&mut h), vec![11, 12]);
        assert_eq!(h.hole(), None);
        assert!(!h.offer(12, frame(2)), "already delivered");
    }

    #[test]
    fn holdback_knows_holes_it_only_heard_of() {
        let mut h = Holdback::new(3, 0);
        h.saw(6);
        assert_eq!(h.hole(), Some((3, 6)), "a store read saw 6: 4..=6 are due");
        h.offer(5, frame(5));
        assert_eq!(h.hole(), Some((3, 4)));
        h.skip_to(4);
        assert_eq!(drain(&mut h), vec![5]);
        assert_eq!(h.hole(), Some((5, 6)));
        h.skip_to(6);
        assert_eq!((h.hole(), h.delivered(), h.highest()), (None, 6, 6));
    }
}
