//! The network in the simulation: a `SimLink` is a node's way to one core of another node,
//! as `peer::Link` is over TCP. Each link has one connection at a time, made on first use
//! and delivering in order both ways, each message after a delay the seed picks; messages on
//! different connections overtake each other.
//!
//! As over TCP: a message into a partition is lost, and a request with no reply within
//! `peer::OP_TIMEOUT` tears its connection down; a connection torn down (that timeout, a
//! reset, the other process dying) fails every request it holds with `RETRY`; an end that
//! sees its connection close flushes its node (`FlushRecorder`), as the peer service does;
//! a request to a node that is down is refused at once.

use super::world::{later, on_core, World};
use crate::peer::{FlushRecorder, Outgoing, PeerLink, Reply, Responder, OP_TIMEOUT};
use crate::wire::{Data, Entry, Status};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One connection of a link.
pub(super) struct Conn {
    from: usize,
    from_gen: u64,
    /// The core of `from` that sent on it (replies come back there).
    send_core: usize,
    to: usize,
    to_gen: u64,
    /// The core of `to` it serves.
    core: u32,
    link: u64,
    pending: BTreeMap<u64, crate::peer::Callback>,
    /// Requests that reached the other end (a reply lost after that makes the sender ask
    /// again: a duplicate).
    arrived: std::collections::BTreeSet<u64>,
    /// When the last message each way arrives (in order per connection).
    forth_at: u64,
    back_at: u64,
    recorder: Arc<dyn FlushRecorder>,
}

pub(super) struct SimLink {
    pub world: World,
    pub id: u64,
    pub from: usize,
    pub gen: u64,
    pub addr: String,
    pub core: u32,
    pub recorder: Arc<dyn FlushRecorder>,
    pub closed: AtomicBool,
}

fn retry() -> Reply {
    Reply {
        status: Status::Retry,
        data: None,
    }
}

impl PeerLink for SimLink {
    fn send(&self, o: Outgoing) {
        if self.dead() {
            return o.done.call(retry());
        }
        let w = &self.world;
        let mut s = w.lock();
        if !s.alive(self.from, self.gen) {
            return;
        }
        let send_core = super::world::current(self.from, self.gen).unwrap_or(0);
        let Some(to) = s.index(&self.addr) else {
            drop(s);
            return o.done.call(retry());
        };
        let Some(to_gen) = s.nodes[to].gen else {
            // Refused: nobody listens.
            drop(s);
            let (from, gen) = (self.from, self.gen);
            return later(
                w,
                from,
                gen,
                send_core,
                Duration::from_micros(200),
                move || o.done.call(retry()),
            );
        };
        s.report.messages += 1;
        // This link's connection from this core, or a new one.
        let existing = s
            .conns
            .iter()
            .find(|(_, c)| c.link == self.id && c.send_core == send_core)
            .map(|(id, c)| (*id, c.to_gen));
        let conn = match existing {
            Some((id, g)) if g == to_gen => id,
            other => {
                if let Some((id, _)) = other {
                    // The other end restarted: the old connection was reset.
                    drop(s);
                    tear_down(w, id, true);
                    s = w.lock();
                }
                let id = s.id();
                let now = s.now_us();
                s.conns.insert(
                    id,
                    Conn {
                        from: self.from,
                        from_gen: self.gen,
                        send_core,
                        to,
                        to_gen,
                        core: self.core,
                        link: self.id,
                        pending: BTreeMap::new(),
                        arrived: Default::default(),
                        forth_at: now,
                        back_at: now,
                        recorder: self.recorder.clone(),
                    },
                );
                id
            }
        };
        let req = s.id();
        let blocked = s.blocked.contains(&(self.from, to));
        let d = s.delay(self.from, to);
        let now = s.now_us();
        let c = s.conns.get_mut(&conn).expect("just made");
        c.pending.insert(req, o.done);
        let (entry, data) = (o.entry, o.data);
        if !blocked {
            let at = (c.forth_at + 1).max(now + d.as_micros() as u64);
            c.forth_at = at;
            let w2 = w.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(at - now)).await;
                arrive(&w2, conn, req, entry, data);
            });
        }
        drop(s);
        let w2 = w.clone();
        tokio::spawn(async move {
            tokio::time::sleep(OP_TIMEOUT).await;
            let overdue = w2
                .lock()
                .conns
                .get(&conn)
                .is_some_and(|c| c.pending.contains_key(&req));
            if overdue {
                tear_down(&w2, conn, false);
            }
        });
    }

    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let ids: Vec<u64> = {
            let s = self.world.lock();
            s.conns
                .iter()
                .filter(|(_, c)| c.link == self.id)
                .map(|(id, _)| *id)
                .collect()
        };
        for id in ids {
            tear_down(&self.world, id, false);
        }
    }

    fn dead(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn addr(&self) -> &str {
        &self.addr
    }
}

