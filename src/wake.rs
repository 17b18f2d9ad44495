//! A queue one task waits on and any code of the same executor fills: the pattern behind
//! a shard's local messages, flush list, grace timers, repairs and reconciles. Not `Send`:
//! it lives on one executor, like everything of a shard. A leaf.

use std::cell::{Cell, RefCell, RefMut};
use std::collections::VecDeque;
use std::task::{Poll, Waker};

/// Items in arrival order, and the one task waiting for the next.
pub struct Mailbox<T> {
    items: RefCell<VecDeque<T>>,
    waker: Cell<Option<Waker>>,
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Mailbox { items: RefCell::default(), waker: Cell::new(None) }
    }
}

impl<T> Mailbox<T> {
    /// Queues `item` and wakes the waiting task.
    pub fn push(&self, item: T) {
        self.items.borrow_mut().push_back(item);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// The next item, waiting for one if there is none.
    pub async fn next(&self) -> T {
        futures_lite::future::poll_fn(|cx| match self.items.borrow_mut().pop_front() {
            Some(item) => Poll::Ready(item),
            None => {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }

    /// Waits until there is an item (left in place).
    pub async fn ready(&self) {
        futures_lite::future::poll_fn(|cx| {
            if self.items.borrow().is_empty() {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }

    /// The queue itself, for a task that takes several items at once or reorders them.
    /// Pushing through it wakes no one.
    pub fn items(&self) -> RefMut<'_, VecDeque<T>> {
        self.items.borrow_mut()
    }
}
