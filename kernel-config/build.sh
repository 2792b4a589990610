#!/usr/bin/env bash
# Builds the guest kernel from Debian's linux-source-6.1 with our config fragment and
# caches vmlinux (PVH ELF) + bzImage under
#   ~/.cache/supermachine/kernel/<sha256 of fragment + source version>/
# and points ~/.cache/supermachine/kernel/current at it. A second run is a cache hit.
#
#   build.sh --variant pvm-test   the kvm backend's test kernel for hosts whose /dev/kvm is
#                                 PVM (same config + the patches in pvm-test/; see
#                                 KERNEL-NOTES); cached beside it, linked as `pvm-test`.
#                                 Never used as the production kernel.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${SUPERMACHINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/supermachine}"
fragment="$here/guest.config"
variant=""
link=current
patches=()
if [ "${1:-}" = "--variant" ]; then
  variant="${2:?--variant needs a name}"
  [ -d "$here/$variant" ] || { echo "kernel: no variant $variant in $here" >&2; exit 2; }
  link="$variant"
  patches=("$here/$variant"/*.patch)
fi

need_pkgs=()
dpkg -s linux-source-6.1 >/dev/null 2>&1 || need_pkgs+=(linux-source-6.1)
for p in build-essential flex bison bc libelf-dev libssl-dev xz-utils; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "kernel: installing ${need_pkgs[*]}" >&2
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}" >&2
fi

src_version="$(dpkg-query -W -f='${Version}' linux-source-6.1)"
key="$( (cat "$fragment" "$0" ${patches[@]+"${patches[@]}"}; echo "$src_version $variant") | sha256sum | cut -c1-16)"
key="${variant:+$variant-}$key"
out="$cache_root/kernel/$key"
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
  ln -sfn "$key" "$cache_root/kernel/$link"
  echo "$out/vmlinux"
  exit 0
fi

mkdir -p "$cache_root/kernel"
work="$(mktemp -d "$cache_root/kernel/.build-XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "kernel: building linux-source-6.1 ($src_version) in $work (about 5 min on 2 cores)" >&2
tar -xf /usr/src/linux-source-6.1.tar.xz -C "$work"
cd "$work/linux-source-6.1"
for p in ${patches[@]+"${patches[@]}"}; do
  echo "kernel: applying $(basename "$p")" >&2
  patch -s -p1 <"$p" >&2
done
make -s tinyconfig >&2
scripts/kconfig/merge_config.sh -m .config "$fragment" >&2
make -s olddefconfig >&2
# every option we asked for must survive olddefconfig (a missing dependency drops it silently)
missing=0
while IFS= read -r line; do
  case "$line" in CONFIG_*=y)
    opt="${line%%=*}"
    grep -qx "$opt=y" .config || { echo "kernel: $opt did not stick" >&2; missing=1; } ;;
  esac
done < "$fragment"
[ "$missing" = 0 ] || { echo "kernel: config fragment not satisfied" >&2; exit 1; }
make -s -j"$(nproc)" vmlinux bzImage >&2
tmp_out="$(mktemp -d "$cache_root/kernel/.out-XXXXXX")"
cp vmlinux "$tmp_out/vmlinux"
cp arch/x86/boot/bzImage "$tmp_out/bzImage"
cp .config "$tmp_out/config"
sync -f "$tmp_out/vmlinux"
rm -rf "$out"
mv "$tmp_out" "$out"
ln -sfn "$key" "$cache_root/kernel/$link"
echo "$out/vmlinux"
