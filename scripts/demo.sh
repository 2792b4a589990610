#!/usr/bin/env bash
# The main job: set up, build, and boot the demo image (busybox) in a microVM, running a
# command in it and printing its output.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/setup.sh"
cargo build --quiet --release --bin supermachine
images="$(python3 "$root/scripts/make-test-images.py")"
exec "$root/target/release/supermachine" boot --timings "oci-layout:$images/busybox" -- \
  /bin/sh -c 'echo "hello from $(hostname), kernel $(uname -r), $(nproc) vCPU"; cat /proc/meminfo | head -1'
