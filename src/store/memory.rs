//! The embedded store: one node, nothing to install. Each shard holds the part of the data
//! whose keys it owns, in plain maps behind `RefCell` (the shard is single-threaded), so
//! every call answers at once and never fails. Nothing survives a restart.
//!
//! Memory: per conversation its member set, a history ring of at most
//! `history.max_per_conv` encoded frames, and the dedupe entries of the last
//! `dedupe_window_ms`; per user with conversations, the set of them.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::contract::{
    Appended, Conversation, History, MemberChange, MemberOp, MemberView, NewMessage, ReadMark, ReadState,
    Store, StoreError, Stored,
};

/// A dedupe key: (sender, cid).
type SeenKey = (Arc<str>, Arc<str>);

#[derive(Default)]
struct Conv {
    members: HashSet<Arc<str>>,
    /// Raised by one at every change of `members`.
    members_version: u64,
    last_seq: u64,
    /// The newest messages, oldest first; seqs are consecutive.
    history: VecDeque<Stored>,
    /// `(from, cid)` -> (seq, ts) of messages within the dedupe window.
    seen: HashMap<SeenKey, (u64, u64)>,
    /// The same keys in arrival order with their expiry, to prune `seen` from the front.
    seen_order: VecDeque<(u64, SeenKey)>,
    /// Read marks by user (only users who marked anything).
    reads: HashMap<Arc<str>, u64>,
}

#[derive(Default)]
struct User {
    convs: HashSet<Arc<str>>,
}

/// One shard's part of the embedded store.
pub struct MemoryStore {
    convs: RefCell<HashMap<Arc<str>, Conv>>,
    users: RefCell<HashMap<Arc<str>, User>>,
    history_max: usize,
    dedupe_window_ms: u64,
}

impl MemoryStore {
    pub fn new(history_max: usize, dedupe_window_ms: u64) -> MemoryStore {
        MemoryStore {
            convs: RefCell::default(),
            users: RefCell::default(),
            history_max: history_max.max(1),
            dedupe_window_ms,
        }
    }
}

impl Store for MemoryStore {
    async fn is_member(&self, conv: &str, user: &str) -> Result<bool, StoreError> {
        Ok(self.convs.borrow().get(conv).is_some_and(|c| c.members.contains(user)))
    }

    async fn member_view(&self, conv: &str, user: &str) -> Result<Option<MemberView>, StoreError> {
        let convs = self.convs.borrow();
        let member = convs.get(conv).filter(|c| c.members.contains(user));
        Ok(member.map(|c| MemberView { last_seq: c.last_seq, members_version: c.members_version }))
    }

    async fn conversation(&self, conv: &str) -> Result<Conversation, StoreError> {
        let convs = self.convs.borrow();
        Ok(match convs.get(conv) {
            Some(c) => Conversation {
                members: c.members.iter().cloned().collect(),
                last_seq: c.last_seq,
                members_version: c.members_version,
            },
            None => Conversation::default(),
        })
    }

    async fn set_members(
        &self,
        conv: &str,
        op: MemberOp,
        users: &[Arc<str>],
    ) -> Result<MemberChange, StoreError> {
        let mut convs = self.convs.borrow_mut();
        if !convs.contains_key(conv) {
            convs.insert(Arc::from(conv), Conv::default());
        }
        let c = convs.get_mut(conv).ok_or_else(|| StoreError::Unavailable("lost conversation".into()))?;
        let mut change = MemberChange::default();
        match op {
            MemberOp::Add | MemberOp::Replace => {
                if op == MemberOp::Replace {
                    let keep: HashSet<&str> = users.iter().map(|u| &**u).collect();
                    let gone: Vec<Arc<str>> =
                        c.members.iter().filter(|m| !keep.contains(&***m)).cloned().collect();
                    for u in gone {
                        c.members.remove(&u);
                        change.removed.push(u);
                    }
                }
                for u in users {
                    if c.members.insert(u.clone()) {
                        change.added.push(u.clone());
                    }
                }
            }
            MemberOp::Remove => {
                for u in users {
                    if c.members.remove(u) {
                        change.removed.push(u.clone());
                    }
                }
            }
        }
        if !change.added.is_empty() || !change.removed.is_empty() {
            c.members_version += 1;
        }
        change.count = c.members.len();
        change.members_version = c.members_version;
        change.last_seq = c.last_seq;
        Ok(change)
    }

