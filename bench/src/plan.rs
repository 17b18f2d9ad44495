//! Who is in which conversation, and who sends: a deterministic plan that the parent
//! (which sets the memberships through the admin API) and every client process (which
//! syncs its users' conversations and drives its senders) compute from the same numbers,
//! so nothing but those numbers crosses the process boundary.
//!
//! Users are `u0..u(N-1)`, one connection each. Conversation `c` has the K consecutive
//! users `(c*K + j) mod N`, `j < K`: with `N` dividing `M*K` every user is in exactly
//! `M*K/N` conversations, and no conversation holds a user twice while `K <= N`. Senders
//! are S users spread evenly over `0..N` (`floor(i*N/S)`), so every client process gets
//! its share of them.

/// The plan of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// N: users, one connection each.
    pub users: usize,
    /// M: conversations.
    pub convs: usize,
    /// K: members per conversation (at most N).
    pub members: usize,
    /// S: users that send (at most N).
    pub senders: usize,
    /// Prefix of the conversation ids, unique per run, so that a run against a server that
    /// already has conversations (with history) starts from empty ones.
    pub tag: String,
}

impl Plan {
    pub fn user_name(user: usize) -> String {
        format!("u{user}")
    }

    pub fn conv_name(&self, conv: usize) -> String {
        format!("{}c{conv}", self.tag)
    }

    /// The members of conversation `conv`, in order.
    pub fn members_of(&self, conv: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.members).map(move |j| (conv * self.members + j) % self.users.max(1))
    }

    /// The conversations of each user in `first..first + count`, in increasing order.
    pub fn convs_of_range(&self, first: usize, count: usize) -> Vec<Vec<u32>> {
        let mut lists = vec![Vec::new(); count];
        for conv in 0..self.convs {
            for user in self.members_of(conv) {
                if (first..first + count).contains(&user) {
                    lists[user - first].push(conv as u32);
                }
            }
        }
        lists
    }

    /// Whether `user` is one of the S senders `floor(i*N/S)`.
    pub fn is_sender(&self, user: usize) -> bool {
        let (n, s) = (self.users as u128, self.senders as u128);
        if s == 0 || n == 0 {
            return false;
        }
        // The smallest i with floor(i*N/S) >= user, i.e. i*N >= user*S.
        let i = (user as u128 * s).div_ceil(n);
        i < s && i * n / s == user as u128
    }

    /// Deliveries one send into `conv` makes when each user holds `devices` connections:
    /// every connection of every member but the sending one.
    pub fn receivers_per_send(&self, devices: usize) -> usize {
        (self.members * devices.max(1)).saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(users: usize, convs: usize, members: usize, senders: usize) -> Plan {
        Plan { users, convs, members, senders, tag: "t".into() }
    }

    #[test]
    fn every_user_in_the_same_number_of_conversations() {
        let p = plan(10_000, 1000, 10, 1000);
        let lists = p.convs_of_range(0, 10_000);
        assert!(lists.iter().all(|l| l.len() == 1));
        let p = plan(200, 20, 30, 20);
        let lists = p.convs_of_range(0, 200);
        assert!(lists.iter().all(|l| l.len() == 3), "20*30/200 = 3 each");
        for c in 0..20 {
            let mut m: Vec<usize> = p.members_of(c).collect();
            m.sort();
            m.dedup();
            assert_eq!(m.len(), 30, "no user twice in conversation {c}");
        }
        // A slice of the users sees the same lists as the whole.
        assert_eq!(p.convs_of_range(50, 10), lists[50..60].to_vec());
    }

    #[test]
    fn senders_are_spread_and_counted_once() {
        for (n, s) in [(10_000, 1000), (200, 20), (7, 3), (5, 5), (301, 1), (10, 0)] {
            let p = plan(n, 1, 1, s);
            let chosen: Vec<usize> = (0..n).filter(|u| p.is_sender(*u)).collect();
            let expected: Vec<usize> = (0..s).map(|i| i * n / s).collect();
            assert_eq!(chosen, expected, "n {n} s {s}");
        }
        let p = plan(10_000, 1000, 10, 1000);
        assert!(p.is_sender(0) && p.is_sender(10) && !p.is_sender(11));
        assert_eq!(p.conv_name(7), "tc7");
        assert_eq!(Plan::user_name(3), "u3");
        assert_eq!(p.receivers_per_send(1), 9);
        assert_eq!(p.receivers_per_send(2), 19);
    }
}
