//! Router counters and histograms, rendered as Prometheus text.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Bucket upper bounds in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[derive(Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub restores: AtomicU64,
    pub worker_crashes: AtomicU64,
    /// Of those, workers killed by their seccomp filter (SIGSYS).
    pub seccomp_kills: AtomicU64,
    pub handoff_latency: Histogram,
    pub restore_latency: Histogram,
    rejected: Mutex<BTreeMap<String, u64>>,
    /// First-response status codes of closed connections, as the workers saw them.
    responses: Mutex<BTreeMap<String, u64>>,
    /// Connections accepted, by listening address and the port's mode (tcp, http).
    accepted: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl Metrics {
    pub fn handed_off(&self, latency: Duration) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.handoff_latency.observe(latency);
    }

    pub fn accepted(&self, listen: &str, mode: &'static str) {
        if let Ok(mut m) = self.accepted.lock() {
            *m.entry((listen.to_string(), mode)).or_default() += 1;
        }
    }

    pub fn rejected(&self, reason: &str) {
        if let Ok(mut m) = self.rejected.lock() {
            *m.entry(reason.to_string()).or_default() += 1;
        }
    }

    pub fn response(&self, status: Option<u16>) {
        let key = status.map_or("none".to_string(), |s| s.to_string());
        if let Ok(mut m) = self.responses.lock() {
            *m.entry(key).or_default() += 1;
        }
    }

    pub fn restored(&self, latency: Duration) {
        self.restores.fetch_add(1, Ordering::Relaxed);
        self.restore_latency.observe(latency);
    }

    /// Prometheus text exposition; `workers` is (state, count) per state.
    pub fn render(&self, workers: &[(&str, usize)]) -> String {
        let mut o = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            "supermachine_connections_total",
            "Connections handed off to workers.",
            self.connections.load(Ordering::Relaxed),
        );
        counter(
            "supermachine_restores_total",
            "VMs restored from snapshots.",
            self.restores.load(Ordering::Relaxed),
        );
        counter(
            "supermachine_worker_crashes_total",
            "Workers that died unexpectedly.",
            self.worker_crashes.load(Ordering::Relaxed),
        );
        counter(
            "supermachine_worker_seccomp_kills_total",
            "Workers killed by their seccomp filter (a syscall outside it: SIGSYS).",
            self.seccomp_kills.load(Ordering::Relaxed),
        );
        let _ = writeln!(o, "# HELP supermachine_accepted_total Connections accepted, by listening address and mode (tcp: bytes untouched; http: routed by the request head).\n# TYPE supermachine_accepted_total counter");
        if let Ok(m) = self.accepted.lock() {
            for ((listen, mode), v) in m.iter() {
                let _ = writeln!(
                    o,
                    "supermachine_accepted_total{{listen=\"{listen}\",mode=\"{mode}\"}} {v}"
                );
            }
        }
        let _ = writeln!(o, "# HELP supermachine_rejected_total Connections the router answered itself, by reason.\n# TYPE supermachine_rejected_total counter");
        if let Ok(m) = self.rejected.lock() {
            for (k, v) in m.iter() {
                let _ = writeln!(o, "supermachine_rejected_total{{reason=\"{k}\"}} {v}");
            }
        }
        let _ = writeln!(o, "# HELP supermachine_responses_total Closed connections by the status code of their first response.\n# TYPE supermachine_responses_total counter");
        if let Ok(m) = self.responses.lock() {
            for (k, v) in m.iter() {
                let _ = writeln!(o, "supermachine_responses_total{{code=\"{k}\"}} {v}");
            }
        }
        let _ = writeln!(
            o,
            "# HELP supermachine_workers Workers by state.\n# TYPE supermachine_workers gauge"
        );
        for (state, n) in workers {
            let _ = writeln!(o, "supermachine_workers{{state=\"{state}\"}} {n}");
        }
        self.handoff_latency.render(
            "supermachine_handoff_seconds",
            "Accept to handoff (router latency).",
            &mut o,
        );
        self.restore_latency.render(
            "supermachine_restore_seconds",
            "Restore request to ready.",
            &mut o,
        );
        o
    }
}
