//! `supermachine bench tcp`: a bounded request/reply load over raw TCP (redis-benchmark's
//! ping loop by default), for ports published as tcp, where no HTTP tool applies.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cli::EXIT_INTERNAL;

#[derive(Args)]
pub struct TcpArgs {
    /// Where to connect, HOST:PORT.
    addr: SocketAddr,
    /// Bytes each request sends (\r, \n, \t, \\ and \xHH escapes); default RESP PING.
    #[arg(long, default_value = "*1\\r\\n$4\\r\\nPING\\r\\n")]
    send: String,
    /// The reply each request must read back, byte for byte; default RESP +PONG.
    #[arg(long, default_value = "+PONG\\r\\n")]
    expect: String,
    /// Concurrent connections.
    #[arg(short = 'c', default_value_t = 8)]
    concurrency: usize,
    /// Seconds to run.
    #[arg(short = 'd', default_value_t = 10)]
    duration: u64,
    /// A new connection for every request (measures connect + handoff too).
    #[arg(long)]
    new_connection: bool,
    /// Write the results as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// `\r\n`-style escapes -> bytes.
fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let next = *b
            .get(i + 1)
            .ok_or_else(|| format!("{s:?} ends in a lone backslash"))?;
        match next {
            b'r' => out.push(b'\r'),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'\\' => out.push(b'\\'),
            b'x' => {
                let hex = s
                    .get(i + 2..i + 4)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad \\x escape in {s:?}"))?;
                out.push(hex);
                i += 2;
            }
            other => return Err(format!("unknown escape \\{} in {s:?}", other as char)),
        }
        i += 2;
    }
    Ok(out)
}

/// One request/reply on `s`; Err names the failure kind.
async fn exchange(s: &mut TcpStream, send: &[u8], expect: &[u8]) -> Result<(), &'static str> {
    s.write_all(send).await.map_err(|_| "write")?;
    let mut got = vec![0u8; expect.len()];
    s.read_exact(&mut got).await.map_err(|_| "read")?;
    if got != expect {
        return Err("unexpected_reply");
    }
    Ok(())
}

pub fn run(a: TcpArgs) -> i32 {
    let (send, expect) = match (unescape(&a.send), unescape(&a.expect)) {
        (Ok(s), Ok(e)) if !e.is_empty() => (s, e),
        (Err(e), _) => return fail(format!("--send: {e}")),
        (_, Err(e)) => return fail(format!("--expect: {e}")),
        _ => return fail("--expect must not be empty"),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    let hist = Arc::new(Mutex::new(
        hdrhistogram::Histogram::<u64>::new(3).expect("histogram"),
    ));
    let errors: Arc<Mutex<BTreeMap<&'static str, u64>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(a.duration);
    let started = Instant::now();
    let (send, expect) = (Arc::new(send), Arc::new(expect));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..a.concurrency.max(1) {
            let (hist, errors, send, expect) =
                (hist.clone(), errors.clone(), send.clone(), expect.clone());
            let (addr, fresh) = (a.addr, a.new_connection);
            tasks.push(tokio::spawn(async move {
                let mut conn: Option<TcpStream> = None;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let left = deadline.saturating_duration_since(t) + Duration::from_secs(5);
                    let res = tokio::time::timeout(left, async {
                        if conn.is_none() {
                            let s = TcpStream::connect(addr).await.map_err(|_| "connect")?;
                            let _ = s.set_nodelay(true);
                            conn = Some(s);
                        }
                        let s = conn.as_mut().ok_or("connect")?;
                        exchange(s, &send, &expect).await
                    })
                    .await
                    .unwrap_or(Err("timeout"));
                    match res {
                        Ok(()) => {
                            if let Ok(mut h) = hist.lock() {
                                let _ = h.record(t.elapsed().as_micros() as u64);
                            }
                            if fresh {
                                conn = None;
                            }
                        }
                        Err(kind) => {
                            conn = None;
                            if let Ok(mut e) = errors.lock() {
                                *e.entry(kind).or_default() += 1;
                            }
                        }
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
    let errors = errors
        .lock()
        .map(|e| e.iter().map(|(k, v)| (k.to_string(), *v)).collect())
        .unwrap_or_default();
    let code = crate::cli::bench::report_load(&h, &errors, secs, a.json.as_deref());
    if code == 0 && h.is_empty() {
        return fail("no request succeeded");
    }
    code
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    eprintln!("supermachine: error: {msg}");
    EXIT_INTERNAL
}

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn escapes() {
        assert_eq!(
            unescape("*1\\r\\n$4\\r\\nPING\\r\\n").unwrap(),
            b"*1\r\n$4\r\nPING\r\n"
        );
        assert_eq!(unescape("a\\x00\\\\").unwrap(), b"a\x00\\");
        assert!(unescape("x\\").is_err());
        assert!(unescape("\\q").is_err());
        assert!(unescape("\\xZZ").is_err());
    }
}