    async fn append(
        &self,
        conv: &str,
        msg: &NewMessage,
        _floor: u64,
        encode: &dyn Fn(u64) -> Bytes,
    ) -> Result<Appended, StoreError> {
        let mut convs = self.convs.borrow_mut();
        if !convs.contains_key(conv) {
            convs.insert(Arc::from(conv), Conv::default());
        }
        let c = convs.get_mut(conv).ok_or_else(|| StoreError::Unavailable("lost conversation".into()))?;
        // Forget dedupe keys older than the window.
        while let Some((expires, _)) = c.seen_order.front() {
            if *expires > msg.ts {
                break;
            }
            if let Some((_, key)) = c.seen_order.pop_front() {
                c.seen.remove(&key);
            }
        }
        let key = msg.cid.as_ref().map(|cid| (msg.from.clone(), cid.clone()));
        if let Some(key) = &key {
            if let Some(&(seq, ts)) = c.seen.get(key) {
                let frame =
                    c.history.iter().find(|s| s.seq == seq).map(|s| s.frame.clone()).unwrap_or_default();
                let members_version = c.members_version;
                return Ok(Appended { seq, ts, frame, duplicate: true, members_version });
            }
        }
        c.last_seq += 1;
        let seq = c.last_seq;
        let frame = encode(seq);
        let members_version = c.members_version;
        c.history.push_back(Stored { seq, frame: frame.clone(), members_version });
        while c.history.len() > self.history_max {
            c.history.pop_front();
        }
        if let Some(key) = key {
            c.seen.insert(key.clone(), (seq, msg.ts));
            c.seen_order.push_back((msg.ts + self.dedupe_window_ms, key));
        }
        Ok(Appended { seq, ts: msg.ts, frame, duplicate: false, members_version })
    }

    async fn history(&self, conv: &str, after: u64, limit: usize) -> Result<History, StoreError> {
        let convs = self.convs.borrow();
        let Some(c) = convs.get(conv) else {
            return Ok(History { messages: Vec::new(), last_seq: 0, complete: true, read: 0 });
        };
        let oldest = c.history.front().map_or(c.last_seq + 1, |s| s.seq);
        // History reaches back to `after + 1` when the oldest kept seq is not past it.
        let complete = after + 1 >= oldest || after >= c.last_seq;
        let skip = (after + 1).saturating_sub(oldest) as usize;
        let messages = c.history.iter().skip(skip).take(limit).cloned().collect();
        Ok(History { messages, last_seq: c.last_seq, complete, read: 0 })
    }

    async fn set_read(&self, conv: &str, user: &str, seq: u64) -> Result<Option<ReadMark>, StoreError> {
        let mut convs = self.convs.borrow_mut();
        let Some(c) = convs.get_mut(conv).filter(|c| c.members.contains(user)) else { return Ok(None) };
        let want = seq.min(c.last_seq);
        let old = c.reads.get(user).copied().unwrap_or(0);
        if want <= old {
            return Ok(Some(ReadMark { read: old, moved: false }));
        }
        c.reads.insert(Arc::from(user), want);
        Ok(Some(ReadMark { read: want, moved: true }))
    }

    async fn read_state(&self, conv: &str, users: &[Arc<str>]) -> Result<ReadState, StoreError> {
        let convs = self.convs.borrow();
        Ok(match convs.get(conv) {
            Some(c) => ReadState {
                last_seq: c.last_seq,
                marks: users.iter().map(|u| c.reads.get(u).copied().unwrap_or(0)).collect(),
            },
            None => ReadState { last_seq: 0, marks: vec![0; users.len()] },
        })
    }

    async fn link_user(&self, user: &str, conv: &Arc<str>, member: bool) -> Result<(), StoreError> {
        let mut users = self.users.borrow_mut();
        if member {
            if !users.contains_key(user) {
                users.insert(Arc::from(user), User::default());
            }
            if let Some(u) = users.get_mut(user) {
                u.convs.insert(conv.clone());
            }
        } else if let Some(u) = users.get_mut(user) {
            u.convs.remove(conv);
            if u.convs.is_empty() {
                users.remove(user);
            }
        }
        Ok(())
    }

