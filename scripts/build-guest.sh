#!/usr/bin/env bash
# Builds the guest binaries (init, shim) as static executables (glibc linked statically; no musl
# target can be installed on these machines) into target/x86_64-unknown-linux-gnu/release/.
# The host CLI finds them there. Prints the init's path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
  --target x86_64-unknown-linux-gnu -p supermachine-init -p supermachine-shim
echo "$root/target/x86_64-unknown-linux-gnu/release/supermachine-init"
