#!/usr/bin/env bash
# Restore mechanics of both backends, side by side, in one run on this machine:
# - kvm (our VMM): `supermachine-vmm bench-restore` of a pvm-test kernel snapshot taken
#   mid-boot — snapshot open -> state set -> vCPU running, with and without a VM prepared
#   ahead; PSS per restored VM with N alive (each its own process, as workers run).
# - qemu: `supermachine bench restore` of the busybox httpd demo snapshot — restore in a
#   prepared worker (QEMU waiting on -incoming defer), and its PSS per VM with N alive.
# The two guests differ (kvm: a kernel mid-boot, since guest userspace cannot run under a
# PVM /dev/kvm; qemu: a baked image), so compare the mechanics, not the workloads.
# Usage: scripts/bench-restore-backends.sh [N_RESTORES] [N_ALIVE]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
n="${1:-50}"
alive="${2:-8}"
cd "$root"
"$root/scripts/setup.sh" >/dev/null 2>&1
kernel="$("$root/kernel-config/build.sh" --variant pvm-test)"
cargo build --quiet --release --bins --workspace
vmm="$root/target/release/supermachine-vmm"
sm="$root/target/release/supermachine"
work="$(mktemp -d)"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT

# kvm: snapshot a kernel mid-boot.
mkdir -p "$work/rootfs/sbin" "$work/rootfs/dev"
echo '#!/bin/sh' >"$work/rootfs/sbin/init"
mksquashfs "$work/rootfs" "$work/root.sqfs" -noappend -quiet -all-root >/dev/null
"$vmm" boot --kernel "$kernel" --memory 128 --blk "$work/root.sqfs=rootdisk" \
  --vsock-cid 3 --vsock-uds "$work/boot.sock" \
  --cmdline "console=ttyS0 reboot=k panic=-1 root=/dev/vda ro $(cat kernel-config/pvm-test/cmdline)" \
  --snapshot-at "x86/fpu: x87 FPU will use FXSAVE" --snapshot-to "$work/restore.snap" \
  --stop-after-snapshot --timeout 300 >/dev/null 2>"$work/boot.err"
kvm_cold="$("$vmm" bench-restore --snapshot "$work/restore.snap" -n "$n")"
kvm_prep="$("$vmm" bench-restore --snapshot "$work/restore.snap" -n "$n" --prepared)"
for i in $(seq 1 "$alive"); do
  "$vmm" restore --snapshot "$work/restore.snap" --prepared \
    --vsock-uds "$work/alive$i.sock" --timeout 60 >/dev/null 2>&1 &
  pids+=($!)
done
sleep 5
kvm_pss=0
for p in "${pids[@]}"; do
  kvm_pss=$((kvm_pss + $(awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup")))
done
kvm_pss=$((kvm_pss / alive))
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
pids=()

# qemu: the demo snapshot.
images="$(python3 scripts/make-test-images.py)"
export SUPERMACHINE_SNAPSHOTS="$work/snapshots"
"$sm" pull --name bench --port 80 --cmd '["httpd","-f","-p","80","-h","/var/www"]' \
  "oci-layout:$images/busybox" >/dev/null
"$sm" bench restore bench -n "$n" --alive "$alive" --json "$work/qemu.json" >/dev/null

python3 - "$kvm_cold" "$kvm_prep" "$kvm_pss" "$work/qemu.json" "$n" "$alive" <<'PY'
import json, sys
cold, prep = json.loads(sys.argv[1]), json.loads(sys.argv[2])
pss, q = int(sys.argv[3]), json.load(open(sys.argv[4]))
n, alive = sys.argv[5], sys.argv[6]
cpu = open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()
virt = "VMX/SVM" if any(f in open('/proc/cpuinfo').read().split() for f in ("vmx", "svm")) else "none (PVM /dev/kvm)"
print(f"machine: {cpu}, hardware virtualization: {virt}, restores: {n}, alive: {alive}")
print("| backend | what is timed | p50 ms | p99 ms | PSS per VM |")
print("|---|---|---|---|---|")
print(f"| kvm (ours), VM prepared ahead | snapshot open -> vCPU running | {prep['p50_ms']:.3f} | {prep['p99_ms']:.3f} | {pss/1024:.1f} MiB |")
print(f"| kvm (ours), cold | VM create + snapshot open -> vCPU running | {cold['p50_ms']:.3f} | {cold['p99_ms']:.3f} | |")
r = q["restore_ms"]
print(f"| qemu ({q['backend']}), prepared worker | load state + resume | {r['p50']:.3f} | {r['p99']:.3f} | {q['pss_kib_per_vm']/1024:.1f} MiB |")
print(f"kvm vs qemu, p50: {r['p50']/prep['p50_ms']:.1f}x faster")
PY
