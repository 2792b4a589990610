#!/usr/bin/env bash
# The host side of scripts/test.sh's kvm stage: finds the end-to-end test binaries cargo
# built, resolves the guest kernel, init and test images here (all cached), and runs the
# binaries inside a nested L1 VM with real (emulated-SVM) /dev/kvm through
# scripts/nested.sh, where `--backend auto` picks our own VMM. Exits non-zero when any of
# them failed, timed out, or L1 itself broke.
#
#   run-kvm-stage.sh [TEST...]       default: every binary in STAGE below
#
# SUPERMACHINE_NESTED_TIMEOUT (s, the whole stage, retry included; default 3600) and
# SUPERMACHINE_NESTED_PER_BINARY (s; default 1500) bound it; SUPERMACHINE_NESTED_OUT names
# the folder shared with L1 (default: a temp folder, removed after), where QEMU's monitor
# socket is while L1 runs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

# The binaries that boot guests, and the libtest arguments each runs with on kvm. Tests
# skipped here are listed with their reasons in docs/ARCHITECTURE.md ("Nested kvm stage").
declare -A STAGE=(
  [kvm_backend]=""
  [kvm_control_channel]=""
  # Open kvm bug (docs/ARCHITECTURE.md): 256 KiB through the control UART stalls after
  # ~132 KiB in L1 (2 of 3 runs on 2026-12-02); it runs on QEMU.
  [boot]="--skip large_output_arrives_intact"
  # Refused or cached before any VM exists, or image unpacking and layer caching: the
  # same code on every backend.
  [boot_errors]="--skip missing_layout_dir --skip unknown_tag_is_named --skip unsupported_reference_is_quoted --skip corrupted_blob_is_refused_and_not_cached --skip truncated_layer_is_refused_and_not_cached --skip layers_are_cached_by_diff_id_and_shared --skip oci_archive_boots_and_is_unpacked_once"
  [agent]=""
  # Cache and pull-policy logic above the backend (the re-bake path itself runs in the
  # damage test), and the bake's port wait, which is pull.rs on either backend.
  [snapshot]="--skip pull_policies --skip deleted_layer_is_named --skip bake_timeout_names_the_port_and_the_log"
  [worker]=""
  # Volumes through our VMM's virtio-9p server: host<->guest files, read-only, two clones
  # with their own directories, a 256 MiB copy, links and escapes, sqlite.
  [volume]=""
  # The health-check loop is the CLI's; its VM part is run_detached's. `-p` publishing is
  # the TCP forwarder's, over the agent's Connect stream the agent tests run on kvm. A
  # pool that cannot start a worker gives up in the router (no worker ever runs).
  [daemon]="--skip a_failing_health_cmd_stops_the_daemon --skip redis_over_tcp_publish --skip workers_that_cannot_start_fail_run_d_at_once"
  # Only what differs on kvm (each router test is ~100 s in L1): 200 handoffs and a 10 MiB
  # body through our vsock, a worker killed by its per-thread filters, no VM outliving
  # serve when the VMs are the workers, and serve --user (user-namespace jails reaching
  # /dev/kvm, cgroup v2 delegation). Routing, pools, metrics, respawn, TLS and the fronts
  # are the router's own code, run on QEMU.
  [router]="--exact shared_pool_serves_concurrent_requests_and_large_bodies a_worker_killed_by_its_seccomp_filter_is_counted_and_replaced sigterm_leaves_no_workers_vms_or_run_dirs serve_as_a_user_binds_as_root_then_runs_as_that_user"
  # Registry protocol only (what reaches a VM is an OCI layout, as in the tests kept).
  [registry]="--skip a_corrupted_blob_is_refused_and_not_cached --skip an_interrupted_download_resumes --skip credentials_from_the_docker_config --skip platform_insecure_registry_and_pull_flags --skip pull_policies_against_a_stopped_registry"
)
ORDER=(kvm_backend kvm_control_channel boot boot_errors agent snapshot worker volume daemon router registry)
if [ $# -gt 0 ]; then
  ORDER=("$@")
fi

out="${SUPERMACHINE_NESTED_OUT:-$(mktemp -d /tmp/kvm-stage.XXXXXX)}"
trap 'rm -rf "$out"' EXIT

echo "kvm stage: building the test binaries" >&2
cargo build --quiet --workspace --bins
cargo test --workspace --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
' >"$out/artifacts"
: >"$out/list"
for t in "${ORDER[@]}"; do
  [ -n "${STAGE[$t]+set}" ] || { echo "kvm stage: no test binary $t in the stage" >&2; exit 2; }
  exe="$(awk -v t="$t" '$1 == t { print $2 }' "$out/artifacts" | tail -1)"
  [ -n "$exe" ] || { echo "kvm stage: cargo built no test binary $t" >&2; exit 2; }
  echo "$exe ${STAGE[$t]}" >>"$out/list"
done

export SUPERMACHINE_TEST_KERNEL SUPERMACHINE_TEST_INIT SUPERMACHINE_TEST_IMAGES
SUPERMACHINE_TEST_KERNEL="$("$root/kernel-config/build.sh")"
SUPERMACHINE_TEST_INIT="$("$root/scripts/build-guest.sh")"
SUPERMACHINE_TEST_IMAGES="$(python3 "$root/scripts/make-test-images.py")"
if [ -z "${SUPERMACHINE_PVM_TEST_KERNEL:-}" ]; then
  export SUPERMACHINE_PVM_TEST_KERNEL
  SUPERMACHINE_PVM_TEST_KERNEL="$("$root/kernel-config/build.sh" --variant pvm-test)"
fi

# L1 is QEMU's TCG emulating SVM, and that emulation has failed under us in ways no guest
# of ours can cause: L1's own kernel wedged (both CPUs spinning in its kernel) or panicked
# (a bad GS base on a VM exit, "stack guard page was hit" in exc_page_fault). Such an L1
# failure — not a test failure, which fails the stage at once — is retried in a fresh L1
# with the binaries that had not finished (up to $attempts L1s in all, within the stage's
# time), and said so. A wedged L1 shows as a heartbeat that stops; its CPUs' registers are
# printed from QEMU's monitor before it is killed.
attempts=3
first_beat=420
per_binary="${SUPERMACHINE_NESTED_PER_BINARY:-1500}"
deadline=$(( $(date +%s) + ${SUPERMACHINE_NESTED_TIMEOUT:-3600} ))
l1_dump() {
  python3 - "$out/monitor.sock" <<'PY' || true
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(3)
s.sendall(b"info registers -a\n"); time.sleep(2); out = b""
try:
    while True:
        d = s.recv(65536)
        if not d: break
        out += d
except OSError:
    pass
print("\n".join(l for l in out.decode(errors="replace").splitlines() if l.startswith(("CPU#", "RIP="))))
PY
}
rc=1
for attempt in $(seq 1 $attempts); do
  rm -f "$out/done" "$out/heartbeat"
  left=$(( deadline - $(date +%s) ))
  [ $left -gt 120 ] || { echo "kvm stage: no time left for attempt $attempt" >&2; break; }
  "$root/scripts/nested.sh" --vcpus 2 --memory 6144 --timeout "$left" --out "$out" -- \
    bash "$here/kvm-stage.sh" "$per_binary" "$out/list" &
  nested=$!
  # Judged by this host's clock: when did the heartbeat's mtime last change. Before the
  # first beat, L1 has first_beat s to boot and start the stage (a wedge while it boots
  # or in its first seconds showed as no heartbeat at all, and once went unnoticed for the
  # whole stage).
  beat="" beat_seen=$(date +%s) launched=$(date +%s)
  while kill -0 $nested 2>/dev/null; do
    sleep 10
    now_beat="$(stat -c %Y "$out/heartbeat" 2>/dev/null || true)"
    if [ "$now_beat" != "$beat" ]; then
      beat="$now_beat" beat_seen=$(date +%s)
    elif { [ -n "$beat" ] && [ $(( $(date +%s) - beat_seen )) -gt 180 ]; } ||
      { [ -z "$beat" ] && [ $(( $(date +%s) - launched )) -gt $first_beat ]; }; then
      echo "kvm stage: L1 stopped making progress (no heartbeat for 180 s, or none within ${first_beat} s of its start); its CPUs:" >&2
      l1_dump >&2
      pkill -TERM -P $nested 2>/dev/null || true
      break
    fi
  done
  set +e
  wait $nested
  rc=$?
  set -e
  # 1: a test failed (a real failure); 0: all passed; else L1 itself broke or timed out.
  if [ $rc -eq 0 ] || [ $rc -eq 1 ] || [ $attempt -eq $attempts ]; then
    break
  fi
  touch "$out/done"
  grep -v -F -f <(cut -d' ' -f1 "$out/done") "$out/list" >"$out/list.left" || true
  if [ ! -s "$out/list.left" ]; then
    break
  fi
  # A binary L1 died in runs again without the tests it had already passed (each a whole
  # test name, and none of the staged names is part of another, so `--skip` skips just it).
  : >"$out/list"
  while read -r exe args; do
    name="$(basename "$exe" | sed 's/-[0-9a-f]\{16\}$//')"
    skips=""
    if [ -f "$out/log-$name" ]; then
      skips="$(sed -n 's/^test \(.*\) \.\.\. ok\( <[0-9.]*s>\)\{0,1\}$/--skip \1/p' "$out/log-$name" | tr '\n' ' ')"
    fi
    echo "$exe $args $skips" >>"$out/list"
  done <"$out/list.left"
  echo "kvm stage: L1 failed (status $rc) before these finished; once more in a fresh L1 (tests already passed not again):" >&2
  awk '{ n = split($1, p, "/"); line = p[n]; for (i = 2; i <= NF; i++) line = line " " $i; print line }' "$out/list" >&2
done
exit $rc
