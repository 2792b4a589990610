#!/usr/bin/env bash
# The kvm stage of scripts/test.sh, run inside the nested L1 VM by scripts/nested.sh: the
# end-to-end test binaries the host built run again here, where /dev/kvm has (emulated)
# AMD SVM, so `--backend auto` — what every test that names no backend uses — picks our
# own VMM. Each binary gets at most PER_BINARY seconds; a test that hangs fails its binary
# rather than the whole stage.
#
#   kvm-stage.sh PER_BINARY LIST
#
# LIST has one line per test binary: its path, then the arguments for the libtest harness
# (filters, --skip NAME ...). Prints each binary's libtest output and `kvm stage: ...`
# lines; exits non-zero when any binary failed or timed out.
set -uo pipefail
per_binary="${1:?per-binary timeout}"
list="${2:?test list}"

echo "kvm stage: $(nproc) vCPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB, $(grep -m1 -o -w svm /proc/cpuinfo || echo 'no svm') in L1"
# A test binary that hangs: every thread of it and of its children (state, kernel wait
# channel, kernel stack) and the tail of each VM console it has open.
where_stuck() {
  local p t
  for p in $1 $(pgrep -P "$1"); do
    for t in /proc/"$p"/task/*; do
      echo "  task ${t#/proc/} $(cat "$t/comm") $(awk '/^State/ {print $2}' "$t/status") $(cat "$t/wchan" 2>/dev/null)"
      sed 's/^/      /' "$t/stack" 2>/dev/null | head -8
    done
    for f in /proc/"$p"/fd/*; do
      f="$(readlink "$f")"
      case "$f" in */console.log) echo "  console $f:"; tail -15 "$f" | sed 's/^/      /' ;; esac
    done
  done
}
failed=()
started=$(date +%s)
while read -r bin args; do
  [ -n "$bin" ] || continue
  name="$(basename "$bin" | sed 's/-[0-9a-f]\{16\}$//')"
  echo "kvm stage: --- $name ---"
  t0=$(date +%s)
  # shellcheck disable=SC2086 # args are libtest words, split on purpose
  "$bin" --test-threads=1 $args &
  pid=$!
  timed_out=0
  while kill -0 "$pid" 2>/dev/null; do
    if [ $(( $(date +%s) - t0 )) -ge "$per_binary" ]; then
      timed_out=1
      echo "kvm stage: $name ran past ${per_binary}s; what its threads and VMs were doing:"
      where_stuck "$pid"
      kill -9 "$pid" 2>/dev/null
      break
    fi
    sleep 2
  done
  wait "$pid"
  rc=$?
  echo "kvm stage: $name exit $rc after $(( $(date +%s) - t0 )) s"
  if [ $timed_out = 1 ]; then
    # One closing line for the host's tally: the binary's own never came.
    echo "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"
  fi
  [ $rc -eq 0 ] || failed+=("$name")
done <"$list"
echo "kvm stage: done in $(( $(date +%s) - started )) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "kvm stage: FAILED: ${failed[*]}"
  exit 1
fi
