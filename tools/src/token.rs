//! The admin API's bearer tokens as files: made from the kernel's random source, written
//! readable by their owner only, and found by `torusctl` (`find_for`): `--token-file`,
//! `$TORUS_TOKEN_FILE`, the file a node on this host wrote for the admin address asked
//! (`runtime_token_path`), and for a loopback address `/var/lib/torus/admin.token` and
//! `./torus-data/admin.token`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A bearer token: 32 random bytes, as 64 hex digits.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// A new token from the kernel's random source.
    pub fn generate() -> std::io::Result<Token> {
        let mut bytes = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
        let mut s = String::with_capacity(64);
        for b in bytes {
            let _ = write!(s, "{b:02x}");
        }
        Ok(Token(s))
    }

    /// A token as written in a file or kept in etcd: refused unless it is 64 hex digits, so a
    /// file with something else in it is not taken for a weak token.
    pub fn parse(text: &str) -> Option<Token> {
        let t = text.trim();
        (t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Token(t.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Compares in time that does not depend on where the two differ.
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// Reads the token in `path`; `Ok(None)` when the file does not exist.
    pub fn read(path: &Path) -> std::io::Result<Option<Token>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Token::parse(&text).map(Some).ok_or_else(|| {
                std::io::Error::other(format!(
                    "{} does not hold an admin token (64 hex digits)",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the token to `path`, readable by its owner only (through a temporary file and a
    /// rename, so a reader never sees half of it).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("token.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{}\n", self.0).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

/// Where a node keeps its admin token for `torusctl` on the same host to find by the admin
/// address it talks to (`127.0.0.1:4321`): `/run/torus/` for root, else
/// `$XDG_RUNTIME_DIR/torus/` or `/run/user/UID/torus/`; `None` when there is no such directory.
pub fn runtime_token_path(admin_addr: &str) -> Option<PathBuf> {
    let dir = runtime_dir()?.join("torus");
    Some(dir.join(format!(
        "admin-{}.token",
        admin_addr.replace(['/', '[', ']'], "_")
    )))
}

fn runtime_dir() -> Option<PathBuf> {
    let uid = std::fs::metadata("/proc/self").ok()?.uid();
    // root: /run, where systemd's unit for torusd makes /run/torus (its RuntimeDirectory), for
    // torusd and a root torusctl alike, whatever sessions root has.
    if uid == 0 {
        return Some(PathBuf::from("/run"));
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    let user = PathBuf::from(format!("/run/user/{uid}"));
    user.is_dir().then_some(user)
}

/// Writes the admin token where `torusctl` looks for it: `DATA_DIR/admin.token`, and the
/// runtime directory's file for each address in `addrs` (best effort: a runtime directory that
/// cannot be written only means `torusctl` needs `--token-file`).
pub fn publish(token: &Token, data_dir: &Path, addrs: &[String]) -> std::io::Result<PathBuf> {
    let path = data_dir.join("admin.token");
    if Token::read(&path).ok().flatten().as_ref() != Some(token) {
        token.write(&path)?;
    } else {
        // The right token in a file made readable to others (restored from a backup): the
        // owner's only again.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    for a in addrs {
        if let Some(p) = runtime_token_path(a) {
            if let Some(dir) = p.parent() {
                // A directory made here is its owner's only; one that exists (systemd's
                // RuntimeDirectory, which holds the NBD socket too) keeps its mode: the
                // token file itself is 0600.
                if !dir.is_dir() && std::fs::create_dir_all(dir).is_ok() {
                    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
                }
                let _ = token.write(&p);
            }
        }
    }
    Ok(path)
}

/// The host part of an address with a port: `node1` of `node1:4321`, `::1` of `[::1]:4321`.
pub fn host_of(addr: &str) -> &str {
    match addr.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => addr.rsplit_once(':').map_or(addr, |(h, _)| h),
    }
}

/// The token `torusctl` sends to the admin API at `server` (`http://HOST:PORT`), and the file
/// it came from: `explicit` (`--token-file`) or `$TORUS_TOKEN_FILE` if given (an error if
/// unreadable), else the first found of the file a node on this host wrote for that address
/// and, for a loopback address only, `/var/lib/torus/admin.token` and
/// `./torus-data/admin.token`. `Ok(None)`: none found.
pub fn find_for(
    server: &str,
    explicit: Option<&Path>,
) -> std::io::Result<Option<(Token, PathBuf)>> {
    let named = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("TORUS_TOKEN_FILE").map(PathBuf::from));
    if let Some(path) = named {
        return match Token::read(&path)? {
            Some(t) => Ok(Some((t, path))),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("token file {} does not exist", path.display()),
            )),
        };
    }
    let addr = server
        .split_once("://")
        .map_or(server, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or("");
    // A data dir's token goes only to a node on this host: to another one it would tell
    // that node this one's secret, over plain HTTP.
    let host = host_of(addr);
    let local = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let data_dirs = [
        PathBuf::from("/var/lib/torus/admin.token"),
        PathBuf::from("torus-data/admin.token"),
    ];
    let candidates = runtime_token_path(addr)
        .into_iter()
        .chain(data_dirs.into_iter().filter(|_| local));
    for path in candidates {
        if let Ok(Some(t)) = Token::read(&path) {
            return Ok(Some((t, path)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_the_owners_only_and_a_bad_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("torus-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.token");
        let t = Token::generate().unwrap();
        t.write(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(Token::read(&path).unwrap(), Some(t));
        std::fs::write(&path, "hunter2\n").unwrap();
        assert!(Token::read(&path).is_err());
        assert_eq!(Token::read(&dir.join("none")).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
