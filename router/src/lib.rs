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
mod error;
mod h2;
mod metrics;
mod pool;
pub mod privileges;
pub mod sni;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

pub use error::RouterError;
pub use metrics::Metrics;
pub use pool::{ImagePool, Isolation, PoolConfig};
pub use supermachine_worker::PortProtocol;
pub use tls::TlsFiles;

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
    /// Certificates (PEM): when any is given, the HTTP listener speaks TLS (HTTPS), the
    /// certificate chosen by the client's SNI among them (the first when none covers it).
    pub tls: Vec<TlsFiles>,
    /// TLS passthrough: a listener whose connections are routed by the ClientHello's
    /// server name and passed on undecrypted (the guest terminates TLS).
    pub sni: Option<SniConfig>,
    pub pool: PoolConfig,
    /// How long SIGTERM waits for connections to finish.
    pub grace: Duration,
    /// Single image only: hand the listening socket to every worker, which accept on it
    /// themselves (no head parsing, no routing, no per-connection handoff).
    pub accept_in_workers: bool,
    /// Started as root: become this user once every listener is bound, before any worker
    /// starts (`serve --user`).
    pub user: Option<privileges::RunAs>,
}

impl RouterConfig {
    /// Every snapshot a pool of this router serves.
    fn snapshots(&self) -> Vec<PathBuf> {
        let mut s: Vec<PathBuf> = self.routes.iter().map(|r| r.snapshot.clone()).collect();
        s.extend(self.tcp.iter().map(|t| t.snapshot.clone()));
        if let Some(sni) = &self.sni {
            s.extend(sni.routes.iter().map(|r| r.snapshot.clone()));
        }
        s
    }

    /// `--user`'s drop, where asked for.
    fn drop_privileges(&self) -> Result<(), RouterError> {
        match &self.user {
            Some(u) => privileges::drop_to(u, &self.snapshots()),
            None => Ok(()),
        }
    }
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

async fn reply_and_close<S: AsyncWrite + Unpin>(s: S, status: &str) {
    let body = format!("{status}\n");
    let msg = format!("HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
    send_and_close(s, msg.as_bytes()).await;
}

/// Writes a whole response and closes the connection (a peer gone meanwhile is no error).
async fn send_and_close<S: AsyncWrite + Unpin>(mut s: S, response: &[u8]) {
    use tokio::io::AsyncWriteExt;
    let _ = s.write_all(response).await;
    let _ = s.shutdown().await;
}

/// What a client's first bytes were.
enum Head {
    /// An HTTP/1 request head: everything read so far (`bytes`, which may run past the
    /// head into the body) and which pool it is for.
    Http1 {
        bytes: Vec<u8>,
        pool: Arc<ImagePool>,
    },
    /// The HTTP/2 connection preface (h2c with prior knowledge), with what was read.
    H2c { bytes: Vec<u8> },
}

/// Reads the request head from `stream` and picks its pool; a client that is answered by
/// the router itself (too large, too slow, no route) or went away gets `None`.
async fn read_head<S: AsyncRead + AsyncWrite + Unpin>(
    router: &Router,
    stream: &mut S,
) -> Option<Head> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let head = loop {
        if let Some(end) = head_end(&buf[..len]) {
            break end;
        }
        if len == buf.len() {
            if buf.len() >= MAX_HEAD {
                router.metrics.rejected("head_too_large");
                reply_and_close(stream, "431 Request Header Fields Too Large").await;
                return None;
            }
            buf.resize(buf.len() * 2, 0);
        }
        match tokio::time::timeout(HEAD_TIMEOUT, stream.read(&mut buf[len..])).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => len += n,
            Err(_) => {
                router.metrics.rejected("head_timeout");
                reply_and_close(stream, "408 Request Timeout").await;
                return None;
            }
        }
    };
    buf.truncate(len);
    if buf.starts_with(&h2::PREFACE[..16]) {
        return Some(Head::H2c { bytes: buf });
    }
    let host = host_of(&buf[..head]);
    let Some(pool) = router.pick(host.as_deref()).cloned() else {
        router.metrics.rejected("no_route");
        reply_and_close(stream, "404 Not Found").await;
        return None;
    };
    Some(Head::Http1 { bytes: buf, pool })
}

