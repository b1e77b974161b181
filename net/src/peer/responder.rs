//! `Responder`: how a node answers one request from a peer, whichever way it came — on a
//! connection (the answer goes back through the core that owns it, batched with others) or
//! from the simulation's network (to a function). Dropped without a reply, it answers
//! `RETRY`.

use super::{to_core, PeerMsg};
use crate::wire::{Data, Entry, Op, Status};
use std::sync::Arc;
use torus_engine::Shared;

/// How a served connection answers one request. Dropped without a reply, it answers `RETRY`.
pub struct Responder {
    to: Answer,
    replied: bool,
}

/// Where a `Responder`'s answer goes.
enum Answer {
    /// Back on the connection the request came on, through the core that owns it.
    Conn {
        shared: Arc<Shared>,
        core: usize,
        conn: u64,
        id: u64,
    },
    /// To a function (the simulation's network).
    Fn(Option<ReplyFn>),
}

type ReplyFn = Box<dyn FnOnce(Status, Option<Data>) + Send>;

impl Responder {
    /// A responder for request `id` of connection `conn`, served by core `core`.
    pub(super) fn conn(shared: Arc<Shared>, core: usize, conn: u64, id: u64) -> Responder {
        Responder {
            to: Answer::Conn {
                shared,
                core,
                conn,
                id,
            },
            replied: false,
        }
    }

    /// A responder whose answer goes to `f` (a request that did not come on a connection).
    pub fn to_fn(f: impl FnOnce(Status, Option<Data>) + Send + 'static) -> Responder {
        Responder {
            to: Answer::Fn(Some(Box::new(f))),
            replied: false,
        }
    }

    pub fn reply(mut self, status: Status, data: Option<Data>) {
        self.replied = true;
        self.send(status, data);
    }

    fn send(&mut self, status: Status, data: Option<Data>) {
        match &mut self.to {
            Answer::Conn {
                shared,
                core,
                conn,
                id,
            } => {
                let entry = Entry {
                    op: Op::Reply as u8,
                    status: status.as_u16(),
                    id: *id,
                    ..Entry::default()
                };
                to_core(
                    shared,
                    *core,
                    PeerMsg::Reply {
                        conn: *conn,
                        entry,
                        data,
                    },
                );
            }
            Answer::Fn(f) => {
                if let Some(f) = f.take() {
                    f(status, data)
                }
            }
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.replied {
            self.send(Status::Retry, None);
        }
    }
}
