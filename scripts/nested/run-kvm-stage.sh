#!/usr/bin/env bash
# The host side of scripts/test.sh's kvm stage: finds the end-to-end test binaries cargo
# built, resolves the guest kernel, init and test images here (all cached), and runs the
# binaries inside a nested L1 VM with real (emulated-SVM) /dev/kvm through
# scripts/nested.sh, where `--backend auto` picks our own VMM. Exits non-zero when any of
# them failed, timed out, or L1 itself broke.
#
#   run-kvm-stage.sh [TEST...]       default: every binary in STAGE below
#
# SUPERMACHINE_NESTED_TIMEOUT (s, the whole stage; default 2100) and
# SUPERMACHINE_NESTED_PER_BINARY (s; default 900) bound it; SUPERMACHINE_NESTED_OUT names
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
  [boot]=""
  [boot_errors]=""
  [agent]=""
  [snapshot]=""
  [worker]=""
  [daemon]=""
  [router]=""
  [registry]=""
)
ORDER=(kvm_backend kvm_control_channel boot boot_errors agent snapshot worker daemon router registry)
if [ $# -gt 0 ]; then
  ORDER=("$@")
fi

out="${SUPERMACHINE_NESTED_OUT:-$(mktemp -d /tmp/kvm-stage.XXXXXX)}"
trap 'rm -rf "$out"' EXIT

echo "kvm stage: building the test binaries" >&2
cargo build --quiet --bins
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

"$root/scripts/nested.sh" --vcpus 2 --memory 6144 \
  --timeout "${SUPERMACHINE_NESTED_TIMEOUT:-2100}" --out "$out" -- \
  bash "$here/kvm-stage.sh" "${SUPERMACHINE_NESTED_PER_BINARY:-900}" "$out/list"
