//! The ingress. HTTP: accepts TCP connections, reads the request head to pick an image (by
//! `Host` header, or the only image), and hands the client socket plus the bytes already
//! read to a worker with SCM_RIGHTS. TCP routes: each listening address belongs to one
//! image, and its connections are handed off with no byte read (any protocol). The data path is client <-> worker <-> guest; the
//! router copies nothing after the head. Because bytes pass through untouched, keep-alive,
//! pipelining, any request body and WebSocket upgrades work as the workload speaks them.
//!
//! Consequence of the handoff: the router does not see responses, so its metrics count
//! connections handed off and the router's own latency (accept -> handoff), not response
//! status codes.

mod admin;
mod metrics;
mod pool;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

pub use metrics::Metrics;
pub use pool::{ImagePool, Isolation, PoolConfig};
pub use supermachine_worker::PortProtocol;

use supermachine_worker::Error;

/// Largest request head the router reads before choosing a worker.
const MAX_HEAD: usize = 64 * 1024;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// One image the router serves.
#[derive(Debug, Clone)]
pub struct Route {
    /// `Host` header value (port ignored) that selects it; `None`: the default route.
    pub host: Option<String>,
    /// The baked snapshot.
    pub snapshot: PathBuf,
}

#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Where HTTP clients connect (routed by the request head); `None`: TCP routes only.
    pub listen: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// HTTP routes (by `Host`), served on `listen`.
    pub routes: Vec<Route>,
    /// TCP routes, each on its own listening address.
    pub tcp: Vec<TcpRoute>,
    pub pool: PoolConfig,
    /// How long SIGTERM waits for connections to finish.
    pub grace: Duration,
    /// Single image only: hand the listening socket to every worker, which accept on it
    /// themselves (no head parsing, no routing, no per-connection handoff).
    pub accept_in_workers: bool,
}

pub struct Router {
    pools: Vec<(Option<String>, Arc<ImagePool>)>,
    metrics: Arc<Metrics>,
}

impl Router {
    fn pick(&self, host: Option<&str>) -> Option<&Arc<ImagePool>> {
        let host = host.map(|h| {
            h.rsplit_once(':')
                .map_or(h, |(name, _)| name)
                .to_ascii_lowercase()
        });
        if let Some(h) = &host {
            if let Some((_, p)) = self
                .pools
                .iter()
                .find(|(rh, _)| rh.as_deref() == Some(h.as_str()))
            {
                return Some(p);
            }
        }
        self.pools
            .iter()
            .find(|(rh, _)| rh.is_none())
            .map(|(_, p)| p)
            .or_else(|| {
                // A single image serves every host.
                (self.pools.len() == 1).then(|| &self.pools[0].1)
            })
    }
}

/// Where the request head ends (after the blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The `Host` header of a request head.
pub fn host_of(head: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).ok()?;
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(|s| s.trim().to_string())
}

async fn reply_and_close(s: TcpStream, status: &str) {
    let body = format!("{status}\n");
    let msg = format!("HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
    send_and_close(s, msg.as_bytes()).await;
}

/// Writes a whole response and closes the connection (a peer gone meanwhile is no error).
async fn send_and_close(mut s: TcpStream, response: &[u8]) {
    use tokio::io::AsyncWriteExt;
    let _ = s.write_all(response).await;
    let _ = s.shutdown().await;
}

async fn handle(router: Arc<Router>, mut stream: TcpStream) {
    let accepted = Instant::now();
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let head = loop {
        if let Some(end) = head_end(&buf[..len]) {
            break end;
        }
        if len == buf.len() {
            if buf.len() >= MAX_HEAD {
                router.metrics.rejected("head_too_large");
                return reply_and_close(stream, "431 Request Header Fields Too Large").await;
            }
            buf.resize(buf.len() * 2, 0);
        }
        match tokio::time::timeout(HEAD_TIMEOUT, stream.read(&mut buf[len..])).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => len += n,
            Err(_) => {
                router.metrics.rejected("head_timeout");
                return reply_and_close(stream, "408 Request Timeout").await;
            }
        }
    };
    let host = host_of(&buf[..head]);
    let Some(pool) = router.pick(host.as_deref()).cloned() else {
        router.metrics.rejected("no_route");
        return reply_and_close(stream, "404 Not Found").await;
    };
    // Everything read so far (head and any body bytes) goes to the worker first.
    let prefix = buf[..len].to_vec();
    let std_stream = match stream.into_std() {
        Ok(s) => s,
        Err(_) => return,
    };
    let _ = std_stream.set_nonblocking(false);
    let metrics = router.metrics.clone();
    let result = tokio::task::spawn_blocking(move || pool.handoff(std_stream, &prefix)).await;
    match result {
        Ok(Ok(())) => metrics.handed_off(accepted.elapsed()),
        Ok(Err((e, stream))) => {
            tracing::warn!(error = %e, "no worker could take the connection");
            metrics.rejected("no_worker");
            if let Some(s) = stream.and_then(|s| TcpStream::from_std(s).ok()) {
                send_and_close(s, supermachine_worker::BAD_GATEWAY).await;
            }
        }
        Err(_) => metrics.rejected("internal"),
    }
}

/// A TCP (L4) route: every connection to `listen` goes, untouched, to the snapshot's port.
#[derive(Debug, Clone)]
pub struct TcpRoute {
    pub listen: SocketAddr,
    pub snapshot: PathBuf,
}