/// Hands `client` (std, blocking) with `prefix` to a worker of `pool`. On failure the
/// client is returned (when the pool still has it), non-blocking again, for the router's
/// 502.
async fn hand_off(
    metrics: &Metrics,
    pool: Arc<ImagePool>,
    client: std::net::TcpStream,
    prefix: Vec<u8>,
    accepted: Instant,
) -> Result<(), Option<std::net::TcpStream>> {
    let _ = client.set_nonblocking(false);
    match tokio::task::spawn_blocking(move || pool.handoff(client, &prefix)).await {
        Ok(Ok(())) => {
            metrics.handed_off(accepted.elapsed());
            Ok(())
        }
        Ok(Err((e, stream))) => {
            tracing::warn!(error = %e, "no worker could take the connection");
            metrics.rejected("no_worker");
            // Back to non-blocking: the caller gives it to tokio again (for the 502), and
            // tokio refuses a blocking socket.
            if let Some(s) = &stream {
                let _ = s.set_nonblocking(true);
            }
            Err(stream)
        }
        Err(_) => {
            metrics.rejected("internal");
            Err(None)
        }
    }
}

/// Why [`hand_off_pair`] could not give the router its end.
enum PairError {
    /// No socketpair (counted as rejected{reason="internal"}).
    Socketpair,
    /// No worker took the other end (counted by [`hand_off`]).
    NoWorker,
}

/// For the fronts that stay in the data path (TLS, HTTP/2): a socketpair whose one end
/// goes, with `prefix`, to a worker of `pool`; the router's end comes back, non-blocking.
async fn hand_off_pair(
    metrics: &Metrics,
    pool: Arc<ImagePool>,
    prefix: Vec<u8>,
    accepted: Instant,
) -> Result<std::os::unix::net::UnixStream, PairError> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| {
        tracing::warn!(error = %e, "socketpair for a connection the router terminates");
        metrics.rejected("internal");
        PairError::Socketpair
    })?;
    // The worker bridges any stream socket; it only reads, writes and shuts it down.
    let theirs = std::net::TcpStream::from(std::os::fd::OwnedFd::from(theirs));
    hand_off(metrics, pool, theirs, prefix, accepted)
        .await
        .map_err(|_| PairError::NoWorker)?;
    let _ = ours.set_nonblocking(true);
    Ok(ours)
}

async fn handle(router: Arc<Router>, mut stream: TcpStream) {
    let accepted = Instant::now();
    let _ = stream.set_nodelay(true);
    let (bytes, pool) = match read_head(&router, &mut stream).await {
        None => return,
        Some(Head::H2c { bytes }) => {
            return h2::serve(router, h2::Rewind::new(bytes, stream)).await
        }
        Some(Head::Http1 { bytes, pool }) => (bytes, pool),
    };
    let Ok(std_stream) = stream.into_std() else {
        return;
    };
    // Everything read so far (head and any body bytes) goes to the worker first.
    if let Err(Some(s)) = hand_off(&router.metrics, pool, std_stream, bytes, accepted).await {
        if let Ok(s) = TcpStream::from_std(s) {
            send_and_close(s, supermachine_worker::BAD_GATEWAY).await;
        }
    }
}

/// An HTTPS client: the TLS handshake (certificate by SNI), then the decrypted head is
/// routed as plain HTTP. The worker gets one end of a socketpair and the router copies
/// between it and the TLS stream, so it stays in the data path (the keys are here).
async fn handle_tls(router: Arc<Router>, acceptor: tokio_rustls::TlsAcceptor, stream: TcpStream) {
    let accepted = Instant::now();
    let _ = stream.set_nodelay(true);
    let mut tls = match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(t)) => t,
        _ => {
            router.metrics.rejected("tls_handshake");
            return;
        }
    };
    if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
        return h2::serve(router, tls).await;
    }
    let (bytes, pool) = match read_head(&router, &mut tls).await {
        None => return,
        Some(Head::H2c { bytes }) => return h2::serve(router, h2::Rewind::new(bytes, tls)).await,
        Some(Head::Http1 { bytes, pool }) => (bytes, pool),
    };
    let ours = match hand_off_pair(&router.metrics, pool, bytes, accepted).await {
        Ok(s) => s,
        Err(PairError::Socketpair) => {
            return reply_and_close(&mut tls, "500 Internal Server Error").await
        }
        Err(PairError::NoWorker) => {
            return send_and_close(&mut tls, supermachine_worker::BAD_GATEWAY).await
        }
    };
    let Ok(mut ours) = tokio::net::UnixStream::from_std(ours) else {
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut ours).await;
}

