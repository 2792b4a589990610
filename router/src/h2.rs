//! HTTP/2 at the ingress: h2 over TLS (ALPN) and h2c with prior knowledge on the plain
//! listener. The router terminates HTTP/2 (hyper) and hands each *stream* to a VM as an
//! HTTP/1.1 request on a connection of its own: streams of one connection may be for
//! different hosts (browsers coalesce connections), the guest speaks HTTP/1.1, which
//! carries one request at a time per connection, and per-stream handoff lets the shared
//! pool balance streams like connections. The router stays in the data path (it converts
//! frames to HTTP/1.1 and back).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, HOST, TRANSFER_ENCODING, UPGRADE};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{hand_off_pair, PairError, Router};

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

type Body = BoxBody<Bytes, hyper::Error>;

/// Serves one HTTP/2 connection until the client closes it.
pub async fn serve<S>(router: Arc<Router>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let r = router.clone();
        async move { Ok::<_, Infallible>(forward(r, req).await) }
    });
    if let Err(e) = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), svc)
        .await
    {
        tracing::debug!(error = %e, "HTTP/2 connection ended");
    }
}

fn text(status: StatusCode) -> Response<Body> {
    let body = format!("{status}\n");
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

/// One stream: routed by its :authority, sent to a worker as HTTP/1.1, answered back.
async fn forward(router: Arc<Router>, mut req: Request<Incoming>) -> Response<Body> {
    let accepted = Instant::now();
    let authority = req.uri().authority().map(|a| a.to_string()).or_else(|| {
        req.headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(String::from)
    });
    let Some(pool) = router.pick(authority.as_deref()).cloned() else {
        router.metrics.rejected("no_route");
        return text(StatusCode::NOT_FOUND);
    };
    let ours = match hand_off_pair(&router.metrics, pool, Vec::new(), accepted).await {
        Ok(s) => s,
        Err(PairError::Socketpair) => return text(StatusCode::INTERNAL_SERVER_ERROR),
        Err(PairError::NoWorker) => return text(StatusCode::BAD_GATEWAY),
    };
    let Ok(ours) = tokio::net::UnixStream::from_std(ours) else {
        return text(StatusCode::BAD_GATEWAY);
    };
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(ours)).await {
            Ok(c) => c,
            Err(_) => return text(StatusCode::BAD_GATEWAY),
        };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    // HTTP/1.1 to the guest: origin-form target, a Host header.
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    *req.uri_mut() = target.parse().unwrap_or_default();
    *req.version_mut() = Version::HTTP_11;
    if let Some(a) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
        req.headers_mut().insert(HOST, a);
    }
    match sender.send_request(req).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            // Connection-specific headers have no place in HTTP/2 (RFC 9113 8.2.2).
            for h in [CONNECTION, TRANSFER_ENCODING, UPGRADE] {
                parts.headers.remove(h);
            }
            parts.headers.remove("keep-alive");
            parts.headers.remove("proxy-connection");
            parts.version = Version::HTTP_2;
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => {
            tracing::debug!(error = %e, "the guest's HTTP/1.1 answer");
            text(StatusCode::BAD_GATEWAY)
        }
    }
}

/// A stream whose first bytes were already read: they are read again first.
pub struct Rewind<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Rewind {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
