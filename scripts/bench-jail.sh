#!/usr/bin/env bash
# What the worker jail costs on the restore path, one run: `supermachine bench restore`
# (N sequential restores of prepared workers, then ALIVE at once for PSS) with the jail on
# (the default) and with --no-jail, same snapshot. Prints a markdown table.
# Usage: scripts/bench-jail.sh [N] [ALIVE]
# In the nested L1 (kvm backend), with the release build made on the host:
#   scripts/nested.sh --vcpus 2 --memory 6144 --timeout 1500 -- \
#     env SUPERMACHINE_BENCH_NO_BUILD=1 scripts/bench-jail.sh 10 4
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
n="${1:-20}"; alive="${2:-8}"
cd "$root"
[ -n "${SUPERMACHINE_BENCH_NO_BUILD:-}" ] || cargo build --quiet --release --workspace --bins
sm="$root/target/release/supermachine"
images="$(python3 scripts/make-test-images.py)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export SUPERMACHINE_SNAPSHOTS="$work/snapshots"
"$sm" pull --name web --port 80 --cmd '["httpd","-f","-p","80","-h","/var/www"]' "oci-layout:$images/busybox" >/dev/null 2>&1
echo "| jail | restore p50 ms | restore p90 ms | ready p50 ms | first byte p50 ms | first byte p90 ms | PSS/VM KiB |"
echo "|---|---|---|---|---|---|---|"
for mode in on off; do
  flags=()
  [ "$mode" = off ] && flags=(--no-jail)
  "$sm" bench restore web -n "$n" --alive "$alive" --json "$work/$mode.json" "${flags[@]}" >/dev/null 2>"$work/$mode.err" \
    || { cat "$work/$mode.err" >&2; exit 1; }
  python3 - "$mode" "$work/$mode.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
print(f"| {sys.argv[1]} | {r['restore_ms']['p50']:.1f} | {r['restore_ms']['p90']:.1f} | {r['ready_ms']['p50']:.1f} | {r['first_byte_ms']['p50']:.1f} | {r['first_byte_ms']['p90']:.1f} | {r['pss_kib_per_vm']} |")
PY
done
