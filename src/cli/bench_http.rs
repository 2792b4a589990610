//! `supermachine bench http`: a bounded HTTP load generator (hyper client, keep-alive;
//! `--h2`: HTTP/2 with prior knowledge).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::cli::EXIT_INTERNAL;

#[derive(Args)]
pub struct HttpArgs {
    /// The URL to GET (http:// only).
    url: String,
    /// Concurrent connections.
    #[arg(short = 'c', default_value_t = 8)]
    concurrency: usize,
    /// Seconds to run.
    #[arg(short = 'd', default_value_t = 10)]
    duration: u64,
    /// Speak HTTP/2 with prior knowledge (h2c; every request a stream on the connections).
    #[arg(long)]
    h2: bool,
    /// Write the results as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

pub fn run(a: HttpArgs) -> i32 {
    let uri: hyper::Uri = match a.url.parse() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("supermachine: error: invalid URL {:?}: {e}", a.url);
            return EXIT_INTERNAL;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("supermachine: error: {e}");
            return EXIT_INTERNAL;
        }
    };
    let hist = Arc::new(Mutex::new(
        hdrhistogram::Histogram::<u64>::new(3).expect("histogram"),
    ));
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(a.duration);
    let started = Instant::now();
    rt.block_on(async {
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .http2_only(a.h2)
            .build_http();
        let mut tasks = Vec::new();
        for _ in 0..a.concurrency.max(1) {
            let (client, uri, hist, errors) =
                (client.clone(), uri.clone(), hist.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let left = deadline.saturating_duration_since(t) + Duration::from_secs(5);
                    let res = tokio::time::timeout(left, async {
                        let resp = client
                            .get(uri.clone())
                            .await
                            .map_err(|e| format!("connect: {e}"))?;
                        let status = resp.status();
                        resp.into_body()
                            .collect()
                            .await
                            .map_err(|e| format!("body: {e}"))?;
                        if status.is_success() {
                            Ok(())
                        } else {
                            Err(format!("status_{}", status.as_u16()))
                        }
                    })
                    .await;
                    let kind = match res {
                        Ok(Ok(())) => {
                            if let Ok(mut h) = hist.lock() {
                                let _ = h.record(t.elapsed().as_micros() as u64);
                            }
                            continue;
                        }
                        Ok(Err(k)) => k.split(':').next().unwrap_or("error").to_string(),
                        Err(_) => "timeout".to_string(),
                    };
                    if let Ok(mut e) = errors.lock() {
                        *e.entry(kind).or_default() += 1;
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let h = hist
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| hdrhistogram::Histogram::new(3).expect("histogram"));
    let errors = errors.lock().map(|e| e.clone()).unwrap_or_default();
    crate::cli::bench::report_load(&h, &errors, secs, a.json.as_deref())
}