/// A TCP (L4) route: every connection to `listen` goes, untouched, to the snapshot's port.
#[derive(Debug, Clone)]
pub struct TcpRoute {
    pub listen: SocketAddr,
    pub snapshot: PathBuf,
}

/// TLS passthrough routes on one listener.
#[derive(Debug, Clone)]
pub struct SniConfig {
    pub listen: SocketAddr,
    pub routes: Vec<SniRoute>,
}

/// Connections whose ClientHello names `name` (`*`: any other) go to the snapshot's port.
#[derive(Debug, Clone)]
pub struct SniRoute {
    pub name: String,
    pub snapshot: PathBuf,
}

/// A TLS client routed by SNI: reads until the ClientHello is complete (nothing is sent
/// back), picks the pool by its server name, and hands the connection off with those
/// bytes as the prefix — the guest's TLS server sees the handshake untouched. Not TLS, no
/// route, too slow: closed with nothing written.
async fn handle_sni(
    routes: Arc<Vec<(String, Arc<ImagePool>)>>,
    metrics: Arc<Metrics>,
    mut stream: TcpStream,
) {
    let accepted = Instant::now();
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    let name = loop {
        match sni::client_hello_sni(&buf[..len]) {
            Ok(sni::Hello::Complete(name)) => break name,
            Ok(sni::Hello::Incomplete) => {}
            Err(sni::NotTls(why)) => {
                tracing::debug!(why, "not a routable ClientHello");
                return metrics.rejected("sni_not_tls");
            }
        }
        if len == buf.len() {
            if buf.len() >= sni::MAX_HELLO + 1024 {
                return metrics.rejected("sni_not_tls");
            }
            buf.resize(buf.len() * 2, 0);
        }
        match tokio::time::timeout(HEAD_TIMEOUT, stream.read(&mut buf[len..])).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => len += n,
            Err(_) => return metrics.rejected("sni_timeout"),
        }
    };
    let pool = routes
        .iter()
        .find(|(n, _)| Some(n.as_str()) == name.as_deref())
        .or_else(|| routes.iter().find(|(n, _)| n == "*"))
        .map(|(_, p)| p.clone());
    let Some(pool) = pool else {
        return metrics.rejected("sni_no_route");
    };
    let Ok(std_stream) = stream.into_std() else {
        return;
    };
    buf.truncate(len);
    // A failure leaves the client to the close (protocol tcp: no byte written).
    let _ = hand_off(&metrics, pool, std_stream, buf, accepted).await;
}

/// Hands one raw TCP connection to a worker: no byte is read, and one that cannot be
/// served is closed with nothing written (anything would be the protocol's first bytes).
async fn handle_tcp(pool: Arc<ImagePool>, metrics: Arc<Metrics>, stream: TcpStream) {
    let accepted = Instant::now();
    let _ = stream.set_nodelay(true);
    let Ok(std_stream) = stream.into_std() else {
        return;
    };
    // A failure leaves the client to the close: nothing is written.
    let _ = hand_off(&metrics, pool, std_stream, Vec::new(), accepted).await;
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

async fn bind(addr: SocketAddr) -> Result<TcpListener, RouterError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RouterError::Listen { addr, source })
}

/// Waits for `shutdown`, or for a pool that cannot start any worker (its error).
async fn until_shutdown_or_unable(
    shutdown: impl std::future::Future<Output = ()>,
    pools: &[Arc<ImagePool>],
) -> Result<(), RouterError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1);
    let watchers: Vec<_> = pools
        .iter()
        .map(|p| {
            let (p, tx) = (p.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tx.send(p.unable_to_start().await).await;
            })
        })
        .collect();
    drop(tx);
    let outcome = tokio::select! {
        _ = shutdown => Ok(()),
        Some(e) = rx.recv() => Err(RouterError::Unstartable(e)),
    };
    for w in watchers {
        w.abort();
    }
    outcome
}

