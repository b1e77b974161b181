//! Client sockets a test needs and std does not make: one from another loopback address, and
//! telling whether the other end has closed one.

use std::io::Read;

/// A nonblocking TCP connection to `to` from the loopback address `from` (`127.0.0.2`: another
/// client address on the same host).
pub fn connect_from(from: &str, to: std::net::SocketAddr) -> std::net::TcpStream {
    // std cannot bind a client socket before it connects: through libc.
    use std::os::fd::FromRawFd;
    let from: std::net::Ipv4Addr = from.parse().unwrap();
    let std::net::SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let local = sin(from, 0);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len),
            0
        );
        let remote = sin(*to.ip(), to.port());
        assert_eq!(
            libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len),
            0,
            "{}",
            std::io::Error::last_os_error()
        );
        let s = std::net::TcpStream::from_raw_fd(fd);
        s.set_nonblocking(true).unwrap();
        s
    }
}

/// False once the other end closed a nonblocking connection (reading what it sent, a read
/// then sees EOF or a reset).
pub fn still_open(s: &mut std::net::TcpStream) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}
