#!/usr/bin/env bash
# Port protocols, one run. The same busybox httpd snapshot behind the three front doors of
# `supermachine serve`, loaded by ApacheBench (`ab`, HTTP/1.0, a new connection per request
# since busybox httpd closes after each response — so every request pays accept + handoff):
#   1. --tcp-port           (tcp: bytes untouched, no parsing)
#   2. --image              (http: the router reads the head, routes by Host)
#   3. --image --tls-cert   (TLS terminated by the router, then as 2; the router copies)
# then HTTP/1.1 keep-alive vs h2c (`supermachine bench http` vs `bench http --h2`) against
# --image, and redis through --tcp-port vs the same redis-server natively, with
# `supermachine bench tcp` (RESP PING/+PONG on C kept-open connections).
# Prints a markdown table. Usage: scripts/bench-ports.sh [C] [D]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
c="${1:-8}"; d="${2:-10}"
cd "$root"
cargo build --quiet --release --workspace --bins
sm="$root/target/release/supermachine"
images="$(python3 scripts/make-test-images.py)"
work="$(mktemp -d)"
export SUPERMACHINE_SNAPSHOTS="$work/snapshots"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_tcp() { for _ in $(seq 600); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$1),2).close()" 2>/dev/null && return 0; sleep 0.2; done; echo "port $1 never opened" >&2; return 1; }
stop_last() { kill -TERM "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; }

"$sm" pull --name web --port 80 --cmd '["httpd","-f","-p","80","-h","/var/www"]' "oci-layout:$images/busybox" >/dev/null 2>&1
"$sm" pull --name redis --port 6379 "oci-layout:$images/redis" >/dev/null 2>&1
# A throwaway certificate for 127.0.0.1 (ab does not verify it).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$work/key.pem" \
  -out "$work/cert.pem" -subj /CN=bench.test -addext subjectAltName=IP:127.0.0.1 -days 2 2>/dev/null

ab_row() { # label url
  ab -q -c "$c" -t "$d" -n 10000000 -r "$2" >"$work/ab.txt" 2>&1 || true
  python3 - "$1" "$work/ab.txt" <<'PY'
import re, sys
t = open(sys.argv[2]).read()
def num(pat):
    m = re.search(pat, t, re.M)
    return float(m.group(1)) if m else float("nan")
rps = num(r"^Requests per second:\s+([\d.]+)")
p50, p99 = num(r"^\s+50%\s+(\d+)"), num(r"^\s+99%\s+(\d+)")
errs = int(num(r"^Failed requests:\s+(\d+)") or 0) + int(num(r"^Non-2xx responses:\s+(\d+)") if "Non-2xx" in t else 0)
print(f"| {sys.argv[1]} | {rps:.1f} | {p50:.0f} | {p99:.0f} | {errs} |")
PY
}
tcp_row() { # label port
  "$sm" bench tcp "127.0.0.1:$2" -c "$c" -d "$d" --json "$work/tcp.json" >/dev/null
  python3 - "$1" "$work/tcp.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2])); l = r["latency_ms"]
print(f"| {sys.argv[1]} | {r['rps']:.1f} | {l['p50']:.2f} | {l['p99']:.2f} | {sum(r['errors'].values())} |")
PY
}

echo "| front door (c=$c, ${d}s; ab: new connection per request) | req/s | p50 ms | p99 ms | errors |"
echo "|---|---|---|---|---|"
p="$(free_port)"
"$sm" serve --tcp-port "127.0.0.1:$p=web:80" --min 1 --max 1 2>/dev/null & pids+=($!)
wait_tcp "$p"; sleep 2
ab_row "httpd via --tcp-port (tcp passthrough)" "http://127.0.0.1:$p/"
stop_last
p="$(free_port)"
"$sm" serve --image web --listen "127.0.0.1:$p" --min 1 --max 1 2>/dev/null & pids+=($!)
wait_tcp "$p"; sleep 2
ab_row "httpd via --image (http routing)" "http://127.0.0.1:$p/"
stop_last
p="$(free_port)"
"$sm" serve --image web --listen "127.0.0.1:$p" --tls-cert "$work/cert.pem" --tls-key "$work/key.pem" \
  --min 1 --max 1 2>/dev/null & pids+=($!)
wait_tcp "$p"; sleep 2
ab_row "httpd via --image --tls-cert (TLS terminated)" "https://127.0.0.1:$p/"
stop_last
echo
echo "| HTTP/1.1 vs HTTP/2 to --image (c=$c, ${d}s, bench http) | req/s | p50 ms | p99 ms | errors |"
echo "|---|---|---|---|---|"
p="$(free_port)"
"$sm" serve --image web --listen "127.0.0.1:$p" --min 1 --max 1 2>/dev/null & pids+=($!)
wait_tcp "$p"; sleep 2
http_row() { # label flags...
  local label="$1"; shift
  "$sm" bench http "http://127.0.0.1:$p/" -c "$c" -d "$d" --json "$work/http.json" "$@" >/dev/null
  python3 - "$label" "$work/http.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2])); l = r["latency_ms"]
print(f"| {sys.argv[1]} | {r['rps']:.1f} | {l['p50']:.1f} | {l['p99']:.1f} | {sum(r['errors'].values())} |")
PY
}
http_row "HTTP/1.1 (a handoff per connection)"
http_row "h2c, --h2 (a handoff per stream)" --h2
stop_last
echo
echo "| redis PING (c=$c, ${d}s, kept-open connections) | req/s | p50 ms | p99 ms | errors |"
echo "|---|---|---|---|---|"
p="$(free_port)"
"$sm" serve --tcp-port "127.0.0.1:$p=redis:6379" --min 1 --max 1 2>/dev/null & pids+=($!)
wait_tcp "$p"; sleep 2
tcp_row "redis in a VM via --tcp-port" "$p"
stop_last
p="$(free_port)"
redis_bin="$(command -v redis-check-rdb)"
ln -sf "$redis_bin" "$work/redis-server"
"$work/redis-server" --port "$p" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 & pids+=($!)
wait_tcp "$p"
tcp_row "redis natively on the host (no VM)" "$p"
