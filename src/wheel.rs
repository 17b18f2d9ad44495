//! Hashed timer wheel for one shard's session deadlines: pure data, no I/O, no clock reads.
//!
//! A shard holds up to about a million connections and each one has a deadline: next ping,
//! idle drop, token expiry. The wheel holds one entry per session, for its earliest deadline.
//! Activity never touches the wheel. When an entry fires, the shard looks the session up,
//! checks its deadlines against the clock, acts on the ones that have passed and inserts the
//! session again at its next deadline. Reading or writing a frame therefore costs nothing here.
//!
//! Why a hashed wheel rather than a heap or a sorted map: insert is O(1), a push onto bucket
//! `due % slots`. Advancing one tick visits one bucket. When deadlines fall within one rotation
//! (`slots * tick_ms`), a bucket holds only entries that are due, so advancing costs O(due).
//! A deadline further out waits in its bucket and is skipped once per rotation until its round
//! comes. Size the wheel so that one rotation covers the common deadlines.
//!
//! # Contract: at most one live entry per session
//!
//! There is no `remove`. A [`TimerId`] carries the session's slab slot and generation. When a
//! session closes, its entry stays in the wheel until it fires. Callers ignore entries whose
//! generation is stale, and entries for a session that has since moved its deadline. The
//! session itself never inserts a second entry while one is live: it inserts only when its own
//! entry fires, or when the session is created. [`Wheel::len`] counts stale entries too.
//!
//! # Memory
//!
//! An entry is 16 bytes, so a million sessions cost 16 MB of entries. Buckets are reused
//! across rotations and never shrink: a bucket that grew huge once (say a burst of connects
//! all due on the same tick) keeps that capacity. So does the scratch that sorts a
//! multi-rotation advance. Each is bounded by the largest number of entries it ever held.

use std::mem;

/// Identifies a session in the shard's slab: (slot index, generation) so a stale entry for a
/// reused slot is recognisable by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerId {
    pub index: u32,
    pub generation: u32,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    id: TimerId,
    /// Absolute tick at which the entry fires; always greater than the wheel's `now`.
    due: u64,
}

// Entries are the wheel's whole footprint. Keep them at 16 bytes.
const _: () = assert!(mem::size_of::<Entry>() == 16);

/// One shard's timer wheel. See the module docs for the one-entry-per-session contract.
pub struct Wheel {
    tick_ms: u64,
    /// `slots - 1`: the bucket of due tick `t` is `t & mask`.
    mask: u64,
    /// Ticks advanced so far. Every entry held has `due > now`.
    now: u64,
    /// Bucket `i` holds every entry whose `due & mask == i`, in all rounds, in insertion order.
    buckets: Box<[Vec<Entry>]>,
    /// Entries fired by an advance of more than one rotation, sorted by due before they are
    /// handed out. Empty between calls; keeps its capacity.
    fired: Vec<Entry>,
    /// Entries held, stale ones included.
    len: usize,
}

impl Wheel {
    /// `tick_ms`: resolution; `slots`: number of buckets (power of two). Start at tick 0.
    ///
    /// # Panics
    ///
    /// If `tick_ms` is 0 or `slots` is not a power of two. Both come from a validated config.
    pub fn new(tick_ms: u64, slots: usize) -> Wheel {
        assert!(tick_ms > 0, "timer wheel tick_ms must be at least 1");
        assert!(slots.is_power_of_two(), "timer wheel slots must be a power of two, got {slots}");
        Wheel {
            tick_ms,
            mask: slots as u64 - 1,
            now: 0,
            // Empty vecs do not allocate. A bucket gets memory when it first holds an entry.
            buckets: (0..slots).map(|_| Vec::new()).collect(),
            fired: Vec::new(),
            len: 0,
        }
    }

    pub fn tick_ms(&self) -> u64 {
        self.tick_ms
    }

