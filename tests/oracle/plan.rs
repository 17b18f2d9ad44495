//! What a run does, drawn from its seed: the users, their devices and conversations, how
//! each connection of each device behaves, and what the director does meanwhile
//! (pushes, broadcasts, API posts, membership changes, and in a cluster the faults).
//! Only the schedule is seeded; the interleaving is the machine's, which is the point:
//! the oracle's checks hold under any interleaving.

use std::time::Duration;

/// splitmix64: small, fast, and the same sequence for the same seed on every machine.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.next() as usize % items.len()]
    }

    pub fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }

    /// A generator of its own for part `part` of the run, independent of how much the
    /// others draw.
    pub fn fork(&self, part: u64) -> Rng {
        Rng::new(self.0 ^ part.wrapping_mul(0xd6e8_feb8_6659_fd93))
    }
}

/// When a connection sends its first `sync`s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Right after `hello`, every conversation it is in (what our own clients do).
    AtOnce,
    /// Never (a bot, a naive SDK): it relies on live delivery and ignores gaps.
    Never,
    /// This long after `hello`.
    Late(Duration),
}

/// How a connection reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    Prompt,
    /// A 4 KiB receive buffer; reads for `read`, then stops for `pause`, over and over.
    Slow {
        read: Duration,
        pause: Duration,
    },
}

/// How a connection ends, once its lifetime is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// A close handshake.
    Close,
    /// Gone without a word: the socket is reset (a phone losing its network).
    Vanish,
    /// It stays until the run ends.
    Stay,
}

/// One connection of a device, as drawn.
#[derive(Clone, Debug)]
pub struct ConnPlan {
    pub node: usize,
    pub sync: SyncPolicy,
    pub reader: Reader,
    /// Sends one message the moment it has its `hello`.
    pub send_at_once: bool,
    /// Mean pause between its sends; `None`: it sends nothing (besides `send_at_once`).
    pub send_every: Option<Duration>,
    pub lifetime: Duration,
    pub ending: Ending,
    /// How long the device stays away after this connection ends.
    pub away: Duration,
}

impl ConnPlan {
    pub fn draw(rng: &mut Rng, nodes: usize) -> ConnPlan {
        let sync = match rng.range(0, 3) {
            0 | 1 => SyncPolicy::AtOnce,
            2 => SyncPolicy::Never,
            _ => SyncPolicy::Late(rng.ms(200, 3000)),
        };
        let reader = if rng.chance(30) {
            Reader::Slow { read: rng.ms(10, 150), pause: rng.ms(200, 2500) }
        } else {
            Reader::Prompt
        };
        let ending = match rng.range(0, 4) {
            0 | 1 => Ending::Vanish,
            2 | 3 => Ending::Close,
            _ => Ending::Stay,
        };
        ConnPlan {
            node: rng.range(0, nodes as u64 - 1) as usize,
            sync,
            reader,
            send_at_once: rng.chance(35),
            send_every: if rng.chance(80) { Some(rng.ms(80, 700)) } else { None },
            lifetime: rng.ms(300, 6000),
            ending,
            away: rng.ms(0, 1500),
        }
    }
}

/// A device: a user's phone, laptop or tab. Its connections come one after another.
#[derive(Clone, Debug)]
pub struct DevicePlan {
    pub user: String,
    pub device: String,
    pub seed: u64,
}

/// What the director does, at a time from the start of the run.
#[derive(Clone, Debug)]
pub enum Act {
    Push {
        users: Vec<String>,
    },
    Broadcast,
    /// A message posted through the API (no `dev`, no `cid`).
    Post {
        conv: String,
    },
    /// A user joins or leaves a conversation (`POST` or `DELETE` on its members).
    Member {
        conv: String,
        user: String,
        join: bool,
    },
    /// A node killed with SIGKILL and started again at once on the same ports.
    Kill {
        node: usize,
    },
    /// A node stopped with SIGSTOP, continued with SIGCONT after `for_`.
    Pause {
        node: usize,
        for_: Duration,
    },
    /// Redis killed and started again at once (durable: it keeps its data).
    RestartRedis,
}

/// The whole run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub nodes: usize,
    pub duration: Duration,
    pub devices: Vec<DevicePlan>,
    /// Conversations and their members at the start.
    pub convs: Vec<(String, Vec<String>)>,
    /// The director's acts, by time.
    pub acts: Vec<(Duration, Act)>,
}

impl Plan {
    pub fn draw(seed: u64, nodes: usize, duration: Duration) -> Plan {
        let root = Rng::new(seed);
        let mut rng = root.fork(1);
        let users: Vec<String> = (0..rng.range(4, 8)).map(|u| format!("u{u}")).collect();
        let mut devices = Vec::new();
        for user in &users {
            for d in 0..rng.range(1, 3) {
                let seed = root.fork(100 + devices.len() as u64).next();
                devices.push(DevicePlan { user: user.clone(), device: format!("{user}-d{d}"), seed });
            }
        }
        let mut convs = Vec::new();
        for c in 0..rng.range(3, 6) {
            let size = rng.range(2, users.len().min(5) as u64) as usize;
            let mut members: Vec<String> = Vec::new();
            while members.len() < size {
                let user = rng.pick(&users).clone();
                if !members.contains(&user) {
                    members.push(user);
                }
            }
            convs.push((format!("c{c}"), members));
        }
        let mut acts = Vec::new();
        let mut at = Duration::ZERO;
        let mut dir = root.fork(2);
        loop {
            at += dir.ms(50, 400);
            if at >= duration {
                break;
            }
            let act = match dir.range(0, 9) {
                0..=2 => Act::Push { users: vec![dir.pick(&users).clone()] },
                3 => Act::Broadcast,
                4..=6 => Act::Post { conv: dir.pick(&convs).0.clone() },
                _ => {
                    let (conv, _) = dir.pick(&convs).clone();
                    Act::Member { conv, user: dir.pick(&users).clone(), join: dir.chance(50) }
                }
            };
            acts.push((at, act));
        }
        if nodes > 1 {
            // One of each fault, spread over the first three quarters: the last quarter
            // is quiet, so every survivor can be checked for completeness at the end.
            let quarter = duration / 4;
            let node = dir.range(0, nodes as u64 - 1) as usize;
            acts.push((quarter.mul_f64(0.5 + dir.range(0, 40) as f64 / 100.0), Act::Kill { node }));
            let node = dir.range(0, nodes as u64 - 1) as usize;
            let pause = Act::Pause { node, for_: dir.ms(500, 2500) };
            acts.push((quarter.mul_f64(1.3 + dir.range(0, 40) as f64 / 100.0), pause));
            acts.push((quarter.mul_f64(2.1 + dir.range(0, 40) as f64 / 100.0), Act::RestartRedis));
            acts.sort_by_key(|(at, _)| *at);
        }
        Plan { nodes, duration, devices, convs, acts }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_draws_the_same_plan() {
        let a = Plan::draw(7, 3, Duration::from_secs(10));
        let b = Plan::draw(7, 3, Duration::from_secs(10));
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        let c = Plan::draw(8, 3, Duration::from_secs(10));
        assert_ne!(format!("{a:?}"), format!("{c:?}"));
    }
}
