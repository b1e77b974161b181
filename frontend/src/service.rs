//! What runs on each core: the NBD connections and the ublk queues handed to it.

use crate::nbd::transmission::{FrontendStats, NbdService, NewConnection};
use crate::ublk::queue::{StartQueue, UblkService, TOKEN_UBLK};
use std::any::Any;
use std::sync::Arc;
use torus_engine::reactor::TAG_KIND_PEER;
use torus_engine::{Completion, CoreContext, CoreService};

/// The low 4 bits of an io tag say whose operation it is; NBD uses 1 and 2.
const KIND_UBLK: u64 = 3;

pub struct FrontendService {
    nbd: NbdService,
    ublk: UblkService,
    /// The node-to-node connections of a cluster node: its io tags carry `TAG_KIND_PEER`,
    /// and it gets every message that is not the frontend's.
    peer: Option<Box<dyn CoreService>>,
}

impl FrontendService {
    pub fn new(core: usize, stats: Arc<FrontendStats>) -> FrontendService {
        FrontendService {
            nbd: NbdService::new(core, stats),
            ublk: UblkService::new(core),
            peer: None,
        }
    }

    /// Runs the peer connections of a cluster node on this core too.
    pub fn with_peer(mut self, peer: Box<dyn CoreService>) -> FrontendService {
        self.peer = Some(peer);
        self
    }
}

impl CoreService for FrontendService {
    fn on_message(&mut self, ctx: &mut CoreContext, message: Box<dyn Any + Send>) {
        if message.is::<StartQueue>() {
            let start = message.downcast::<StartQueue>().expect("checked");
            return self.ublk.start(ctx, *start, KIND_UBLK);
        }
        match &mut self.peer {
            Some(peer) if !message.is::<NewConnection>() => peer.on_message(ctx, message),
            _ => self.nbd.on_message(ctx, message),
        }
    }

    fn on_io(&mut self, ctx: &mut CoreContext, tag: u64, result: i32, flags: u32) {
        if tag & 0xF == KIND_UBLK {
            self.ublk.on_io(ctx, tag, result, KIND_UBLK)
        } else if tag & 0xF == TAG_KIND_PEER {
            if let Some(peer) = &mut self.peer {
                peer.on_io(ctx, tag, result, flags)
            }
        } else {
            self.nbd.on_io(ctx, tag, result, flags)
        }
    }

    fn on_completion(&mut self, ctx: &mut CoreContext, completion: Completion) {
        if completion.token & TOKEN_UBLK != 0 {
            self.ublk.on_completion(ctx, completion, KIND_UBLK)
        } else {
            self.nbd.on_completion(ctx, completion)
        }
    }

    fn on_shutdown(&mut self, ctx: &mut CoreContext) {
        if let Some(peer) = &mut self.peer {
            peer.on_shutdown(ctx);
        }
        self.nbd.on_shutdown(ctx);
        self.ublk.shutdown();
    }

    fn busy(&self) -> bool {
        self.nbd.busy() || self.ublk.busy()
    }

    fn end_of_iteration(&mut self, ctx: &mut CoreContext) {
        if let Some(peer) = &mut self.peer {
            peer.end_of_iteration(ctx);
        }
    }

    fn completions_awaited(&self) -> u32 {
        self.peer.as_ref().map_or(1, |p| p.completions_awaited())
    }
}
