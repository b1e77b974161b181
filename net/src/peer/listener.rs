//! The peer listener (tokio, off the cores): accepts connections from other nodes, reads the
//! hello that names the caller and the core it wants, and hands the socket to that core.
//!
//! Before its hello a connection is served here: at most `HELLO_WAITING` at once, each
//! reading at most `wire::HELLO_MAX` bytes for at most the hello timeout; past that, new ones
//! are closed at once.

use super::{FlushRecorder, Handler, LogEvery, PeerMsg, CONNECT_TIMEOUT};
use crate::wire::{self, Op};
use std::sync::Arc;
use tokio::net::TcpStream;
use torus_engine::socket::keepalive;
use torus_engine::{Message, Shared};

/// Incoming connections that may be waiting to send their hello at once.
pub const HELLO_WAITING: usize = 64;

/// Accepts peer connections on `listener` for as long as the runtime runs, each served by
/// `accept` on its own task.
pub async fn listen(
    listener: tokio::net::TcpListener,
    handler: Arc<dyn Handler>,
    recorder: Arc<dyn FlushRecorder>,
    shared: Arc<Shared>,
) {
    // Connections that have not sent their hello yet are few and small: at most
    // HELLO_WAITING of them, each holding at most wire::HELLO_MAX bytes for at most
    // the hello timeout. Past that, new ones are closed at once.
    let waiting = Arc::new(tokio::sync::Semaphore::new(HELLO_WAITING));
    let mut refused = 0u64;
    let mut said = LogEvery::default();
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = waiting.clone().try_acquire_owned() else {
            refused += 1;
            if said.ready() {
                eprintln!(
                    "torusd: peer connection from {from} closed: {} connections are already waiting to say hello ({refused} closed so far)",
                    HELLO_WAITING
                );
            }
            continue;
        };
        let (handler, recorder, shared) = (handler.clone(), recorder.clone(), shared.clone());
        tokio::spawn(async move {
            accept(stream, handler, recorder, shared).await;
            drop(permit);
        });
    }
}

/// Reads an incoming connection's hello (which names the caller and the core it wants) and
/// hands the socket to that core. A bad or missing hello closes it.
pub async fn accept(
    stream: TcpStream,
    handler: Arc<dyn Handler>,
    recorder: Arc<dyn FlushRecorder>,
    shared: Arc<Shared>,
) {
    let _ = stream.set_nodelay(true);
    keepalive(&stream, None);
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut stream = stream;
    let hello = match tokio::time::timeout(CONNECT_TIMEOUT * 5, wire::read_hello(&mut stream)).await
    {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            eprintln!("torusd: peer connection from {peer}: {e}; closed");
            return;
        }
        Err(_) => return,
    };
    let Some(&(e, start)) = hello.entries.first() else {
        return;
    };
    if e.op != Op::Hello as u8
        || e.volume >= handler.cores()
        || e.volume as usize >= shared.mailboxes.len()
        || e.data_len as usize > 256
    {
        eprintln!("torusd: peer connection from {peer}: bad hello; closed");
        return;
    }
    let from =
        String::from_utf8_lossy(&hello.body[start..start + e.data_len as usize]).into_owned();
    let Ok(std) = stream.into_std() else { return };
    if std.set_nonblocking(false).is_err() {
        return;
    }
    shared.mailboxes[e.volume as usize].send(Message::Service(Box::new(PeerMsg::Serve {
        fd: std,
        from,
        handler,
        recorder,
    })));
}