/// A request reaches the other end (unless its connection is gone or cut meanwhile).
fn arrive(w: &World, conn: u64, req: u64, entry: Entry, data: Option<Data>) {
    let (to, to_gen, core, from_name, handler) = {
        let mut s = w.lock();
        let Some(c) = s.conns.get(&conn) else { return };
        if s.blocked.contains(&(c.from, c.to)) || !s.alive(c.to, c.to_gen) {
            return;
        }
        let Some(h) = s.nodes[c.to].handler.clone() else {
            return;
        };
        let out = (c.to, c.to_gen, c.core, s.nodes[c.from].name.clone(), h);
        s.conns.get_mut(&conn).expect("checked").arrived.insert(req);
        out
    };
    let w2 = w.clone();
    let respond = Responder::to_fn(move |st, d| answer(&w2, conn, req, st, d));
    on_core(w, to, to_gen, core as usize, move || {
        handler.handle(&from_name, core, entry, data, respond)
    });
}

/// The answer travels back on the same connection.
fn answer(w: &World, conn: u64, req: u64, st: Status, data: Option<Data>) {
    let mut s = w.lock();
    let Some(c) = s.conns.get(&conn) else { return };
    let (from, to) = (c.from, c.to);
    if s.blocked.contains(&(to, from)) {
        return;
    }
    let d = s.delay(to, from);
    let now = s.now_us();
    let c = s.conns.get_mut(&conn).expect("checked");
    let at = (c.back_at + 1).max(now + d.as_micros() as u64);
    c.back_at = at;
    let w2 = w.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_micros(at - now)).await;
        let (done, from, gen, core) = {
            let mut s = w2.lock();
            let Some(c) = s.conns.get_mut(&conn) else {
                return;
            };
            let Some(done) = c.pending.remove(&req) else {
                return;
            };
            (done, c.from, c.from_gen, c.send_core)
        };
        on_core(&w2, from, gen, core, move || {
            done.call(Reply { status: st, data })
        });
    });
}

/// Tears a connection down: its requests fail with `RETRY`, and the other end flushes when
/// the close reaches it. `reset` (a reset or a process dying): both ends see it and flush.
pub(super) fn tear_down(w: &World, conn: u64, reset: bool) {
    let (c, server) = {
        let mut s = w.lock();
        let Some(c) = s.conns.remove(&conn) else {
            return;
        };
        let duplicates = c.pending.keys().filter(|r| c.arrived.contains(r)).count();
        s.report.faults[10] += duplicates as u64;
        let reaches = reset || !s.blocked.contains(&(c.from, c.to));
        let server = if reaches && s.alive(c.to, c.to_gen) {
            s.nodes[c.to].cluster.as_ref().map(|cl| cl.recorder())
        } else {
            None
        };
        (c, server)
    };
    let (from, gen, core) = (c.from, c.from_gen, c.send_core);
    let recorder = c.recorder.clone();
    for (_, done) in c.pending {
        on_core(w, from, gen, core, move || done.call(retry()));
    }
    if reset {
        on_core(w, from, gen, core, move || {
            recorder.flush_recorded();
        });
    }
    if let Some(r) = server {
        on_core(w, c.to, c.to_gen, c.core as usize, move || {
            r.flush_recorded();
        });
    }
}

/// Every connection to or from `node`, for a fault.
pub(super) fn conns_of(w: &World, node: usize) -> Vec<u64> {
    let s = w.lock();
    s.conns
        .iter()
        .filter(|(_, c)| c.from == node || c.to == node)
        .map(|(id, _)| *id)
        .collect()
}

/// Every connection.
pub(super) fn all_conns(w: &World) -> Vec<u64> {
    w.lock().conns.keys().copied().collect()
}
