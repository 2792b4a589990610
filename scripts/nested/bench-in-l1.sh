#!/usr/bin/env bash
# Runs inside L1 (scripts/bench-nested.sh): the same measurements for our kvm backend and
# for the qemu backend with `-accel kvm`, on the same nested KVM, one after the other.
# Writes JSON files to $NESTED_OUT/<backend>-*.json.
#   bench-in-l1.sh SM IMAGES N_RESTORES ALIVE HTTP_SECONDS
set -euo pipefail
sm="$1" images="$2" n="$3" alive="$4" secs="$5"
out="${NESTED_OUT:?}"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ms_since() { python3 -c "import time,sys; print(round((time.time()-float(sys.argv[1]))*1000,1))" "$1"; }

for backend in kvm qemu; do
  echo "bench: --- $backend ---"
  export SUPERMACHINE_BACKEND="$backend" SUPERMACHINE_SNAPSHOTS="/tmp/bench-snaps-$backend"
  [ "$backend" = qemu ] && export SUPERMACHINE_ACCEL=kvm
  for i in 1 2 3; do
    "$sm" boot --timings-json "$out/$backend-boot$i.json" "oci-layout:$images/busybox" -- true
  done
  t0=$(date +%s.%N)
  "$sm" pull --name web --port 80 --cmd '["httpd","-f","-p","80","-h","/var/www"]' \
    "oci-layout:$images/busybox" >/dev/null
  echo "{\"bake_ms\": $(ms_since "$t0")}" >"$out/$backend-bake.json"
  "$sm" bench restore web -n "$n" --alive "$alive" --json "$out/$backend-restore.json"
  for iso in shared fresh; do
    port=$(free_port)
    admin=$(free_port)
    "$sm" serve --image web --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" \
      --min 2 --max 2 --isolation "$iso" 2>"/tmp/serve-$backend-$iso.log" &
    serve=$!
    for _ in $(seq 1 600); do
      curl -fsS -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null && break
      sleep 0.2
    done
    "$sm" bench http "http://127.0.0.1:$port/" -c 4 -d "$secs" --json "$out/$backend-http-$iso.json"
    kill -TERM "$serve"
    wait "$serve" || true
  done
  unset SUPERMACHINE_ACCEL
done
