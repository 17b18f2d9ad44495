//! A shard's indexes of its own sessions: user -> sessions, conversation -> sessions.
//!
//! Pure data, no I/O: the shard asks the hub who should get a frame and writes to those
//! sessions itself. Fan-out of a conversation message costs one map lookup plus one step
//! per local recipient, never a walk over all connections.
//!
//! Membership is per user: every session of a user on this shard is in the index of
//! each conversation the user belongs to. A session starts out *joining* ([`Hub::arrive`]):
//! it is known under its user but in no conversation's index, until the owners of its
//! user's conversations have answered its join; then it *settles* ([`Hub::settle`]) into
//! every conversation the user is in. The user's conversations are learnt from those
//! answers and kept current by membership changes; they are forgotten when the user's
//! last session leaves.

use std::collections::{HashMap, HashSet};

use crate::ids::Key;

/// The sessions of one user on this shard and the conversations they belong to.
struct LocalUser<S> {
    /// Settled sessions: in the index of every conversation of `convs`.
    sessions: Vec<S>,
    /// Sessions whose join is not answered yet: in no conversation's index.
    joining: Vec<S>,
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
    /// Adds a joining session of `user`. Returns true when it is the user's first session
    /// here (in a cluster the shard then follows the user's topic).
    pub fn arrive(&mut self, user: &Key, session: S) -> bool {
        match self.users.get_mut(user) {
            Some(local) => {
                local.joining.push(session);
                false
            }
            None => {
                let local = LocalUser { sessions: Vec::new(), joining: vec![session], convs: HashSet::new() };
                self.users.insert(user.clone(), local);
                true
            }
        }
    }

    /// The join of a session of `user` is answered: it takes part in every conversation
    /// the user is in from now on. False if it is not a joining session here.
    pub fn settle(&mut self, user: &str, session: S) -> bool {
        let Some(local) = self.users.get_mut(user) else { return false };
        let Some(i) = local.joining.iter().position(|s| *s == session) else { return false };
        local.joining.swap_remove(i);
        local.sessions.push(session);
        for conv in &local.convs {
            self.convs.entry(conv.clone()).or_default().push(session);
        }
        true
    }

    /// Removes a session. Returns the conversations left with no session on this shard.
    pub fn detach(&mut self, user: &str, session: S) -> Vec<Key> {
        let mut emptied = Vec::new();
        let Some(local) = self.users.get_mut(user) else { return emptied };
        local.joining.retain(|s| *s != session);
        if let Some(i) = local.sessions.iter().position(|s| *s == session) {
            local.sessions.swap_remove(i);
            for conv in &local.convs {
                if let Some(list) = self.convs.get_mut(conv) {
                    list.retain(|s| *s != session);
                    if list.is_empty() {
                        self.convs.remove(conv);
                        emptied.push(conv.clone());
                    }
                }
            }
        }
        if local.sessions.is_empty() && local.joining.is_empty() {
            self.users.remove(user);
        }
        emptied
    }

    /// `user` is a member of `conv`: index its settled sessions there (no-op if the user
    /// has no session here).
    pub fn join(&mut self, user: &str, conv: &Key) {
        let Some(local) = self.users.get_mut(user) else { return };
        if local.convs.insert(conv.clone()) && !local.sessions.is_empty() {
            self.convs.entry(conv.clone()).or_default().extend(local.sessions.iter().copied());
        }
    }

    /// `conv`'s members are exactly `members` (read again after a change this shard's
    /// node missed): every local user joins or leaves it accordingly. Returns true when
    /// `conv` has no session left on this shard.
    pub fn reconcile(&mut self, conv: &Key, members: &[Key]) -> bool {
        let had = !self.in_conv(conv).is_empty();
        let members: HashSet<&str> = members.iter().map(|m| &**m).collect();
        let users: Vec<(Key, bool)> = self
            .users
            .iter()
            .filter_map(|(user, local)| {
                let member = members.contains(&**user);
                (member != local.convs.contains(conv)).then(|| (user.clone(), member))
            })
            .collect();
        for (user, member) in users {
            if member {
                self.join(&user, conv);
            } else {
                self.leave(&user, conv);
            }
        }
        had && self.in_conv(conv).is_empty()
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

    /// The settled sessions here of `user` (those that have had their `hello`).
    pub fn of_user(&self, user: &str) -> &[S] {
        self.users.get(user).map_or(&[], |u| u.sessions.as_slice())
    }

    /// Every session here of `user`, joining ones included.
    pub fn all_of_user(&self, user: &str) -> Vec<S> {
        self.users.get(user).map_or_else(Vec::new, |u| u.sessions.iter().chain(&u.joining).copied().collect())
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
        assert!(hub.arrive(&alice, 1));
        hub.join("alice", &c1);
        assert!(hub.in_conv("c1").is_empty(), "a joining session is in no conversation yet");
        assert!(hub.settle("alice", 1));
        assert!(!hub.arrive(&alice, 2), "second session of the user");
        assert_eq!(hub.in_conv("c1"), &[1]);
        assert_eq!(hub.of_user("alice"), &[1]);
        assert_eq!(hub.all_of_user("alice"), vec![1, 2]);
        assert!(hub.settle("alice", 2), "settles into the user's conversations");
        assert!(!hub.settle("alice", 2), "only once");
        assert_eq!(hub.in_conv("c1"), &[1, 2]);
        assert!(hub.detach("alice", 1).is_empty());
        assert_eq!(hub.in_conv("c1"), &[2]);
        assert_eq!(hub.detach("alice", 2), vec![c1.clone()]);
        assert!(!hub.has_user("alice"));
        assert!(hub.in_conv("c1").is_empty());
    }

    #[test]
    fn a_session_that_leaves_while_joining_leaves_no_trace() {
        let mut hub: Hub<u32> = Hub::default();
        let carol: Key = "carol".into();
        let c: Key = "c".into();
        hub.arrive(&carol, 1);
        hub.join("carol", &c);
        assert!(hub.detach("carol", 1).is_empty(), "it was in no conversation");
        assert!(!hub.has_user("carol"));
        assert!(!hub.settle("carol", 1));
    }

    #[test]
    fn leave_and_join_are_idempotent() {
        let mut hub: Hub<u32> = Hub::default();
        let bob: Key = "bob".into();
        let c: Key = "c".into();
        hub.arrive(&bob, 7);
        hub.settle("bob", 7);
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
