//! `/_supermachine/health` and `/_supermachine/metrics` on the admin address.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::metrics::Metrics;
use super::pool::ImagePool;

pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    pools: Vec<Arc<ImagePool>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (metrics, pools) = (metrics.clone(), pools.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (metrics, pools) = (metrics.clone(), pools.clone());
                async move { Ok::<_, Infallible>(route(req.uri().path(), &metrics, &pools)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn route(path: &str, metrics: &Metrics, pools: &[Arc<ImagePool>]) -> Response<Full<Bytes>> {
    let mut states: Vec<(&str, usize)> = Vec::new();
    for p in pools {
        for (s, n) in p.worker_states() {
            match states.iter_mut().find(|(k, _)| *k == s) {
                Some(e) => e.1 += n,
                None => states.push((s, n)),
            }
        }
    }
    let (status, ctype, body) = match path {
        "/_supermachine/health" => {
            let serving: usize = states
                .iter()
                .filter(|(s, _)| *s == "serving" || *s == "ready")
                .map(|(_, n)| n)
                .sum();
            let body = serde_json::json!({ "status": "ok", "workers": serving }).to_string();
            (StatusCode::OK, "application/json", body)
        }
        "/_supermachine/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(&states),
        ),
        "/_supermachine/agents" => {
            let agents: Vec<String> = pools
                .iter()
                .flat_map(|p| p.agent_endpoints())
                .map(|a| a.to_string())
                .collect();
            (
                StatusCode::OK,
                "application/json",
                serde_json::json!({ "agents": agents }).to_string(),
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}
