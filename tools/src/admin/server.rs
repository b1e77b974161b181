//! The admin API's HTTP server (hyper, HTTP/1.1) and the limits that keep one client from
//! exhausting it: at most `CONNECTIONS_MAX` connections, `CONNECTIONS_PER_SOURCE` from one
//! address (more are closed at once); a request's headers within `HEADER_READ_TIMEOUT` (hyper
//! closes the connection otherwise), at most `HEADERS_MAX` of them in `HEADER_BYTES_MAX`
//! bytes; its body within `BODY_TIMEOUT` and `BODY_MAX` bytes; `ADMIN_CONCURRENCY` requests
//! worked on at once (more are answered 503). A connection lasts at most `CONNECTION_MAX_AGE`.
//!
//! The accept loop and the connections run on one tokio thread; each request's work (a volume
//! service, which may block on the cluster or call another node's admin API, which may call
//! back) runs on a thread of its own, as many as `ADMIN_CONCURRENCY`.

use super::auth::{self, Access, Credentials};
use super::{error, routes, Answer, Node};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, ORIGIN};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use torus_engine::source_slots::SourceSlots;

/// Largest request body accepted.
const BODY_MAX: usize = 64 * 1024;
/// Requests worked on at once.
const ADMIN_CONCURRENCY: usize = 32;
/// `/metrics` renderings at once, apart from the others: a flood of scrapes (which need no
/// token) cannot take the slots of torusctl and the other nodes.
const METRICS_CONCURRENCY: usize = 2;
const CONNECTIONS_MAX: usize = 1024;
const CONNECTIONS_PER_SOURCE: usize = 64;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const HEADERS_MAX: usize = 64;
/// hyper's read buffer, which bounds the request line and headers (its minimum is 8 KiB).
const HEADER_BYTES_MAX: usize = 16 * 1024;
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longer than any request takes (a cluster snapshot waits at most about a minute).
const CONNECTION_MAX_AGE: Duration = Duration::from_secs(600);

/// A running admin server; `stop` ends it.
pub struct AdminServer {
    /// The bound address (with port 0, the port the kernel picked).
    pub addr: SocketAddr,
    stop: Arc<Notify>,
    thread: std::thread::JoinHandle<()>,
}

struct Ctx {
    node: Arc<Node>,
    credentials: Credentials,
    /// The names accepted in `Host` besides IPs and localhost (`auth::own_names`).
    own_names: Vec<String>,
    busy: Arc<Semaphore>,
    scrapes: Arc<Semaphore>,
}

impl AdminServer {
    /// Serves the admin API on `listener` (bound to `admin_listen`, the address as given)
    /// until `stop`.
    pub fn start(
        node: Arc<Node>,
        listener: std::net::TcpListener,
        credentials: Credentials,
        admin_listen: &str,
    ) -> std::io::Result<AdminServer> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(Notify::new());
        let ctx = Arc::new(Ctx {
            node,
            credentials,
            own_names: auth::own_names(admin_listen),
            busy: Arc::new(Semaphore::new(ADMIN_CONCURRENCY)),
            scrapes: Arc::new(Semaphore::new(METRICS_CONCURRENCY)),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _entered = rt.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("torus-admin".into())
            .spawn(move || {
                rt.block_on(accept_loop(listener, ctx, stopped));
                rt.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(AdminServer { addr, stop, thread })
    }

    /// Stops accepting, drops the connections, and waits for the server's thread.
    pub fn stop(self) {
        self.stop.notify_one();
        let _ = self.thread.join();
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, ctx: Arc<Ctx>, stop: Arc<Notify>) {
    let open = SourceSlots::new(CONNECTIONS_MAX, CONNECTIONS_PER_SOURCE);
    let mut refused_logged = false;
    loop {
        let accepted = tokio::select! {
            _ = stop.notified() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors (or another passing error): wait rather than spin.
                eprintln!("torusd: admin API: accept: {e}; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = open.take(Some(peer.ip())) else {
            if !refused_logged {
                eprintln!(
                    "torusd: admin API: connection from {peer} refused: over {CONNECTIONS_PER_SOURCE} from one address or {CONNECTIONS_MAX} in all (logged once)"
                );
                refused_logged = true;
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, std::convert::Infallible>(serve(req, ctx).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_headers(HEADERS_MAX)
                .max_buf_size(HEADER_BYTES_MAX)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_MAX_AGE, conn).await;
        });
    }
}

async fn serve(req: Request<Incoming>, ctx: Arc<Ctx>) -> Response<Full<Bytes>> {
    let answer = match admitted(&req, &ctx) {
        Err(refused) => refused,
        Ok(()) => answer(req, &ctx).await,
    };
    Response::builder()
        .status(answer.code)
        .header(CONTENT_TYPE, answer.content_type)
        .body(Full::new(Bytes::from(answer.body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// The checks made before a request's body is read: where it comes from and its token.
fn admitted(req: &Request<Incoming>, ctx: &Ctx) -> Result<(), Answer> {
    if req.headers().contains_key(ORIGIN) {
        return Err(error(
            403,
            "requests from web pages (with an Origin header) are refused",
        ));
    }
    let host = match req.headers().get(HOST).map(|h| h.to_str()) {
        None => None,
        Some(Ok(h)) => Some(h),
        Some(Err(_)) => return Err(error(400, "a Host header that is not text")),
    };
    if !auth::host_allowed(host, &ctx.own_names) {
        return Err(error(
            403,
            format!(
                "Host {:?} is not this node's: use its IP address",
                host.unwrap_or("")
            ),
        ));
    }
    let access = auth::access_of(req.method().as_str(), req.uri().path()).unwrap_or(Access::Client);
    let authorization = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|h| h.to_str().ok());
    ctx.credentials
        .check(access, authorization)
        .map_err(|(code, message)| error(code, message))
}

async fn answer(req: Request<Incoming>, ctx: &Arc<Ctx>) -> Answer {
    let method = req.method().as_str().to_owned();
    let url = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
    let body = match tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), BODY_MAX).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            return error(
                413,
                format!("request body over {BODY_MAX} bytes or unreadable"),
            )
        }
        Err(_) => {
            return error(
                408,
                format!("request body not received within {BODY_TIMEOUT:?}"),
            )
        }
    };
    if method == "GET" && url == "/healthz" {
        return Answer {
            code: 200,
            body: "ok\n".into(),
            content_type: "text/plain",
        };
    }
    let slots = if url.split('?').next() == Some("/metrics") {
        &ctx.scrapes
    } else {
        &ctx.busy
    };
    let Ok(permit) = slots.clone().try_acquire_owned() else {
        return error(503, "too many admin requests at once; retry");
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let node = ctx.node.clone();
    let spawned = std::thread::Builder::new()
        .name("torus-admin-req".into())
        .spawn(move || {
            let a = routes::handle(&node, &method, &url, &body);
            drop(permit);
            let _ = tx.send(a);
        });
    if let Err(e) = spawned {
        return error(503, format!("cannot start a thread for the request: {e}"));
    }
    rx.await
        .unwrap_or_else(|_| error(500, "the request's thread ended without an answer"))
}
