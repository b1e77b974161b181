//! Who may ask the admin API what (`docs/security.md`).
//!
//! Every request but `GET /metrics` and `GET /healthz` carries a bearer token
//! (`Authorization: Bearer TOKEN`):
//!
//! - the **admin token**, for clients (`torusctl`, `torusblk`): made at a single node's first
//!   start, or once per cluster and kept in etcd; each node keeps it in `DATA_DIR/admin.token`
//!   and where `torusctl` on the same host finds it by itself (`crate::token`).
//! - the **node token**, cluster only, kept in etcd and never on disk: what nodes call each
//!   other's admin API with. Node-to-node routes (`Access::Node`, such as `clone-local`) take
//!   only it; every other route takes either.
//!
//! A request with an `Origin` header (a web page in a browser) is refused, and so is one whose
//! `Host` is not an IP address, `localhost`, or the admin address's own host (a DNS-rebinding
//! page), before its token is looked at.

use crate::token::host_of;
pub use crate::token::Token;
use std::path::Path;
use torus_net::cluster::Cluster;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone who reaches the port: `/metrics` (Prometheus) and `/healthz`.
    Public,
    /// A client with the admin token (or a node with the node token).
    Client,
    /// Another node of the cluster, with the node token only.
    Node,
}

/// Every route of the admin API: method, path (`{x}` is any one segment) and who may call it.
/// `routes::handle` answers each but `/healthz`, which the server answers itself (it takes no
/// request slot); a test walks this table.
pub const ROUTES: &[(&str, &str, Access)] = &[
    ("GET", "/metrics", Access::Public),
    ("GET", "/healthz", Access::Public),
    ("GET", "/v1/status", Access::Client),
    ("GET", "/v1/volumes", Access::Client),
    ("POST", "/v1/volumes", Access::Client),
    ("POST", "/v1/volumes/-/clone-local", Access::Node),
    ("DELETE", "/v1/volumes/{name}", Access::Client),
    ("POST", "/v1/volumes/{name}/resize", Access::Client),
    ("POST", "/v1/volumes/{name}/quota", Access::Client),
    ("POST", "/v1/volumes/{name}/scrub", Access::Client),
    ("GET", "/v1/peers", Access::Client),
    ("POST", "/v1/peers/{name}/remove", Access::Client),
    ("POST", "/v1/peers/{name}/lost", Access::Client),
    ("GET", "/v1/snapshots", Access::Client),
    ("POST", "/v1/snapshots", Access::Client),
    ("DELETE", "/v1/snapshots/{name}", Access::Client),
    ("POST", "/v1/snapshots/{name}/restore", Access::Client),
    ("POST", "/v1/clones", Access::Client),
    ("GET", "/v1/ublk", Access::Client),
    ("POST", "/v1/ublk", Access::Client),
    ("DELETE", "/v1/ublk/{id}", Access::Client),
];

/// Who may call `method path`; `None`: no such route. A path that names no route still needs
/// a token to learn that (`Access::Client`).
pub fn access_of(method: &str, path: &str) -> Option<Access> {
    let segments = |p: &'static str| p.trim_matches('/').split('/');
    ROUTES.iter().find_map(|(m, pattern, access)| {
        let mut have = path.trim_matches('/').split('/');
        let mut want = segments(pattern);
        let matches = *m == method
            && loop {
                match (want.next(), have.next()) {
                    (None, None) => break true,
                    (Some(w), Some(p)) if w.starts_with('{') || w == p => {}
                    _ => break false,
                }
            };
        matches.then_some(*access)
    })
}

/// This node's tokens: alone, the admin token in `DATA_DIR/admin.token`, made at the first
/// start; in a cluster, the cluster's admin and node tokens from etcd, made by the first node
/// that asks (the admin token then written to the data dir too, by `publish`).
pub fn node_credentials(data_dir: &Path, cluster: Option<&Cluster>) -> anyhow::Result<Credentials> {
    use anyhow::Context;
    let Some(c) = cluster else {
        let path = data_dir.join("admin.token");
        let admin = match Token::read(&path)? {
            Some(t) => t,
            None => Token::generate().context("make the admin token")?,
        };
        return Ok(Credentials { admin, node: None });
    };
    let shared = |name: &str| -> anyhow::Result<Token> {
        let made = Token::generate().context("make a token")?;
        let v = c
            .block_on(c.shared_secret(name, || made.as_str().as_bytes().to_vec()))
            .with_context(|| format!("read the cluster's {name} from etcd"))?;
        Token::parse(&String::from_utf8_lossy(&v))
            .with_context(|| format!("etcd's secrets/{name} is not a token (64 hex digits)"))
    };
    Ok(Credentials {
        admin: shared("admin-token")?,
        node: Some(shared("node-token")?),
    })
}

/// The tokens a node takes.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub admin: Token,
    /// A cluster's node token (none on a single node: no route is node-to-node there).
    pub node: Option<Token>,
}

/// Why a request is refused before its route runs: the status code and the message.
pub type Refusal = (u16, String);

