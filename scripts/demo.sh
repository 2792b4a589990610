#!/usr/bin/env bash
# The main job: set up, build, bake the demo image (busybox httpd) into a snapshot, serve it
# through the router (VMs restored copy-on-write in worker processes), answer a request,
# stop. Prints the response and the router's metrics.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/setup.sh"
cargo build --quiet --release --workspace --bins
sm="$root/target/release/supermachine"
images="$(python3 "$root/scripts/make-test-images.py")"
export SUPERMACHINE_SNAPSHOTS="${SUPERMACHINE_SNAPSHOTS:-$HOME/.local/share/supermachine/snapshots}"
"$sm" pull --name demo --port 80 --cmd '["httpd","-f","-p","80","-h","/var/www"]' "oci-layout:$images/busybox" >/dev/null
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
admin="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
"$sm" serve --image demo --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" --min 1 &
serve_pid=$!
trap 'kill -TERM $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null || true' EXIT
python3 - "$port" "$admin" <<'PY'
import sys, time, urllib.request
port, admin = sys.argv[1], sys.argv[2]
deadline = time.time() + 120
while True:
    try:
        t = time.time()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        break
    except Exception as e:
        if time.time() > deadline:
            sys.exit(f"demo: no answer from the router: {e}")
        time.sleep(0.2)
print(f"GET http://127.0.0.1:{port}/ -> {body.strip()}  ({(time.time()-t)*1000:.0f} ms)")
m = urllib.request.urlopen(f"http://127.0.0.1:{admin}/_supermachine/metrics", timeout=10).read().decode()
print("\n".join(l for l in m.splitlines() if l.startswith(("supermachine_connections_total", "supermachine_restores_total", "supermachine_workers{"))))
PY
