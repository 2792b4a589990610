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
# lines; exits non-zero when any binary failed or timed out. For the host, it touches
# $NESTED_OUT/heartbeat every few seconds from its first line to its last (a stale one means
# L1 stopped), appends "BINARY STATUS" to $NESTED_OUT/done after each binary and keeps
# each binary's libtest output in $NESTED_OUT/log-NAME. Each test's
# time is printed after its result (libtest's --report-time), for budgeting the stage.
set -uo pipefail
per_binary="${1:?per-binary timeout}"
list="${2:?test list}"

beat="${NESTED_OUT:-/tmp}/heartbeat"
touch "$beat"
(while touch "$beat" 2>/dev/null; do sleep 5; done) &
beater=$!
trap 'kill $beater 2>/dev/null' EXIT
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
# Runs one binary (live output, with libtest's closing line renamed so the host's tally
# counts only this script's own line per binary); stops it past the limit. Sets rc and
# timed_out; the output is in $log.
run_once() {
  local bin="$1"
  shift
  : >"$log"
  # --report-time is unstable libtest; RUSTC_BOOTSTRAP lets the stable harness take it.
  RUSTC_BOOTSTRAP=1 "$bin" --test-threads=1 -Z unstable-options --report-time "$@" >"$log" 2>&1 &
  pid=$!
  tail --pid=$pid -n +1 -f "$log" | sed -u 's/^test result:/libtest result:/' &
  local tailer=$!
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
  wait "$tailer" 2>/dev/null
}
count() { grep -c -E "^test .* \.\.\. $1( <[0-9.]+s>)?\$" "$log" || true; }

failed=()
started=$(date +%s)
while read -r bin args; do
  [ -n "$bin" ] || continue
  name="$(basename "$bin" | sed 's/-[0-9a-f]\{16\}$//')"
  # In the shared folder: if L1 dies mid-binary, the host retries only the tests not
  # already passed here.
  log="${NESTED_OUT:-/tmp}/log-$name"
  echo "kvm stage: --- $name ---"
  t0=$(date +%s)
  # shellcheck disable=SC2086 # args are libtest words, split on purpose
  run_once "$bin" $args
  # libtest's own count where it got to print it (a test's stderr can split its "ok" line).
  passed="$(sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed.*/\1/p' "$log" | tail -1)"
  [ -n "$passed" ] || passed=$(count ok)
  nfailed=$(count FAILED)
  [ $timed_out = 1 ] && nfailed=$((nfailed + 1))
  if [ $rc -ne 0 ] && [ $timed_out = 0 ] && [ "$nfailed" -gt 0 ]; then
    # A test that failed once is run once more, alone; if it passes then, the stage says
    # FLAKY loudly and counts it passed (the first failure's output is above).
    # (No process substitution: L1's /dev has no fd links before l1-init makes them.)
    again=()
    while IFS= read -r t; do
      [ -n "$t" ] && again+=("$t")
    done <<<"$(sed -n 's/^test \(.*\) \.\.\. FAILED\( <[0-9.]*s>\)\{0,1\}$/\1/p' "$log")"
    echo "kvm stage: $name: ${again[*]} failed; running once more"
    rc=1
    [ ${#again[@]} -gt 0 ] && run_once "$bin" --exact "${again[@]}"
    if [ $rc -eq 0 ] && [ $timed_out = 0 ]; then
      echo "kvm stage: FLAKY: $name: ${again[*]} failed, then passed alone"
      passed=$((passed + nfailed))
      nfailed=0
    else
      nfailed=$(count FAILED)
      [ $timed_out = 1 ] && nfailed=$((nfailed + 1))
      [ "$nfailed" -gt 0 ] || nfailed=1
    fi
  elif [ $rc -ne 0 ] && [ "$nfailed" -eq 0 ]; then
    nfailed=1 # it died without naming a failed test
  fi
  echo "kvm stage: $name exit $rc after $(( $(date +%s) - t0 )) s"
  if [ "$nfailed" -eq 0 ]; then
    echo "test result: ok. $passed passed; 0 failed; 0 ignored; 0 measured; 0 filtered out"
  else
    echo "test result: FAILED. $passed passed; $nfailed failed; 0 ignored; 0 measured; 0 filtered out"
    failed+=("$name")
  fi
  echo "$bin $nfailed" >>"${NESTED_OUT:-/tmp}/done"
done <"$list"
echo "kvm stage: done in $(( $(date +%s) - started )) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "kvm stage: FAILED: ${failed[*]}"
  exit 1
fi
