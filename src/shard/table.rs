//! A shard's table of its sessions.

use std::rc::Rc;

use crate::session::Session;
use crate::wheel::TimerId;

/// The shard's session table: a slab whose keys carry a generation, so a stale key (a
/// wheel entry for a session that ended and whose slot was reused) finds nothing.
#[derive(Default)]
pub struct Slab {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

struct Slot {
    generation: u32,
    session: Option<Rc<Session>>,
}

impl Slab {
    pub fn insert(&mut self, make: impl FnOnce(TimerId) -> Session) -> Rc<Session> {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot { generation: 0, session: None });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.generation = slot.generation.wrapping_add(1);
        let session = Rc::new(make(TimerId { index, generation: slot.generation }));
        slot.session = Some(session.clone());
        session
    }

    pub fn get(&self, id: TimerId) -> Option<Rc<Session>> {
        let slot = self.slots.get(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.session.clone()
    }

    pub fn remove(&mut self, id: TimerId) {
        if let Some(slot) = self.slots.get_mut(id.index as usize) {
            if slot.generation == id.generation && slot.session.take().is_some() {
                self.free.push(id.index);
            }
        }
    }

    pub fn all(&self) -> Vec<Rc<Session>> {
        self.slots.iter().filter_map(|s| s.session.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slab_keys_carry_generations() {
        let mut slab = Slab::default();
        let a = slab.insert(Session::for_test);
        let id = a.id;
        slab.remove(id);
        let b = slab.insert(Session::for_test);
        assert_eq!(b.id.index, id.index);
        assert!(slab.get(id).is_none(), "a stale key must not find the new session");
        assert!(slab.get(b.id).is_some());
    }
}