/// Runs the router until `shutdown` resolves, then drains (bounded by `grace`) and stops
/// every worker; or, once a pool has failed to start its first worker three times in a
/// row, stops every worker and returns that error.
pub async fn serve(
    config: RouterConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RouterError> {
    let metrics = Arc::new(Metrics::default());
    if config.accept_in_workers {
        let listen = match (config.listen, config.routes.len(), config.pool.isolation) {
            (Some(l), 1, Isolation::Shared) if config.tcp.is_empty() && config.tls.is_empty() && config.sni.is_none() => l,
            _ => {
                return Err(RouterError::Config(
                    "--accept-in-workers needs exactly one image, a plain HTTP listener (no TLS), no TCP routes and shared isolation".into(),
                ))
            }
        };
        let listener =
            std::net::TcpListener::bind(listen).map_err(|source| RouterError::Listen {
                addr: listen,
                source,
            })?;
        let admin = match config.admin {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        config.drop_privileges()?;
        let pool = ImagePool::start_accepting(
            config.routes[0].snapshot.clone(),
            config.pool.clone(),
            PortProtocol::Http,
            metrics.clone(),
            listener,
        )?;
        let admin_task =
            admin.map(|l| tokio::spawn(admin::serve(l, metrics.clone(), vec![pool.clone()])));
        tracing::info!(listen = %listen, "workers accept on the shared listener");
        let outcome = until_shutdown_or_unable(shutdown, std::slice::from_ref(&pool)).await;
        pool.shutdown();
        if let Some(t) = admin_task {
            t.abort();
        }
        return outcome;
    }
    if config.listen.is_none() && !config.routes.is_empty() {
        return Err(RouterError::Config(
            "HTTP routes need an HTTP listening address".into(),
        ));
    }
    if config.routes.is_empty() && config.tcp.is_empty() && config.sni.is_none() {
        return Err(RouterError::Config(
            "nothing to serve: no HTTP, TCP or SNI route".into(),
        ));
    }
    // Every listener first: a port in use fails before any VM starts, and `--user` binds
    // privileged ports as root, then drops before the first worker.
    let http = match config.listen.filter(|_| !config.routes.is_empty()) {
        Some(l) => Some((l, bind(l).await?)),
        None => None,
    };
    let mut tcp_listeners = Vec::new();
    for t in &config.tcp {
        tcp_listeners.push(bind(t.listen).await?);
    }
    let sni_listener = match &config.sni {
        Some(sni) => Some(bind(sni.listen).await?),
        None => None,
    };
    let admin_listener = match config.admin {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    config.drop_privileges()?;
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
    if let Some((listen, listener)) = http {
        let r = router.clone();
        if config.tls.is_empty() {
            tracing::info!(listen = %listen, mode = "http", "router listening");
            tasks.push(tokio::spawn(accept_loop(
                listener,
                "http",
                metrics.clone(),
                move |s| handle(r.clone(), s),
            )));
        } else {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&config.tls)?);
            tracing::info!(listen = %listen, mode = "https", "router listening");
            tasks.push(tokio::spawn(accept_loop(
                listener,
                "https",
                metrics.clone(),
                move |s| handle_tls(r.clone(), acceptor.clone(), s),
            )));
        }
    }
    for (t, listener) in config.tcp.iter().zip(tcp_listeners) {
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
    if let (Some(sni), Some(listener)) = (&config.sni, sni_listener) {
        let mut routes = Vec::new();
        for r in &sni.routes {
            let pool = ImagePool::start(
                r.snapshot.clone(),
                config.pool.clone(),
                PortProtocol::Tcp,
                metrics.clone(),
            )?;
            all_pools.push(pool.clone());
            routes.push((r.name.to_ascii_lowercase(), pool));
        }
        tracing::info!(listen = %sni.listen, mode = "tls-passthrough", "router listening");
        let (routes, m) = (Arc::new(routes), metrics.clone());
        tasks.push(tokio::spawn(accept_loop(
            listener,
            "tls-passthrough",
            metrics.clone(),
            move |s| handle_sni(routes.clone(), m.clone(), s),
        )));
    }
    if let Some(listener) = admin_listener {
        tasks.push(tokio::spawn(admin::serve(
            listener,
            metrics.clone(),
            all_pools.clone(),
        )));
    }
    if let Err(e) = until_shutdown_or_unable(shutdown, &all_pools).await {
        for t in &tasks {
            t.abort();
        }
        for p in &all_pools {
            p.shutdown();
        }
        return Err(e);
    }
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