/// Hands one raw TCP connection to a worker: no byte is read, and one that cannot be
/// served is closed with nothing written (anything would be the protocol's first bytes).
async fn handle_tcp(pool: Arc<ImagePool>, metrics: Arc<Metrics>, stream: TcpStream) {
    let accepted = Instant::now();
    let _ = stream.set_nodelay(true);
    let Ok(std_stream) = stream.into_std() else {
        return;
    };
    let _ = std_stream.set_nonblocking(false);
    match tokio::task::spawn_blocking(move || pool.handoff(std_stream, &[])).await {
        Ok(Ok(())) => metrics.handed_off(accepted.elapsed()),
        Ok(Err((e, _stream))) => {
            tracing::warn!(error = %e, "no worker could take the TCP connection");
            metrics.rejected("no_worker");
        }
        Err(_) => metrics.rejected("internal"),
    }
}

/// Accepts on `listener` until dropped, one task per connection.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    mode: &'static str,
    metrics: Arc<Metrics>,
    on: F,
) where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let name = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                metrics.accepted(&name, mode);
                tokio::spawn(on(stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("listening on {addr}"), e))
}

/// Runs the router until `shutdown` resolves, then drains (bounded by `grace`) and stops
/// every worker.
pub async fn serve(
    config: RouterConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let metrics = Arc::new(Metrics::default());
    if config.accept_in_workers {
        let listen = match (config.listen, config.routes.len(), config.pool.isolation) {
            (Some(l), 1, Isolation::Shared) if config.tcp.is_empty() => l,
            _ => {
                return Err(Error::Worker(
                    "--accept-in-workers needs exactly one image, an HTTP listener, no TCP routes and shared isolation".into(),
                ))
            }
        };
        let listener = std::net::TcpListener::bind(listen)
            .map_err(|e| Error::io(format!("listening on {listen}"), e))?;
        let pool = ImagePool::start_accepting(
            config.routes[0].snapshot.clone(),
            config.pool.clone(),
            PortProtocol::Http,
            metrics.clone(),
            listener,
        )?;
        let admin_task = config
            .admin
            .map(|addr| tokio::spawn(admin::serve(addr, metrics.clone(), vec![pool.clone()])));
        tracing::info!(listen = %listen, "workers accept on the shared listener");
        shutdown.await;
        pool.shutdown();
        if let Some(t) = admin_task {
            t.abort();
        }
        return Ok(());
    }
    if config.listen.is_none() && !config.routes.is_empty() {
        return Err(Error::Worker(
            "HTTP routes need an HTTP listening address".into(),
        ));
    }
    if config.routes.is_empty() && config.tcp.is_empty() {
        return Err(Error::Worker(
            "nothing to serve: no HTTP or TCP route".into(),
        ));
    }
    let mut all_pools: Vec<Arc<ImagePool>> = Vec::new();
    let mut pools = Vec::new();
    for r in &config.routes {
        let pool = ImagePool::start(
            r.snapshot.clone(),
            config.pool.clone(),
            PortProtocol::Http,
            metrics.clone(),
        )?;
        all_pools.push(pool.clone());
        pools.push((r.host.clone().map(|h| h.to_ascii_lowercase()), pool));
    }
    let router = Arc::new(Router {
        pools,
        metrics: metrics.clone(),
    });
    let mut tasks = Vec::new();
    // Listeners bind before pools of later routes start, so a port in use fails fast.
    if let Some(listen) = config.listen.filter(|_| !config.routes.is_empty()) {
        let listener = bind(listen).await?;
        tracing::info!(listen = %listen, mode = "http", "router listening");
        let r = router.clone();
        tasks.push(tokio::spawn(accept_loop(
            listener,
            "http",
            metrics.clone(),
            move |s| handle(r.clone(), s),
        )));
    }
    for t in &config.tcp {
        let listener = bind(t.listen).await?;
        let pool = ImagePool::start(
            t.snapshot.clone(),
            config.pool.clone(),
            PortProtocol::Tcp,
            metrics.clone(),
        )?;
        all_pools.push(pool.clone());
        tracing::info!(listen = %t.listen, mode = "tcp", "router listening");
        let m = metrics.clone();
        tasks.push(tokio::spawn(accept_loop(
            listener,
            "tcp",
            metrics.clone(),
            move |s| handle_tcp(pool.clone(), m.clone(), s),
        )));
    }
    if let Some(addr) = config.admin {
        tasks.push(tokio::spawn(admin::serve(
            addr,
            metrics.clone(),
            all_pools.clone(),
        )));
    }
    shutdown.await;
    // Stop accepting (the listeners close with their tasks), then drain.
    for t in &tasks {
        t.abort();
    }
    tracing::info!("draining");
    let deadline = Instant::now() + config.grace;
    while Instant::now() < deadline && all_pools.iter().any(|p| p.active_connections() > 0) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for p in &all_pools {
        p.shutdown();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_and_head_end() {
        let head = b"GET / HTTP/1.1\r\nHost: Example.com:8080\r\nX: y\r\n\r\nbody";
        assert_eq!(head_end(head), Some(head.len() - 4));
        assert_eq!(
            host_of(&head[..head.len() - 4]).as_deref(),
            Some("Example.com:8080")
        );
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a"), None);
        assert_eq!(host_of(b"GET / HTTP/1.0\r\n\r\n"), None);
    }
}
