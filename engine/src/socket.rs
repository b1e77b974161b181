//! What the result of a receive or send on a stream socket means, in one place for every
//! socket path (the NBD connections, the peer connections): an io_uring completion's `res`,
//! or a syscall's return turned into `-errno`. Also the TCP keepalive both paths set
//! (`keepalive`).
//!
//! - `n > 0`: `n` bytes moved.
//! - `0`: end of stream. A receive of a non-empty buffer returns 0 only once the other end has
//!   shut down its side (recv(2)); a send of a non-empty buffer that moved nothing cannot make
//!   progress either. Callers never submit empty buffers, so 0 always means the stream is done.
//! - `-EINTR`, `-EAGAIN` (`-EWOULDBLOCK`): nothing happened; submit the same operation again.
//! - any other `-errno` (`ECONNRESET`, `EPIPE`, `ETIMEDOUT`...): the connection is broken.

use std::time::Duration;

/// TCP keepalive on NBD and peer connections: one whose other end stopped answering (a host
/// powered off or cut off, no reset sent) fails after about `idle + interval × probes` (25 s).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 3;

/// Turns on TCP keepalive (see `KEEPALIVE_IDLE`) and, if given, a TCP user timeout (how long
/// sent data may stay unacknowledged, when keepalive does not probe); a socket that refuses
/// keeps working without them.
pub fn keepalive(socket: &impl std::os::fd::AsFd, user_timeout: Option<Duration>) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let s = socket2::SockRef::from(socket);
    let _ = s.set_tcp_keepalive(&ka);
    if user_timeout.is_some() {
        let _ = s.set_tcp_user_timeout(user_timeout);
    }
}

/// Linux defines them as one value; the match below names only `EAGAIN`.
const _: () = assert!(libc::EAGAIN == libc::EWOULDBLOCK);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketResult {
    /// This many bytes (at least one) were received or sent.
    Data(usize),
    /// The other end closed the stream.
    EndOfStream,
    /// Interrupted or would block: submit the operation again as it was.
    TryAgain,
    /// The connection failed with this errno (positive): close it.
    Error(i32),
}

/// Classifies `result`, an io_uring completion's `res` (or a syscall's return as `-errno`) of
/// a receive or send on a socket.
pub fn classify(result: i32) -> SocketResult {
    match result {
        n if n > 0 => SocketResult::Data(n as usize),
        0 => SocketResult::EndOfStream,
        e if e == -libc::EINTR || e == -libc::EAGAIN => SocketResult::TryAgain,
        // saturating: -i32::MIN does not fit (no kernel returns it, but it must not panic).
        e => SocketResult::Error(e.saturating_neg()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_moved_are_data() {
        assert_eq!(classify(1), SocketResult::Data(1));
        assert_eq!(classify(4096), SocketResult::Data(4096));
        assert_eq!(classify(i32::MAX), SocketResult::Data(i32::MAX as usize));
    }

    #[test]
    fn zero_is_the_end_of_the_stream() {
        assert_eq!(classify(0), SocketResult::EndOfStream);
    }

    #[test]
    fn interrupted_and_would_block_are_tried_again() {
        assert_eq!(classify(-libc::EINTR), SocketResult::TryAgain);
        assert_eq!(classify(-libc::EAGAIN), SocketResult::TryAgain);
        assert_eq!(classify(-libc::EWOULDBLOCK), SocketResult::TryAgain);
    }

    #[test]
    fn other_errnos_are_errors_that_close_the_connection() {
        for errno in [
            libc::ECONNRESET,
            libc::EPIPE,
            libc::ETIMEDOUT,
            libc::ECANCELED,
            libc::EBADF,
        ] {
            assert_eq!(classify(-errno), SocketResult::Error(errno));
        }
        assert_eq!(classify(i32::MIN), SocketResult::Error(i32::MAX));
    }
}
