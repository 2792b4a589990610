#!/usr/bin/env bash
# Installs everything supermachine needs on a fresh Debian 12 machine and builds the guest
# side: apt packages, the guest kernel (cached), the static guest init, the test images
# (cached). Safe to run again: every step is skipped when already done.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

pkgs=(qemu-system-x86 squashfs-tools busybox-static redis-tools websocketd curl openssl zstd python3 ca-certificates docker-registry skopeo apache2-utils)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi

echo "setup: guest kernel" >&2
"$root/kernel-config/build.sh" >/dev/null
echo "setup: guest init" >&2
"$root/scripts/build-guest.sh" >/dev/null
echo "setup: test images" >&2
python3 "$root/scripts/make-test-images.py" >/dev/null
echo "setup: done" >&2
