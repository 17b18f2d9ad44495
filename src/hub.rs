//! A shard's indexes of its own sessions: user -> sessions, conversation -> sessions.
//!
//! Pure data, no I/O: the shard asks the hub who should get a frame and writes to those
//! sessions itself. Fan-out of a conversation message costs one map lookup plus one step
//! per local recipient, never a walk over all connections.
//!
//! Membership is per user: every session of a user on this shard is in the index of
//! each conversation the user belongs to. A user's conversations are learnt when its
//! first session arrives (`Join` answered by the owners) and kept current by membership
//! changes; they are forgotten when its last session leaves.

use std::collections::{HashMap, HashSet};

use crate::mesh::Key;

/// The sessions of one user on this shard and the conversations they belong to.
struct LocalUser<S> {
    sessions: Vec<S>,
    convs: HashSet<Key>,
}

/// `S` identifies a session (the shard uses its table key).
pub struct Hub<S> {
    users: HashMap<Key, LocalUser<S>>,
    convs: HashMap<Key, Vec<S>>,
}

impl<S> Default for Hub<S> {
    fn default() -> Self {
        Hub { users: HashMap::new(), convs: HashMap::new() }
    }
}

impl<S: Copy + Eq> Hub<S> {
    /// Adds a session of `user`. Returns true when it is the user's first session here
    /// (the caller then loads the user's conversations).
    pub fn attach(&mut self, user: &Key, session: S) -> bool {
        match self.users.get_mut(user) {
            Some(local) => {
                local.sessions.push(session);
                for conv in &local.convs {
                    self.convs.entry(conv.clone()).or_default().push(session);
                }
                false
            }
            None => {
                self.users.insert(user.clone(), LocalUser { sessions: vec![session], convs: HashSet::new() });
                true
            }
        }
    }

    /// Removes a session. Returns the conversations left with no session on this shard.
    pub fn detach(&mut self, user: &str, session: S) -> Vec<Key> {
        let mut emptied = Vec::new();
        let Some(local) = self.users.get_mut(user) else { return emptied };
        local.sessions.retain(|s| *s != session);
        for conv in &local.convs {
            if let Some(list) = self.convs.get_mut(conv) {
                list.retain(|s| *s != session);
                if list.is_empty() {
                    self.convs.remove(conv);
                    emptied.push(conv.clone());
                }
            }
        }
        if local.sessions.is_empty() {
            self.users.remove(user);
        }
        emptied
    }

    /// `user` is a member of `conv`: index its sessions there (no-op if not local).
    pub fn join(&mut self, user: &str, conv: &Key) {
        let Some(local) = self.users.get_mut(user) else { return };
        if local.convs.insert(conv.clone()) {
            self.convs.entry(conv.clone()).or_default().extend(local.sessions.iter().copied());
        }
    }

    /// `user` left `conv`. Returns true when `conv` has no session left on this shard.
    pub fn leave(&mut self, user: &str, conv: &Key) -> bool {
        let Some(local) = self.users.get_mut(user) else { return false };
        if !local.convs.remove(conv) {
            return false;
        }
        let Some(list) = self.convs.get_mut(conv) else { return false };
        list.retain(|s| !local.sessions.contains(s));
        if list.is_empty() {
            self.convs.remove(conv);
            return true;
        }
        false
    }

    /// The sessions here in `conv`.
    pub fn in_conv(&self, conv: &str) -> &[S] {
        self.convs.get(conv).map_or(&[], |v| v.as_slice())
    }

    /// The sessions here of `user`.
    pub fn of_user(&self, user: &str) -> &[S] {
        self.users.get(user).map_or(&[], |u| u.sessions.as_slice())
    }

    pub fn is_member(&self, user: &str, conv: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.convs.contains(conv))
    }

    pub fn has_user(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_follow_their_users_membership() {
        let mut hub: Hub<u32> = Hub::default();
        let alice: Key = "alice".into();
        let c1: Key = "c1".into();
        assert!(hub.attach(&alice, 1));
        hub.join("alice", &c1);
        assert!(!hub.attach(&alice, 2), "second session reuses the user's conversations");
        assert_eq!(hub.in_conv("c1"), &[1, 2]);
        assert!(hub.detach("alice", 1).is_empty());
        assert_eq!(hub.in_conv("c1"), &[2]);
        assert_eq!(hub.detach("alice", 2), vec![c1.clone()]);
        assert!(!hub.has_user("alice"));
        assert!(hub.in_conv("c1").is_empty());
    }

    #[test]
    fn leave_and_join_are_idempotent() {
        let mut hub: Hub<u32> = Hub::default();
        let bob: Key = "bob".into();
        let c: Key = "c".into();
        hub.attach(&bob, 7);
        hub.join("bob", &c);
        hub.join("bob", &c);
        assert_eq!(hub.in_conv("c"), &[7]);
        assert!(hub.leave("bob", &c));
        assert!(!hub.leave("bob", &c));
        assert!(hub.in_conv("c").is_empty());
        hub.join("carol", &c);
        assert!(hub.in_conv("c").is_empty(), "users without local sessions are not indexed");
    }
}