impl Credentials {
    /// Checks a request's `Authorization` header value against what the route needs.
    pub fn check(&self, access: Access, authorization: Option<&str>) -> Result<(), Refusal> {
        if access == Access::Public {
            return Ok(());
        }
        // The scheme is case-insensitive (RFC 9110).
        let presented = authorization.and_then(|a| {
            let (scheme, token) = a.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        });
        let Some(presented) = presented else {
            return Err((
                401,
                "this request needs the admin token (Authorization: Bearer TOKEN); torusctl \
                 finds it by itself on the node's host, or give --token-file DATA_DIR/admin.token"
                    .into(),
            ));
        };
        let presented = presented.trim();
        let node = self.node.as_ref().is_some_and(|t| t.matches(presented));
        let admin = self.admin.matches(presented);
        match access {
            Access::Node if node => Ok(()),
            Access::Node if admin => Err((
                403,
                "a node-to-node operation: only the cluster's nodes may call it".into(),
            )),
            Access::Client if node || admin => Ok(()),
            _ => Err((401, "the token given is not this node's admin token".into())),
        }
    }
}

/// The names a request's `Host` may give besides IP addresses and `localhost`: the host of
/// the admin address as given (`--admin-listen`) and this machine's host name (as `hostname`
/// prints it), found once when the server starts.
pub fn own_names(admin_listen: &str) -> Vec<String> {
    let mut names = vec![host_of(admin_listen).to_owned()];
    if let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let name = name.trim();
        if !name.is_empty() {
            names.push(name.to_owned());
        }
    }
    names
}

/// True when a request's `Host` header may be answered: an IP address (with or without a
/// port), `localhost`, or one of `own_names`. Anything else is a name some page made resolve
/// to this host (DNS rebinding).
pub fn host_allowed(host: Option<&str>, own_names: &[String]) -> bool {
    let Some(host) = host else {
        return true; // HTTP/1.0 without Host: not a browser's request
    };
    let name = host_of(host);
    let name = name.strip_suffix('.').unwrap_or(name);
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || own_names.iter().any(|n| name.eq_ignore_ascii_case(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_but_metrics_and_health_needs_a_token() {
        for (method, path, access) in ROUTES {
            let concrete = path.replace("{name}", "x").replace("{id}", "1");
            assert_eq!(
                access_of(method, &concrete),
                Some(*access),
                "{method} {path}"
            );
            let public = matches!(*path, "/metrics" | "/healthz");
            assert_eq!(*access == Access::Public, public, "{method} {path}");
        }
        assert_eq!(access_of("GET", "/v1/nosuch"), None);
        assert_eq!(
            access_of("POST", "/v1/volumes/-/clone-local"),
            Some(Access::Node)
        );
    }

    #[test]
    fn tokens_are_checked_by_route() {
        let admin = Token::generate().unwrap();
        let node = Token::generate().unwrap();
        assert_ne!(admin, node);
        let c = Credentials {
            admin: admin.clone(),
            node: Some(node.clone()),
        };
        let bearer = |t: &Token| format!("Bearer {}", t.as_str());
        assert_eq!(c.check(Access::Public, None), Ok(()));
        assert_eq!(c.check(Access::Client, None).unwrap_err().0, 401);
        assert_eq!(
            c.check(Access::Client, Some("Bearer nope")).unwrap_err().0,
            401
        );
        assert_eq!(c.check(Access::Client, Some(&bearer(&admin))), Ok(()));
        let lower = format!("bearer {}", admin.as_str());
        assert_eq!(c.check(Access::Client, Some(&lower)), Ok(()));
        assert_eq!(c.check(Access::Client, Some(&bearer(&node))), Ok(()));
        assert_eq!(
            c.check(Access::Node, Some(&bearer(&admin))).unwrap_err().0,
            403
        );
        assert_eq!(c.check(Access::Node, Some(&bearer(&node))), Ok(()));
        let alone = Credentials { admin, node: None };
        assert_eq!(alone.check(Access::Node, None).unwrap_err().0, 401);
    }

    #[test]
    fn hosts_a_rebinding_page_would_use_are_refused() {
        let names = own_names("node1:4321");
        for ok in [
            "127.0.0.1:4321",
            "10.0.0.5",
            "[::1]:4321",
            "localhost:4321",
            "node1:4321",
        ] {
            assert!(host_allowed(Some(ok), &names), "{ok}");
        }
        assert!(host_allowed(None, &names));
        assert!(host_allowed(Some("localhost.:4321"), &names));
        assert!(!host_allowed(Some("evil.example:4321"), &names));
        assert!(!host_allowed(Some("127.0.0.1.evil.example"), &names));
        // A page on a name whose first label is this machine's name is a stranger too.
        if let Some(m) = names.get(1) {
            assert!(host_allowed(Some(&format!("{m}:4321")), &names));
            assert!(!host_allowed(
                Some(&format!("{m}.evil.example:4321")),
                &names
            ));
        }
    }
}
