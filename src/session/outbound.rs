//! A session's outbound queue ([`Queue`]): the frames not yet written, oldest first, each
//! tagged with what it carries ([`Tag`]) so that a slow consumer's queue can be thinned
//! into `gap`s; several small frames gathered into one `send` through a per-shard scratch
//! buffer; and the non-blocking socket calls a session makes outside its own task
//! ([`send_now`], [`unread_bytes`]).
//!
//! Knows nothing of delivery modes: thinning returns the conversations it put a `gap` in,
//! and the session marks their modes.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use bytes::Bytes;

use crate::ids::Key;
use crate::protocol;
use crate::ws::codec;

/// Most bytes gathered into one `send` when several frames are queued.
pub(super) const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// A per-shard scratch buffer that grew past this is given back rather than kept.
pub(super) const KEPT_SCRATCH_BYTES: usize = 4 * WRITE_BATCH_BYTES;

thread_local! {
    /// Scratch for gathering several queued frames into one `send`.
    static WRITE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A queued frame and what it carries, so a slow consumer's backlog can be thinned.
struct Out {
    bytes: Bytes,
    tag: Tag,
}

pub(super) enum Tag {
    /// Never dropped: hello, ack, error, synced, push, ping, close.
    Control,
    /// A message of a `sync`'s replay (or live behind one): never dropped, paced instead.
    Replay,
    /// A live conversation message: may give way to a `gap`.
    Msg { conv: Key, seq: u64 },
    /// Seqs `from..=to` of `conv` were dropped from this queue.
    Gap { conv: Key, from: u64, to: u64 },
}

/// The frames a session has not written yet.
pub(super) struct Queue {
    /// Frames not yet written, oldest first; `head_sent` bytes of the first are out.
    out: VecDeque<Out>,
    head_sent: usize,
    /// Bytes in `out` not yet written.
    out_bytes: usize,
    /// Shard-clock ms since which the first frame of `out` has been the first: a frame
    /// that stays first for `idle_timeout_ms` means even control frames do not drain
    /// (4002). Meaningless while `out` is empty.
    head_since: u64,
}

impl Queue {
    /// An empty queue, which holds no memory until a frame is appended.
    pub(super) fn new(now: u64) -> Queue {
        Queue { out: VecDeque::new(), head_sent: 0, out_bytes: 0, head_since: now }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Bytes queued and not yet written.
    pub(super) fn bytes(&self) -> usize {
        self.out_bytes
    }

    /// Shard-clock ms since which the first frame has been the first (meaningless while
    /// the queue is empty).
    pub(super) fn head_since(&self) -> u64 {
        self.head_since
    }

    /// Gives the queue's memory back if it is empty (README "Memory per connection").
    pub(super) fn give_back(&mut self) {
        if self.out.is_empty() && self.out.capacity() > 0 {
            self.out = VecDeque::new();
        }
    }

    /// Puts `frame` at the end of the queue; true if the queue was empty.
    pub(super) fn append(&mut self, frame: Bytes, tag: Tag, now: u64) -> bool {
        let first = self.out.is_empty();
        if first {
            self.head_sent = 0;
            self.head_since = now;
        }
        self.out_bytes += frame.len();
        self.out.push_back(Out { bytes: frame, tag });
        first
    }

    /// A `sync` of `conv` starts: its live messages queued and not started yet are
    /// dropped (the client holds them if they are up to its `after`, the replay carries
    /// them if they are past it), and so is a `gap` of it not sent yet. The queue then
    /// never mixes a replay with older live messages of its conversation.
    pub(super) fn forget_queued(&mut self, conv: &Key) {
        let started = self.head_sent > 0;
        let before = self.out.len();
        let mut i = 0;
        self.out.retain(|out| {
            let keep = (i == 0 && started)
                || match &out.tag {
                    Tag::Msg { conv: c, .. } | Tag::Gap { conv: c, .. } => c != conv,
                    Tag::Control | Tag::Replay => true,
                };
            i += 1;
            keep
        });
        if self.out.len() != before {
            self.out_bytes = self.out.iter().map(|o| o.bytes.len()).sum::<usize>() - self.head_sent;
        }
    }

    /// The connection is given up on (4002): frames not started are dropped; a frame half
    /// written stays so the close frame can follow it.
    pub(super) fn truncate_unsent(&mut self) {
        let keep = usize::from(self.head_sent > 0).min(self.out.len());
        self.out.truncate(keep);
        self.out_bytes = self.out.front().map_or(0, |o| o.bytes.len() - self.head_sent);
    }

    /// The queue is over budget and a message of `conv`/`seq` is due: drop every queued
    /// message (and gap) not yet started and queue one `gap` per conversation in their
    /// place. A session's queued items of one conversation always cover consecutive seqs,
    /// so each gap is one range. Returns the conversations given a gap frame, in the order
    /// of their frames: their live messages must now wait for the client's `sync`.
    pub(super) fn thin_out(&mut self, conv: &Key, seq: u64) -> Vec<Key> {
        let mut ranges: Vec<(Key, u64, u64)> = vec![(conv.clone(), seq, seq)];
        let mut merge = |conv: &Key, from: u64, to: u64| match ranges.iter_mut().find(|(c, _, _)| c == conv) {
            Some(r) => {
                r.1 = r.1.min(from);
                r.2 = r.2.max(to);
            }
            None => ranges.push((conv.clone(), from, to)),
        };
        let started = self.head_sent > 0;
        let mut kept = VecDeque::with_capacity(self.out.len());
        for (i, out) in self.out.drain(..).enumerate() {
            match &out.tag {
                _ if i == 0 && started => kept.push_back(out),
                Tag::Control | Tag::Replay => kept.push_back(out),
                Tag::Msg { conv, seq } => merge(conv, *seq, *seq),
                Tag::Gap { conv, from, to } => merge(conv, *from, *to),
            }
        }
        self.out = kept;
        let mut gapped = Vec::with_capacity(ranges.len());
        for (conv, from, to) in ranges {
            let bytes = codec::text_frame(&protocol::gap_json(&conv, from, to));
            gapped.push(conv.clone());
            self.out.push_back(Out { bytes, tag: Tag::Gap { conv, from, to } });
        }
        self.out_bytes = self.out.iter().map(|o| o.bytes.len()).sum::<usize>() - self.head_sent;
        gapped
    }

    /// Calls `write` with the next bytes to write: the unsent rest of the first frame, or
    /// several frames gathered into the shard's scratch, up to [`WRITE_BATCH_BYTES`].
    pub(super) fn with_batch<R>(&self, write: impl FnOnce(&[u8]) -> R) -> R {
        let head = self.head_sent;
        if self.out.len() == 1 {
            return write(&self.out[0].bytes[head..]);
        }
        WRITE_BUF.with(|w| {
            let mut w = w.borrow_mut();
            w.clear();
            for (i, out) in self.out.iter().enumerate() {
                let part = if i == 0 { &out.bytes[head..] } else { &out.bytes[..] };
                if !w.is_empty() && w.len() + part.len() > WRITE_BATCH_BYTES {
                    break;
                }
                w.extend_from_slice(part);
            }
            let res = write(&w);
            if w.capacity() > KEPT_SCRATCH_BYTES {
                *w = Vec::new();
            }
            res
        })
    }

    /// Marks `n` written bytes of the queue as sent.
    pub(super) fn consume(&mut self, mut n: usize, now: u64) {
        self.out_bytes -= n;
        while n > 0 {
            let Some(front) = self.out.front() else { break };
            let left = front.bytes.len() - self.head_sent;
            if n >= left {
                n -= left;
                self.out.pop_front();
                self.head_sent = 0;
                // A new frame is first: the client is taking what it is sent.
                self.head_since = now;
            } else {
                self.head_sent += n;
                n = 0;
            }
        }
    }
}

/// Bytes waiting unread in the socket's receive queue (0 on error).
pub(super) fn unread_bytes(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into `n`; `fd` is the session's open socket.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if rc == 0 && n > 0 {
        n as usize
    } else {
        0
    }
}

/// A non-blocking `send` on the session's socket.
pub(super) fn send_now(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `fd` is the session's open socket (the task sets it to -1 before the
    // stream is dropped) and `buf` is valid for `buf.len()` bytes.
    let n =
        unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_sync_forgets_the_live_messages_of_its_conversation_still_queued() {
        let mut queue = Queue::new(0);
        let (a, b): (Key, Key) = (Arc::from("a"), Arc::from("b"));
        let msg = |conv: &Key, seq| Tag::Msg { conv: conv.clone(), seq };
        queue.append(Bytes::from_static(b"0123"), msg(&a, 1), 0);
        queue.append(Bytes::from_static(b"ack"), Tag::Control, 0);
        queue.append(Bytes::from_static(b"aa"), msg(&a, 2), 0);
        queue.append(Bytes::from_static(b"bb"), msg(&b, 5), 0);
        queue.append(Bytes::from_static(b"gap"), Tag::Gap { conv: a.clone(), from: 3, to: 4 }, 0);
        queue.consume(1, 0);
        queue.forget_queued(&a);
        let left: Vec<&[u8]> = queue.out.iter().map(|o| &o.bytes[..]).collect();
        assert_eq!(left, vec![&b"0123"[..], b"ack", b"bb"], "the started frame stays");
        assert_eq!(queue.out_bytes, 3 + 3 + 2);
        // Given up on: only the started frame stays, so a close frame can follow it.
        queue.truncate_unsent();
        assert_eq!(queue.out.len(), 1);
        assert_eq!(queue.out_bytes, 3);
    }

    #[test]
    fn the_head_frame_dates_from_when_it_became_first() {
        let mut queue = Queue::new(0);
        queue.append(Bytes::from_static(b"one"), Tag::Control, 10);
        queue.append(Bytes::from_static(b"two"), Tag::Control, 20);
        assert_eq!(queue.head_since, 10);
        queue.consume(2, 30);
        assert_eq!(queue.head_since, 10, "half written: still the same head");
        queue.consume(1, 40);
        assert_eq!(queue.head_since, 40, "the next frame is first from now");
    }
}
