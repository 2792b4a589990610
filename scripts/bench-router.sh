#!/usr/bin/env bash
# Router overhead, one run: `supermachine bench http` (C connections, D seconds) against
#   1. serve --isolation shared, 1 VM and 4 VMs (router -> worker handoff -> VM)
#   2. serve --isolation fresh, 4 spares (a restored VM per connection)
#   2b. serve --accept-in-workers, 1 VM (the worker accepts on the listener itself)
#   3. one VM directly: boot -p   (Vm::expose_tcp forwarder, no router)
#   4. the same busybox httpd natively on the host (no VM)
# Prints a markdown table. Usage: scripts/bench-router.sh [C] [D]
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
wait_up() { for _ in $(seq 600); do python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$1/', timeout=5)" 2>/dev/null && return 0; sleep 0.2; done; echo "port $1 never answered" >&2; return 1; }
"$sm" pull --name web --port 80 --cmd '["httpd","-f","-p","80","-h","/var/www"]' "oci-layout:$images/busybox" >/dev/null 2>&1

run() { # label port
  "$sm" bench http "http://127.0.0.1:$2/" -c "$c" -d "$d" --json "$work/$1.json" >/dev/null
  python3 - "$1" "$work/$1.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2])); l = r["latency_ms"]
errs = sum(r["errors"].values())
print(f"| {sys.argv[1]} | {r['rps']:.1f} | {l['p50']:.1f} | {l['p90']:.1f} | {l['p99']:.1f} | {l['max']:.1f} | {errs} |")
PY
}
echo "| target (c=$c, ${d}s) | req/s | p50 ms | p90 ms | p99 ms | max ms | errors |"
echo "|---|---|---|---|---|---|---|"
for cfg in "shared 1" "shared 4" "fresh 4"; do
  set -- $cfg
  p="$(free_port)"
  "$sm" serve --image web --listen "127.0.0.1:$p" --isolation "$1" --min "$2" --max "$2" 2>/dev/null & pids+=($!)
  wait_up "$p"; sleep 2
  run "serve --isolation $1 ($2 VMs)" "$p"
  kill -TERM "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
done
p="$(free_port)"
"$sm" serve --image web --listen "127.0.0.1:$p" --accept-in-workers --min 1 --max 1 2>/dev/null & pids+=($!)
wait_up "$p"; sleep 2
run "serve --accept-in-workers (1 VM)" "$p"
kill -TERM "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
p="$(free_port)"
"$sm" boot -p "$p:80" "oci-layout:$images/busybox" -- httpd -f -p 80 -h /var/www >/dev/null 2>&1 & pids+=($!)
wait_up "$p"
run "one VM, boot -p (expose_tcp)" "$p"
kill -TERM "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
p="$(free_port)"
mkdir -p "$work/www" && printf '<h1>hello from supermachine</h1>\n' > "$work/www/index.html"
busybox httpd -f -p "127.0.0.1:$p" -h "$work/www" 2>/dev/null & pids+=($!)
wait_up "$p"
run "native busybox httpd (no VM)" "$p"
