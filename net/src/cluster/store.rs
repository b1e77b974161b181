//! This node's own store as the cluster reaches it: a piece goes to the core that owns its
//! volume and offset (`send_local`), the core that also decides about its PG; a completion
//! becomes a callback (`sink`); an answer reaches whoever asked, from any thread
//! (`deliver`). The engine's errors map to wire status codes and back beside the codes
//! (`wire::Status`).

use super::{Cluster, Host};
use torus_engine::{BlockError, Completion, Message, OnceReply, Output, Piece, PieceKind, ReplyTo};

/// A store's answer as a callback, run once on the answering core's thread.
pub(super) fn sink(f: impl FnOnce(Completion) + Send + 'static) -> ReplyTo {
    ReplyTo::Once(OnceReply(Box::new(f)))
}

/// Delivers an answer to whoever asked, from any thread.
pub(super) fn deliver(host: &dyn Host, reply: ReplyTo, output: Result<Output, BlockError>) {
    let c = Completion {
        token: reply.token(),
        output,
    };
    host.deliver(reply, c)
}

pub(super) fn clone_piece(p: &Piece) -> Piece {
    Piece {
        volume: p.volume,
        offset: p.offset,
        len: p.len,
        kind: match &p.kind {
            PieceKind::Read => PieceKind::Read,
            PieceKind::Status => PieceKind::Status,
            PieceKind::Flush => PieceKind::Flush,
            PieceKind::Zero { fua } => PieceKind::Zero { fua: *fua },
            PieceKind::Write {
                data,
                data_offset,
                fua,
            } => PieceKind::Write {
                data: data.clone(),
                data_offset: *data_offset,
                fua: *fua,
            },
        },
    }
}

impl Cluster {
    pub(super) fn send_local(&self, piece: Piece, reply: ReplyTo) {
        let core = self.host.core_for(piece.volume, piece.offset);
        self.host.to_core(core, Message::Piece(piece, reply));
    }

    /// `send_local`, answered on a channel: true when the store did it.
    pub(super) fn send_local_ok(&self, piece: Piece) -> tokio::sync::oneshot::Receiver<bool> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_local(
            piece,
            sink(move |c| {
                let _ = tx.send(c.output.is_ok());
            }),
        );
        rx
    }

    pub(super) async fn list_local(&self, bitmap: &[bool]) -> Vec<(u32, u64, u32)> {
        let mut waits = Vec::new();
        for core in 0..self.host.cores() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.host.to_core(
                core,
                Message::ListBlocks {
                    pgs: bitmap.to_vec(),
                    reply: Box::new(move |v| {
                        let _ = tx.send(v);
                    }),
                },
            );
            waits.push(rx);
        }
        let mut all = Vec::new();
        for w in waits {
            all.extend(w.await.unwrap_or_default());
        }
        all.sort_unstable();
        all
    }
}
