//! What runs on each core: the NBD connections and the ublk queues handed to it.

use crate::nbd::transmission::{FrontendStats, NbdService};
use crate::ublk::queue::{StartQueue, UblkService, TOKEN_UBLK};
use std::any::Any;
use std::sync::Arc;
use torus_engine::{Completion, CoreContext, CoreService};

/// The low 4 bits of an io tag say whose operation it is; NBD uses 1 and 2.
const KIND_UBLK: u64 = 3;

pub struct FrontendService {
    nbd: NbdService,
    ublk: UblkService,
}

impl FrontendService {
    pub fn new(core: usize, stats: Arc<FrontendStats>) -> FrontendService {
        FrontendService {
            nbd: NbdService::new(core, stats),
            ublk: UblkService::new(core),
        }
    }
}

impl CoreService for FrontendService {
    fn on_message(&mut self, ctx: &mut CoreContext, message: Box<dyn Any + Send>) {
        match message.downcast::<StartQueue>() {
            Ok(start) => self.ublk.start(ctx, *start, KIND_UBLK),
            Err(other) => self.nbd.on_message(ctx, other),
        }
    }

    fn on_io(&mut self, ctx: &mut CoreContext, tag: u64, result: i32, flags: u32) {
        if tag & 0xF == KIND_UBLK {
            self.ublk.on_io(ctx, tag, result, KIND_UBLK)
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
        self.nbd.on_shutdown(ctx);
        self.ublk.shutdown();
    }

    fn busy(&self) -> bool {
        self.nbd.busy() || self.ublk.busy()
    }
}
