//! `Link`: this node's way to one core of another node. Each core of this node that sends on
//! a link has its own TCP connection for it (`service.rs`), made on first use: connected and
//! the hello sent off the core (`connect`), then handed to the core. A closed link fails every
//! request it holds with `RETRY`, and every request sent on it after.

use super::{retry, to_core, FlushRecorder, Outgoing, PeerMsg, CONNECT_TIMEOUT};
use crate::wire::{self, Data, Entry, Op};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use torus_engine::socket::keepalive;
use torus_engine::{current_core, AlignedBuf, Message, Shared};

pub(super) struct LinkInner {
    pub(super) id: u64,
    pub(super) addr: String,
    me: String,
    /// The core on the other node.
    pub(super) core: u32,
    pub(super) closed: AtomicBool,
    shared: Arc<Shared>,
    pub(super) rt: tokio::runtime::Handle,
    /// Flushes this node when a connection of this link fails.
    pub(super) recorder: Arc<dyn FlushRecorder>,
}

/// This node's way to one core of another node.
pub struct Link(Arc<LinkInner>);

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

impl Link {
    /// A link to core `core` of the node listening at `addr`; cores connect on first use.
    /// When one of its connections fails, `recorder` flushes this node.
    pub fn open(
        rt: &tokio::runtime::Handle,
        shared: &Arc<Shared>,
        addr: String,
        me: String,
        core: u32,
        recorder: Arc<dyn FlushRecorder>,
    ) -> Link {
        Link(Arc::new(LinkInner {
            id: NEXT_LINK.fetch_add(1, Ordering::Relaxed),
            addr,
            me,
            core,
            closed: AtomicBool::new(false),
            shared: shared.clone(),
            rt: rt.clone(),
            recorder,
        }))
    }

    /// Tears the link down now: every request it holds fails with `RETRY` (the peer left the
    /// map; its requests go elsewhere rather than wait for `OP_TIMEOUT`).
    pub fn close(&self) {
        if self.0.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for m in &self.0.shared.mailboxes {
            m.send(Message::Service(Box::new(PeerMsg::Close(self.0.id))));
        }
    }

    pub fn dead(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }

    /// The address this link connects to.
    pub fn addr(&self) -> &str {
        &self.0.addr
    }

    /// Queues a request. On a core it leaves through that core's connection (no thread is
    /// woken); elsewhere through the core with the peer core's index.
    pub fn send(&self, o: Outgoing) {
        if self.dead() {
            return o.done.call(retry());
        }
        let cores = self.0.shared.mailboxes.len();
        let core = current_core()
            .filter(|c| *c < cores)
            .unwrap_or(self.0.core as usize % cores);
        to_core(&self.0.shared, core, PeerMsg::Send(self.0.clone(), o));
    }
}

/// Connects for a core (off the core: the connect and the hello may block) and tells it.
pub(super) async fn connect(link: Arc<LinkInner>, core: usize, conn: u64) {
    let fd = async {
        let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&link.addr))
            .await
            .ok()?
            .ok()?;
        let _ = s.set_nodelay(true);
        keepalive(&s, None);
        // Closing a dead connection resets it: nothing still queued in the kernel is
        // delivered later.
        let _ = s.set_zero_linger();
        let mut s = s;
        let mut hello = Vec::new();
        let name = Arc::new(name_buf(&link.me));
        wire::encode_frame(
            &mut [(
                Entry {
                    op: Op::Hello as u8,
                    volume: link.core,
                    ..Entry::default()
                },
                Some(Data {
                    len: link.me.len(),
                    buf: name,
                    start: 0,
                }),
            )],
            &mut hello,
        );
        tokio::time::timeout(CONNECT_TIMEOUT, s.write_all(&hello))
            .await
            .ok()?
            .ok()?;
        let std = s.into_std().ok()?;
        std.set_nonblocking(false).ok()?;
        Some(std)
    }
    .await;
    link.shared.mailboxes[core].send(Message::Service(Box::new(PeerMsg::Connected { conn, fd })));
}

fn name_buf(name: &str) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(name.len().div_ceil(4096).max(1) * 4096);
    b[..name.len()].copy_from_slice(name.as_bytes());
    b
}

impl super::PeerLink for Link {
    fn send(&self, o: Outgoing) {
        Link::send(self, o)
    }
    fn close(&self) {
        Link::close(self)
    }
    fn dead(&self) -> bool {
        Link::dead(self)
    }
    fn addr(&self) -> &str {
        Link::addr(self)
    }
}
