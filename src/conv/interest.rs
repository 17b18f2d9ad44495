//! Which shards want the messages of each conversation a shard owns.

use std::collections::HashMap;

use crate::ids::Key;

/// A set of shard indexes, one bit each.
#[derive(Clone, Debug, Default)]
pub struct ShardSet(Vec<u64>);

impl ShardSet {
    pub fn insert(&mut self, shard: usize) {
        let (w, b) = (shard / 64, shard % 64);
        if self.0.len() <= w {
            self.0.resize(w + 1, 0);
        }
        self.0[w] |= 1 << b;
    }

    pub fn remove(&mut self, shard: usize) {
        if let Some(word) = self.0.get_mut(shard / 64) {
            *word &= !(1u64 << (shard % 64));
        }
    }

    pub fn contains(&self, shard: usize) -> bool {
        self.0.get(shard / 64).is_some_and(|w| w & (1 << (shard % 64)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0
            .iter()
            .enumerate()
            .flat_map(|(w, word)| (0..64).filter(move |b| word & (1 << b) != 0).map(move |b| w * 64 + b))
    }
}

/// Which shards want the messages of each owned conversation.
#[derive(Default)]
pub struct Interest {
    by_conv: HashMap<Key, Wanted>,
}

#[derive(Default)]
struct Wanted {
    shards: ShardSet,
    /// The conversation's seq when members were last added (every shard was asked to
    /// index them from there on). A shard's "no session here" about a message up to it
    /// was sent before the shard heard of the new members: it is stale.
    grew_at: u64,
}

impl Interest {
    /// Returns true when the conversation had no interested shard before (the node now
    /// wants its traffic: in a cluster, it subscribes to it).
    pub fn add(&mut self, conv: &Key, shard: usize) -> bool {
        let wanted = self.by_conv.entry(conv.clone()).or_default();
        let first = wanted.shards.is_empty();
        wanted.shards.insert(shard);
        first
    }

    /// Every shard wants `conv`: members were added after seq `at`, and their sessions
    /// may be on any shard. Returns true like [`Interest::add`].
    pub fn add_all(&mut self, conv: &Key, shards: usize, at: u64) -> bool {
        let wanted = self.by_conv.entry(conv.clone()).or_default();
        let first = wanted.shards.is_empty();
        for s in 0..shards {
            wanted.shards.insert(s);
        }
        wanted.grew_at = wanted.grew_at.max(at);
        first
    }

    /// Shard `shard` had no session in `conv` when it got seq `seq` (0: when its last
    /// session there left). Honoured only when members were not added since that seq:
    /// otherwise the shard may have some now, and it says so again, with a later seq, at
    /// the next message it has no session for. Returns true when no shard is interested
    /// any more (in a cluster, the node unsubscribes from the conversation).
    pub fn remove(&mut self, conv: &str, shard: usize, seq: u64) -> bool {
        if let Some(wanted) = self.by_conv.get_mut(conv) {
            if seq <= wanted.grew_at {
                return false;
            }
            wanted.shards.remove(shard);
            if wanted.shards.is_empty() {
                self.by_conv.remove(conv);
                return true;
            }
        }
        false
    }

    pub fn shards(&self, conv: &str) -> Option<&ShardSet> {
        self.by_conv.get(conv).map(|wanted| &wanted.shards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_that_had_no_session_before_members_were_added_stays_wanted() {
        let mut interest = Interest::default();
        let c = Key::from("c");
        assert!(interest.add(&c, 0), "the first shard starts the interest");
        interest.add_all(&c, 2, 5);
        assert!(!interest.remove(&c, 1, 5), "no session at seq 5: sent before it heard of the members");
        assert!(!interest.remove(&c, 1, 0), "its last session left: it says so again at the next message");
        assert!(interest.shards(&c).is_some_and(|s| s.contains(1)));
        assert!(!interest.remove(&c, 1, 6));
        assert!(interest.shards(&c).is_some_and(|s| !s.contains(1)));
        assert!(interest.remove(&c, 0, 7), "no shard left");
        assert!(interest.shards(&c).is_none());
    }

    #[test]
    fn shard_sets() {
        let mut s = ShardSet::default();
        assert!(s.is_empty());
        s.insert(3);
        s.insert(70);
        assert!(s.contains(3) && s.contains(70) && !s.contains(4));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![3, 70]);
        s.remove(3);
        s.remove(70);
        assert!(s.is_empty());
    }
}