    async fn user_convs(&self, user: &str) -> Result<Vec<Arc<str>>, StoreError> {
        Ok(self.users.borrow().get(user).map(|u| u.convs.iter().cloned().collect()).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;

    fn msg(from: &str, cid: Option<&str>, ts: u64) -> NewMessage {
        NewMessage {
            from: from.into(),
            dev: None,
            cid: cid.map(Arc::from),
            ts,
            body: Bytes::from_static(b"{}"),
        }
    }

    fn enc(seq: u64) -> Bytes {
        Bytes::from(seq.to_string())
    }

    #[test]
    fn seq_has_no_gaps_and_dedupe_repeats_first_seq() {
        let s = MemoryStore::new(10, 1000);
        let a = block_on(s.append("c", &msg("u", Some("x"), 0), 0, &enc)).unwrap();
        let b = block_on(s.append("c", &msg("u", Some("y"), 1), 0, &enc)).unwrap();
        let again = block_on(s.append("c", &msg("u", Some("x"), 2), 0, &enc)).unwrap();
        assert_eq!((a.seq, b.seq), (1, 2));
        assert!(again.duplicate);
        assert_eq!(again.seq, 1);
        // Another user with the same cid is a different message.
        assert_eq!(block_on(s.append("c", &msg("v", Some("x"), 3), 0, &enc)).unwrap().seq, 3);
        // Past the window the cid is new again.
        let late = block_on(s.append("c", &msg("u", Some("x"), 5000), 0, &enc)).unwrap();
        assert!(!late.duplicate);
        assert_eq!(late.seq, 4);
    }

    #[test]
    fn history_is_bounded_and_reports_completeness() {
        let s = MemoryStore::new(3, 1000);
        for i in 0..5 {
            block_on(s.append("c", &msg("u", None, i), 0, &enc)).unwrap();
        }
        let h = block_on(s.history("c", 0, 100)).unwrap();
        assert_eq!(h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(!h.complete);
        let h = block_on(s.history("c", 2, 100)).unwrap();
        assert!(h.complete);
        assert_eq!(h.messages.len(), 3);
        let h = block_on(s.history("c", 3, 1)).unwrap();
        assert_eq!(h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![4]);
        assert_eq!(h.last_seq, 5);
        let h = block_on(s.history("c", 5, 10)).unwrap();
        assert!(h.complete && h.messages.is_empty());
    }

    #[test]
    fn read_marks_only_move_up_and_stop_at_the_last_seq() {
        let s = MemoryStore::new(10, 1000);
        block_on(s.set_members("c", MemberOp::Add, &["a".into()])).unwrap();
        for i in 0..5 {
            block_on(s.append("c", &msg("a", None, i), 0, &enc)).unwrap();
        }
        assert_eq!(block_on(s.set_read("c", "b", 3)).unwrap(), None, "not a member");
        assert_eq!(block_on(s.set_read("c", "a", 3)).unwrap(), Some(ReadMark { read: 3, moved: true }));
        assert_eq!(block_on(s.set_read("c", "a", 2)).unwrap(), Some(ReadMark { read: 3, moved: false }));
        assert_eq!(block_on(s.set_read("c", "a", 99)).unwrap(), Some(ReadMark { read: 5, moved: true }));
        let state = block_on(s.read_state("c", &["a".into(), "z".into()])).unwrap();
        assert_eq!(state, ReadState { last_seq: 5, marks: vec![5, 0] });
    }

    #[test]
    fn membership_ops() {
        let s = MemoryStore::new(3, 1000);
        let users: Vec<Arc<str>> = vec!["a".into(), "b".into()];
        let ch = block_on(s.set_members("c", MemberOp::Replace, &users)).unwrap();
        assert_eq!((ch.added.len(), ch.count), (2, 2));
        let ch = block_on(s.set_members("c", MemberOp::Replace, &["b".into(), "c".into()])).unwrap();
        assert_eq!((ch.added, ch.removed, ch.count), (vec![Arc::from("c")], vec![Arc::from("a")], 2));
        assert!(block_on(s.is_member("c", "b")).unwrap());
        let ch = block_on(s.set_members("c", MemberOp::Remove, &["b".into()])).unwrap();
        assert_eq!(ch.count, 1);
        assert!(!block_on(s.is_member("c", "b")).unwrap());
    }
}
