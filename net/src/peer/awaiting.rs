//! What a core's requests out wait for, so that the core can sleep until all of one
//! replicated write's replies are in instead of waking for each (`completions_awaited`).
//!
//! Invariant: the core sleeps for more than one reply only when one write's copies are all
//! that is out, each on its own connection, and went out less than `AWAIT_ALL_LIMIT` ago; a
//! peer that stopped answering must not keep every other completion of the core waiting.

use std::time::Instant;
use torus_engine::reactor::AWAIT_ALL_LIMIT;

/// What this core's requests out wait for, for `completions_awaited`.
#[derive(Default)]
pub(super) struct Awaiting {
    /// Requests sent and not answered (nor failed), on every connection of this core.
    pending: usize,
    /// The group of the latest request sent (0: none), when its first request went out, and
    /// how many of its requests are pending.
    group: u64,
    since: Option<Instant>,
    in_group: usize,
    /// The group's connections; a second request of the group on one of them (whose replies
    /// might come in one receive) turns the count off.
    conns: Vec<u64>,
    one_per_conn: bool,
}

impl Awaiting {
    pub(super) fn sent(&mut self, group: u64, conn: u64) {
        self.pending += 1;
        if group != 0 && group == self.group {
            self.in_group += 1;
            self.one_per_conn &= !self.conns.contains(&conn);
            self.conns.push(conn);
        } else {
            self.group = group;
            self.since = Some(Instant::now());
            self.in_group = 1;
            self.conns.clear();
            self.conns.push(conn);
            self.one_per_conn = true;
        }
    }

    pub(super) fn answered(&mut self, group: u64) {
        self.pending -= 1;
        if group != 0 && group == self.group {
            self.in_group -= 1;
        }
    }

    /// The number of replies the core can sleep for: all of the group's when they are all
    /// that is out, each on its own connection, and the group went out less than
    /// `AWAIT_ALL_LIMIT` ago (a peer that stopped answering must not keep every other
    /// completion of this core waiting for its reply until `OP_TIMEOUT`).
    pub(super) fn replies_awaited(&self) -> u32 {
        let whole = self.group != 0
            && self.in_group > 1
            && self.in_group == self.pending
            && self.one_per_conn
            && self.since.is_some_and(|t| t.elapsed() < AWAIT_ALL_LIMIT);
        if whole {
            self.in_group as u32
        } else {
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::new_group;

    #[test]
    fn a_core_sleeps_for_all_of_one_writes_replies_and_no_longer() {
        let mut a = Awaiting::default();
        assert_eq!(a.replies_awaited(), 1, "nothing out");
        let g = new_group();
        a.sent(g, 1);
        assert_eq!(a.replies_awaited(), 1, "one reply is one completion");
        a.sent(g, 2);
        assert_eq!(a.replies_awaited(), 2, "both copies' replies");
        a.answered(g);
        assert_eq!(a.replies_awaited(), 1, "the other one");
        a.answered(g);
        assert_eq!(a.replies_awaited(), 1);
        assert_eq!(a.pending, 0);
    }

    #[test]
    fn anything_else_out_wakes_the_core_for_each_reply() {
        let mut a = Awaiting::default();
        // A request on its own (a forwarded read) before a write's copies: its reply alone
        // is worth waking for.
        a.sent(0, 3);
        let g = new_group();
        a.sent(g, 1);
        a.sent(g, 2);
        assert_eq!(a.replies_awaited(), 1);
        a.answered(0);
        assert_eq!(a.replies_awaited(), 2);
        // An older write still waiting for one copy: its reply finishes it.
        let h = new_group();
        a.sent(h, 1);
        a.sent(h, 2);
        assert_eq!(a.replies_awaited(), 1);
        for _ in 0..2 {
            a.answered(g);
        }
        assert_eq!(a.replies_awaited(), 2);
    }

    #[test]
    fn two_requests_on_one_connection_or_an_old_group_are_not_awaited_together() {
        let mut a = Awaiting::default();
        let g = new_group();
        a.sent(g, 1);
        a.sent(g, 1);
        assert_eq!(
            a.replies_awaited(),
            1,
            "their replies may come in one receive"
        );
        let mut b = Awaiting::default();
        let h = new_group();
        b.sent(h, 1);
        b.sent(h, 2);
        b.since = Some(Instant::now() - AWAIT_ALL_LIMIT);
        assert_eq!(
            b.replies_awaited(),
            1,
            "a peer that does not answer holds nothing up"
        );
    }
}