    /// Current tick (number of ticks advanced so far).
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Converts a delay in ms to the absolute tick at which it fires (rounding UP, never earlier
    /// than asked, at least now+1).
    ///
    /// The delay is measured from tick `now`. The shard advances to `elapsed / tick_ms`, so
    /// `now` can be up to one tick behind the clock, and an entry can fire up to one tick
    /// before `delay_ms` of real time has passed. Callers compare deadlines against the clock
    /// when an entry fires, and insert again if the deadline is still ahead.
    pub fn due_after(&self, delay_ms: u64) -> u64 {
        let ticks = delay_ms.div_ceil(self.tick_ms).max(1);
        self.now.saturating_add(ticks)
    }

    /// Schedule `id` at absolute tick `due` (if due <= now it fires on the next advance).
    ///
    /// At most one live entry per session: see the module docs.
    pub fn insert(&mut self, id: TimerId, due: u64) {
        let due = due.max(self.now.saturating_add(1));
        self.buckets[(due & self.mask) as usize].push(Entry { id, due });
        self.len += 1;
    }

    /// Advance to absolute tick `to` (no-op if to <= now), appending every entry whose due tick
    /// is <= `to` to `out`, in due order across ticks. Entries due beyond one rotation stay in
    /// their bucket until their round comes.
    ///
    /// Within one tick, the order is unspecified. `out` is appended to, never cleared.
    ///
    /// Allocation: an advance of at most `slots` ticks never allocates beyond growing `out`.
    /// Buckets are filtered in place, with no swap and no copy. An advance of more than `slots`
    /// ticks visits each bucket once. It sorts what fired in a scratch vec kept in the wheel,
    /// which grows only when a stall fires more entries at once than any stall before.
    pub fn advance(&mut self, to: u64, out: &mut Vec<TimerId>) {
        if to <= self.now {
            return;
        }
        let before = out.len();
        let slots = self.mask + 1;
        if to - self.now <= slots {
            // Each tick maps to a different bucket, so a bucket visited at `tick` holds
            // `due == tick` (now) or `due >= tick + slots` (a later round). Visiting the ticks
            // in order puts `out` in due order.
            for tick in self.now + 1..=to {
                self.buckets[(tick & self.mask) as usize].retain(|entry| {
                    let fire = entry.due <= tick;
                    if fire {
                        out.push(entry.id);
                    }
                    !fire
                });
            }
        } else {
            // A stall of more than one rotation. Walking every tick would visit each bucket
            // many times. Instead, take everything due from each bucket once, then sort.
            let fired = &mut self.fired;
            for bucket in self.buckets.iter_mut() {
                bucket.retain(|entry| {
                    let fire = entry.due <= to;
                    if fire {
                        fired.push(*entry);
                    }
                    !fire
                });
            }
            // Unstable sort: sorts in place, so no allocation.
            fired.sort_unstable_by_key(|entry| entry.due);
            out.extend(fired.drain(..).map(|entry| entry.id));
        }
        self.len -= out.len() - before;
        self.now = to;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(index: u32) -> TimerId {
        TimerId { index, generation: 0 }
    }

    fn advance(wheel: &mut Wheel, to: u64) -> Vec<TimerId> {
        let mut out = Vec::new();
        wheel.advance(to, &mut out);
        out
    }

    #[test]
    fn fires_at_its_tick_and_not_before() {
        let mut wheel = Wheel::new(10, 8);
        wheel.insert(id(1), 5);
        for tick in 1..5 {
            assert_eq!(advance(&mut wheel, tick), [], "fired early at tick {tick}");
        }
        assert_eq!(advance(&mut wheel, 5), [id(1)]);
        assert_eq!(advance(&mut wheel, 40), [], "fired twice");
        assert_eq!(wheel.now(), 40);
    }

    #[test]
    fn advancing_backwards_or_in_place_is_a_no_op() {
        let mut wheel = Wheel::new(10, 8);
        wheel.insert(id(1), 6);
        advance(&mut wheel, 5);
        assert_eq!(advance(&mut wheel, 5), []);
        assert_eq!(advance(&mut wheel, 2), []);
        assert_eq!(wheel.now(), 5);
        assert_eq!(advance(&mut wheel, 6), [id(1)]);
    }

    #[test]
    fn due_after_rounds_up_to_at_least_one_tick() {
        let mut wheel = Wheel::new(10, 8);
        assert_eq!(wheel.tick_ms(), 10);
        assert_eq!(wheel.due_after(0), 1);
        assert_eq!(wheel.due_after(1), 1);
        assert_eq!(wheel.due_after(10), 1);
        assert_eq!(wheel.due_after(11), 2);
        assert_eq!(wheel.due_after(25_000), 2_500);
        advance(&mut wheel, 7);
        assert_eq!(wheel.due_after(0), 8);
        assert_eq!(wheel.due_after(15), 9);
        assert_eq!(wheel.due_after(20), 9);
    }

    #[test]
    fn due_in_the_past_fires_on_the_next_advance() {
        let mut wheel = Wheel::new(10, 8);
        advance(&mut wheel, 5);
        wheel.insert(id(1), 0);
        wheel.insert(id(2), 5);
        assert_eq!(advance(&mut wheel, 6), [id(1), id(2)]);
    }

    #[test]
    fn waits_in_its_bucket_for_many_rounds() {
        let mut wheel = Wheel::new(10, 8);
        // Same bucket (3), rounds 0 and 50.
        wheel.insert(id(1), 8 * 50 + 3);
        wheel.insert(id(2), 3);
        for tick in 1..=8 * 50 + 2 {
            let out = advance(&mut wheel, tick);
            if tick == 3 {
                assert_eq!(out, [id(2)]);
            } else {
                assert_eq!(out, [], "fired early at tick {tick}");
            }
        }
        assert_eq!(wheel.len(), 1);
        assert_eq!(advance(&mut wheel, 8 * 50 + 3), [id(1)]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn advancing_past_many_rotations_fires_everything_due_in_order() {
        let mut wheel = Wheel::new(10, 8);
        advance(&mut wheel, 2);
        for (index, due) in [(1, 70), (2, 3), (3, 41), (4, 9), (5, 12), (6, 100), (7, 200)] {
            wheel.insert(id(index), due);
        }
        assert_eq!(advance(&mut wheel, 100), [id(2), id(4), id(5), id(3), id(1), id(6)]);
        assert_eq!(wheel.now(), 100);
        assert_eq!(wheel.len(), 1);
        assert_eq!(advance(&mut wheel, 199), []);
        assert_eq!(advance(&mut wheel, 200), [id(7)]);
    }

    #[test]
    fn a_stall_of_years_costs_one_visit_per_bucket() {
        // Walking tick by tick would take hours here; the stall path returns at once.
        let far = 1 << 50;
        let mut wheel = Wheel::new(1, 8);
        wheel.insert(id(1), far + 1);
        wheel.insert(id(2), far);
        wheel.insert(id(3), 5);
        assert_eq!(advance(&mut wheel, far), [id(3), id(2)]);
        assert_eq!(advance(&mut wheel, far + 1), [id(1)]);
    }

    #[test]
    fn exactly_one_rotation_takes_the_tick_path_and_stays_in_order() {
        let mut wheel = Wheel::new(10, 8);
        for (index, due) in [(1, 8), (2, 1), (3, 9), (4, 4)] {
            wheel.insert(id(index), due);
        }
        assert_eq!(advance(&mut wheel, 8), [id(2), id(4), id(1)]);
        assert_eq!(advance(&mut wheel, 9), [id(3)]);
    }

    #[test]
    fn orders_across_ticks_within_one_rotation() {
        let mut wheel = Wheel::new(10, 16);
        for (index, due) in [(1, 5), (2, 3), (3, 4), (4, 12), (5, 1)] {
            wheel.insert(id(index), due);
        }
        assert_eq!(advance(&mut wheel, 12), [id(5), id(2), id(3), id(1), id(4)]);
    }

    #[test]
    fn appends_to_out_without_clearing_it() {
        let mut wheel = Wheel::new(10, 8);
        wheel.insert(id(2), 1);
        let mut out = vec![id(1)];
        wheel.advance(1, &mut out);
        assert_eq!(out, [id(1), id(2)]);
    }

    #[test]
    fn reinserting_fired_entries_schedules_them_again() {
        let mut wheel = Wheel::new(10, 8);
        for index in 0..100 {
            wheel.insert(id(index), wheel.due_after(30));
        }
        let mut out = Vec::new();
        wheel.advance(3, &mut out);
        assert_eq!(out.len(), 100);
        // What the shard does: walk what fired; a live session goes back in at its next
        // deadline, and a closed one (odd index here) under a new generation does not.
        for fired in out.drain(..) {
            if fired.index % 2 == 0 {
                wheel.insert(fired, wheel.due_after(30));
            }
        }
        assert_eq!(wheel.len(), 50);
        wheel.advance(5, &mut out);
        assert_eq!(out, []);
        wheel.advance(6, &mut out);
        assert_eq!(out.len(), 50);
        assert!(out.iter().all(|fired| fired.index % 2 == 0));
        assert!(wheel.is_empty());
    }

    #[test]
    fn stale_generations_are_handed_back_for_the_caller_to_drop() {
        let mut wheel = Wheel::new(10, 8);
        let old = TimerId { index: 7, generation: 1 };
        let new = TimerId { index: 7, generation: 2 };
        wheel.insert(old, 4);
        wheel.insert(new, 2);
        assert_eq!(advance(&mut wheel, 4), [new, old]);
    }

    #[test]
    fn len_counts_entries_until_they_fire() {
        let mut wheel = Wheel::new(10, 8);
        assert!(wheel.is_empty());
        wheel.insert(id(1), 2);
        wheel.insert(id(2), 4);
        wheel.insert(id(3), 30);
        assert_eq!(wheel.len(), 3);
        advance(&mut wheel, 2);
        assert_eq!(wheel.len(), 2);
        advance(&mut wheel, 20);
        assert_eq!(wheel.len(), 1);
        advance(&mut wheel, 30);
        assert_eq!(wheel.len(), 0);
        assert!(wheel.is_empty());
    }

    #[test]
    fn buckets_keep_their_capacity_across_rotations() {
        let mut wheel = Wheel::new(10, 8);
        let mut out = Vec::with_capacity(1_000);
        let mut first_capacity = None;
        for round in 0..3 {
            // Every round starts at a multiple of 8, so every burst lands in bucket 1.
            for index in 0..1_000 {
                wheel.insert(id(index), wheel.now() + 1);
            }
            let capacity = wheel.buckets[1].capacity();
            assert_eq!(*first_capacity.get_or_insert(capacity), capacity, "round {round}");
            out.clear();
            wheel.advance(wheel.now() + 8, &mut out);
            assert_eq!(out.len(), 1_000, "round {round}");
            assert_eq!(out.capacity(), 1_000, "round {round}");
            assert_eq!(wheel.buckets[1].capacity(), capacity, "round {round}");
        }
    }

    /// splitmix64: deterministic, so a failure replays.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_dues_fire_once_at_the_first_advance_that_reaches_them() {
        const SLOTS: u64 = 64;
        let mut rng = Rng(0x5EED);
        let mut wheel = Wheel::new(10, SLOTS as usize);
        // Indexed by `TimerId::index`: the tick each entry is due at (after the wheel moves a
        // past due to `now + 1`) and the tick of the advance that returned it.
        let mut due_of: Vec<u64> = Vec::new();
        let mut fired_at: Vec<Option<u64>> = Vec::new();
        let mut out = Vec::new();

        for _ in 0..500 {
            for _ in 0..rng.below(20) {
                let now = wheel.now();
                // Mostly within a few rotations, sometimes in the past, sometimes far out.
                let due = match rng.below(10) {
                    0 => now.saturating_sub(rng.below(5)),
                    1 => now + rng.below(SLOTS * 40),
                    _ => now + rng.below(SLOTS * 3),
                };
                let index = due_of.len() as u32;
                wheel.insert(id(index), due);
                due_of.push(due.max(now + 1));
                fired_at.push(None);
            }

            let from = wheel.now();
            let to = from
                + match rng.below(10) {
                    0 => 0,
                    1 => SLOTS + rng.below(SLOTS * 10),
                    2 => SLOTS,
                    _ => 1 + rng.below(SLOTS / 4),
                };
            out.clear();
            wheel.advance(to, &mut out);
            assert_eq!(wheel.now(), to.max(from));

            let mut last_due = 0;
            for fired in &out {
                let index = fired.index as usize;
                let due = due_of[index];
                assert_eq!(fired_at[index], None, "{index} fired twice");
                assert!(due > from && due <= to, "{index} due {due} fired at {from}..={to}");
                assert!(due >= last_due, "{index} due {due} out of order");
                last_due = due;
                fired_at[index] = Some(to);
            }
            let pending = fired_at.iter().filter(|fired| fired.is_none()).count();
            assert_eq!(wheel.len(), pending);
            // Nothing due by `to` stays behind.
            for (index, due) in due_of.iter().enumerate() {
                if fired_at[index].is_none() {
                    assert!(*due > to, "{index} due {due} missed by advance to {to}");
                }
            }
        }

        assert!(due_of.len() > 4_000, "only {} entries", due_of.len());
        let last = due_of.iter().copied().max().unwrap_or(0);
        out.clear();
        wheel.advance(last, &mut out);
        for fired in &out {
            fired_at[fired.index as usize] = Some(last);
        }
        assert!(fired_at.iter().all(Option::is_some));
        assert!(wheel.is_empty());
    }
}
