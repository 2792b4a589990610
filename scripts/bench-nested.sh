#!/usr/bin/env bash
# Our kvm backend vs the qemu backend with `-accel kvm`, side by side on the same nested KVM
# (scripts/nested.sh: QEMU/TCG emulating AMD SVM), in one L1 run: boot split, bake time,
# restore / ready / first byte p50 and p99, PSS per VM with ALIVE alive, and `bench http`
# req/s through `serve` with --isolation shared and fresh. Everything in L1 is emulated:
# compare the two columns (ratios), not absolute times across runs.
#
#   scripts/bench-nested.sh [N_RESTORES] [ALIVE] [HTTP_SECONDS]     default: 30 8 10
#
# Prints a markdown table (the one in docs/BENCHMARKS.md) and leaves the raw JSON in
# $BENCH_NESTED_OUT (default: a temp folder, named at the end).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
n="${1:-30}" alive="${2:-8}" secs="${3:-10}"
cd "$root"
"$root/scripts/setup.sh" >/dev/null
cargo build --quiet --release --workspace --bins
images="$(python3 "$root/scripts/make-test-images.py")"
out="${BENCH_NESTED_OUT:-$(mktemp -d /tmp/bench-nested.XXXXXX)}"
mkdir -p "$out"
"$root/scripts/nested.sh" --vcpus 2 --memory 8192 --timeout 3000 --out "$out" -- \
  bash "$root/scripts/nested/bench-in-l1.sh" "$root/target/release/supermachine" "$images" \
  "$n" "$alive" "$secs"

python3 - "$out" "$n" "$alive" "$secs" <<'PY'
import json, os, statistics, sys
out, n, alive, secs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
def load(name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)
cols = {}
for b in ("kvm", "qemu"):
    boots = [load(f"{b}-boot{i}.json") for i in (1, 2, 3)]
    med = lambda k: statistics.median(x[k] or 0 for x in boots)
    r, bake = load(f"{b}-restore.json"), load(f"{b}-bake.json")
    sh, fr = load(f"{b}-http-shared.json"), load(f"{b}-http-fresh.json")
    cols[b] = {
        "boot: backend start (median of 3)": med("backend_start_ms"),
        "boot: kernel to init": med("kernel_ms"),
        "boot: init to workload": med("init_ms"),
        "boot: total": med("total_ms") if "total_ms" in boots[0] else None,
        "bake (pull, busybox httpd)": bake["bake_ms"],
        "restore p50": r["restore_ms"]["p50"], "restore p99": r["restore_ms"]["p99"],
        "ready p50": r["ready_ms"]["p50"], "ready p99": r["ready_ms"]["p99"],
        "first byte p50": r["first_byte_ms"]["p50"], "first byte p99": r["first_byte_ms"]["p99"],
        f"PSS per VM, {alive} alive (KiB)": r["pss_kib_per_vm"],
        "serve shared: req/s": sh["rps"], "serve shared: errors": sum(sh["errors"].values()),
        "serve fresh: req/s": fr["rps"], "serve fresh: errors": sum(fr["errors"].values()),
    }
print(f"n={n} restores, {alive} alive, bench http -c 4 -d {secs}; ms unless named")
print("| metric | kvm backend (our VMM) | qemu -accel kvm | kvm / qemu |")
print("|---|---|---|---|")
for k in cols["kvm"]:
    a, q = cols["kvm"][k], cols["qemu"][k]
    if a is None or q is None:
        continue
    ratio = f"{a / q:.2f}" if q else "-"
    print(f"| {k} | {a:.1f} | {q:.1f} | {ratio} |")
print(f"raw: {out}")
PY
