#!/usr/bin/env bash
# Starts a local test registry (Debian's docker-registry) on 127.0.0.1 with its own config
# — never the package's default config, which listens on all interfaces — and pushes the
# test images in every shape the puller handles. For trying `supermachine pull` by hand;
# the integration tests (tests/registry.rs) start and stop their own instances.
#
#   scripts/test-registry.sh [PORT] [--auth USER:PASSWORD]
#
# Prints the registry's address and the references it holds, then serves in the
# foreground until interrupted (Ctrl-C stops it and removes its storage).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port=5000
auth=""
while [ $# -gt 0 ]; do
    case "$1" in
        --auth) auth="$2"; shift 2 ;;
        -h|--help) sed -n 2,11p "$0"; exit 0 ;;
        *) port="$1"; shift ;;
    esac
done
for tool in docker-registry skopeo; do
    command -v "$tool" >/dev/null || { echo "test-registry: $tool is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
images="$(python3 "$root/scripts/make-test-images.py")"
dir="$(mktemp -d)"
addr="127.0.0.1:$port"
extra=""
creds=()
if [ -n "$auth" ]; then
    htpasswd -Bbn "${auth%%:*}" "${auth#*:}" >"$dir/htpasswd"
    extra="auth:
  htpasswd:
    realm: supermachine-test
    path: $dir/htpasswd"
    creds=(--dest-creds "$auth")
fi
cat >"$dir/config.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/data
http:
  addr: $addr
$extra
YML
docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT INT TERM
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
push() { # layout tag format
    skopeo copy --quiet --all --dest-tls-verify=false "${creds[@]}" --format "$3" \
        "oci:$images/$1:latest" "docker://$addr/$2"
    echo "  $addr/$2  ($1, $3)"
}
echo "test registry on $addr (storage $dir/data)${auth:+, htpasswd user ${auth%%:*}}:"
push busybox busybox:oci oci                # OCI manifest, gzip layer
push busybox busybox:v2s2 v2s2              # Docker v2 schema 2
push multiarch multi:index oci              # OCI index (amd64 + arm64)
push multiarch multi:list v2s2              # Docker manifest list
push layered layered:latest oci             # gzip + zstd + uncompressed layers, whiteouts
wait $pid
