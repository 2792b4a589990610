#!/usr/bin/env bash
# Volume throughput vs the overlay root, in one guest, one run: sequential write and read
# (dd, 1 MiB blocks, fsync on write) and small-file ops (create, stat, remove N files of
# 1 KiB) on a `-v` volume and on the image's own root (overlayfs, tmpfs upper in guest RAM).
# Times come from the guest's /proc/uptime (10 ms ticks), so runs are sized to last seconds.
# Usage: scripts/bench-volume.sh [--nested] [MIB] [FILES]   (default 128 MiB, 500 files)
#   --nested: in one nested-KVM L1 (scripts/nested.sh), our kvm backend (its own 9P server)
#             and then the qemu backend with -accel kvm (QEMU's 9P server), same guest script.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nested=0
if [ "${1:-}" = --nested ]; then nested=1; shift; fi
mib="${1:-128}"
files="${2:-500}"
cd "$root"
if [ -z "${SUPERMACHINE_NESTED:-}" ]; then
  "$root/scripts/setup.sh" >/dev/null 2>&1
  cargo build --quiet --release --bins --workspace
fi
if [ "$nested" = 1 ]; then
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
  for backend in kvm qemu; do
    accel=""
    [ "$backend" = qemu ] && accel="--env SUPERMACHINE_ACCEL=kvm"
    # shellcheck disable=SC2086
    "$root/scripts/nested.sh" --vcpus 2 --memory 4096 --timeout 1800 --out "$out" \
      --env SUPERMACHINE_BACKEND="$backend" $accel -- bash "$root/scripts/bench-volume.sh" "$mib" "$files"
  done
  exit 0
fi
sm="$root/target/release/supermachine"
images="$(python3 "$root/scripts/make-test-images.py")"
vol="$(mktemp -d)"
trap 'rm -rf "$vol"' EXIT
guest='
now() { read u _ </proc/uptime; echo "$u"; }
el() { awk -v a="$1" -v b="$2" "BEGIN { d = b - a; if (d < 0.01) d = 0.01; print d }"; }
mkdir -p /bench
for t in /vol /bench; do
  s=$(now); dd if=/dev/zero of=$t/seq bs=1M count='"$mib"' conv=fsync 2>/dev/null; e=$(now)
  echo "RESULT $t seq-write $(awk -v m='"$mib"' -v d=$(el $s $e) "BEGIN { printf \"%.1f\", m / d }") MiB/s"
  echo 3 > /proc/sys/vm/drop_caches
  s=$(now); dd if=$t/seq of=/dev/null bs=1M 2>/dev/null; e=$(now)
  echo "RESULT $t seq-read $(awk -v m='"$mib"' -v d=$(el $s $e) "BEGIN { printf \"%.1f\", m / d }") MiB/s"
  rm -f $t/seq
  mkdir -p $t/small; head -c 1024 /dev/zero > /tmp/kib
  s=$(now); i=0; while [ $i -lt '"$files"' ]; do cp /tmp/kib $t/small/f$i; i=$((i+1)); done
  ls -l $t/small >/dev/null; rm -r $t/small; e=$(now)
  echo "RESULT $t small-file-ops $(awk -v n='"$files"' -v d=$(el $s $e) "BEGIN { printf \"%.0f\", 3 * n / d }") ops/s"
done'
echo "bench-volume: $mib MiB sequential, $files small files; backend ${SUPERMACHINE_BACKEND:-auto} (accel ${SUPERMACHINE_ACCEL:-auto}; $(grep -qw -e vmx -e svm /proc/cpuinfo && echo hardware virtualization || echo no vmx/svm: tcg)${SUPERMACHINE_NESTED:+, in nested L1})" >&2
"$sm" boot --memory 512 -v "$vol:/vol" "oci-layout:$images/busybox" -- sh -c "$guest" | tee /dev/stderr |
  awk '/^RESULT/ { v[$3 " " $2] = $4 " " $5 } END {
    printf "| op | volume (/vol, virtio-9p) | overlay root (/bench) |\n|---|---|---|\n";
    n = split("seq-write seq-read small-file-ops", ops, " ");
    for (i = 1; i <= n; i++) printf "| %s | %s | %s |\n", ops[i], v[ops[i] " /vol"], v[ops[i] " /bench"] }'
