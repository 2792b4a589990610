#!/usr/bin/env bash
# The nested hardware-virtualization test bed: runs a command inside an "L1" VM that has a
# real /dev/kvm, on a host whose own /dev/kvm cannot run guests (PVM) or that has none.
#
# QEMU under TCG with `-cpu max` emulates AMD SVM with nested paging; Debian's own kernel in
# that VM loads kvm-amd. The host's / is shared into L1 read-only over 9p with a tmpfs
# overlay on top, so this checkout, its target/ and ~/.cache/supermachine are there at the
# same paths, and writes stay in L1. Intel VMX is not emulated by TCG: this tests the AMD
# SVM path only. Everything in L1 is emulated: compare two things measured in one run, never
# absolute times across runs.
#
#   scripts/nested.sh [--memory MIB] [--vcpus N] [--timeout S] [--out DIR] [--cwd DIR]
#                     [--env K=V]... -- CMD [ARG...]
#
# The command runs in L1 as root with bash, in --cwd (default: this checkout), with
# SUPERMACHINE_NESTED=1, the SUPERMACHINE_*, RUST_* and CARGO_TARGET_DIR variables of the
# caller, and --env additions; NESTED_OUT names --out (a writable folder shared with the
# host, mounted at the same path). Its output is streamed to stdout with L1's console.
# Exit status: the command's; 124 when --timeout passed (L1 is killed); 125 when L1 could
# not run it (no SVM, a module that would not load, no /dev/kvm, a broken share), with the
# reason on stderr — never a silent pass.
#
# While L1 runs, QEMU's monitor listens on --out's monitor.sock (`info registers -a` shows
# where a wedged L1 is; System.map is cached beside the kernel).
#
# L1's kernel (the package linux-image-amd64 depends on, fetched with apt-get download
# once), its modules and the initramfs are cached under
#   ~/.cache/supermachine/nested/<kernel package>_<version>-<hash of l1-init and this file>/
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cache_root="${SUPERMACHINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/supermachine}"

memory=6144
vcpus=2
timeout_s=1800
out=""
cwd="$root"
extra_env=()
usage() { sed -n '12,13p' "$0" | sed 's/^# \{0,3\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --memory) memory="${2:?--memory needs MiB}"; shift 2 ;;
    --vcpus) vcpus="${2:?--vcpus needs a count}"; shift 2 ;;
    --timeout) timeout_s="${2:?--timeout needs seconds}"; shift 2 ;;
    --out) out="${2:?--out needs a folder}"; shift 2 ;;
    --cwd) cwd="${2:?--cwd needs a folder}"; shift 2 ;;
    --env) extra_env+=("${2:?--env needs K=V}"); shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "nested: unknown option $1" >&2; usage ;;
  esac
done
[ $# -gt 0 ] || { echo "nested: no command given" >&2; usage; }
for n in "$memory" "$vcpus" "$timeout_s"; do
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "nested: not a number: $n" >&2; exit 2; }
done

need=()
for p in qemu-system-x86 busybox-static cpio kmod; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "nested: installing ${need[*]}" >&2
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2
fi

# --- L1's kernel and initramfs (cached) ---------------------------------------------------
kernel_pkg() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -1
}
pkg="$(kernel_pkg)"
if [ -z "$pkg" ]; then
  apt-get update -q >&2
  pkg="$(kernel_pkg)"
fi
[ -n "$pkg" ] || { echo "nested: apt knows no kernel package for linux-image-amd64" >&2; exit 125; }
version="$(apt-cache show "$pkg" | sed -n 's/^Version: //p' | head -1)"
kver="${pkg#linux-image-}"
key="${pkg}_${version}-$(cat "$here/nested/l1-init" "$0" | sha256sum | cut -c1-12)"
l1="$cache_root/nested/$key"
if [ ! -f "$l1/vmlinuz" ] || [ ! -f "$l1/initramfs.cpio.gz" ]; then
  mkdir -p "$cache_root/nested/debs"
  deb=("$cache_root/nested/debs/${pkg}_"*.deb)
  if [ ! -f "${deb[0]}" ]; then
    echo "nested: fetching $pkg $version" >&2
    (cd "$cache_root/nested/debs" && apt-get download -q "$pkg=$version" >&2)
    deb=("$cache_root/nested/debs/${pkg}_"*.deb)
  fi
  work="$(mktemp -d "$cache_root/nested/.build-XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  echo "nested: building L1's initramfs from ${deb[0]##*/}" >&2
  dpkg -x "${deb[0]}" "$work/pkg"
  depmod -b "$work/pkg" "$kver"
  mods="$work/pkg/lib/modules/$kver"
  # The modules L1 loads and everything they depend on, read from modules.dep.
  want=(kvm-amd virtio_pci 9pnet_virtio 9p overlay)
  files=()
  for m in "${want[@]}"; do
    path="$(modprobe -d "$work/pkg" -S "$kver" --show-depends "$m" | sed -n 's/^insmod \([^ ]*\).*/\1/p')"
    [ -n "$path" ] || { echo "nested: $pkg has no module $m" >&2; exit 125; }
    files+=($path)
  done
  ir="$work/initramfs"
  mkdir -p "$ir/bin" "$ir/lib/modules/$kver" "$ir/proc" "$ir/sys" "$ir/dev"
  cp /bin/busybox "$ir/bin/busybox"
  cp "$here/nested/l1-init" "$ir/init"
  chmod +x "$ir/init"
  for f in $(printf '%s\n' "${files[@]}" | sort -u); do
    rel="${f#"$work/pkg"}"
    mkdir -p "$ir$(dirname "$rel")"
    cp "$f" "$ir$rel"
  done
  cp "$mods"/modules.builtin* "$mods"/modules.order "$ir/lib/modules/$kver/" 2>/dev/null || true
  depmod -b "$ir" "$kver"
  mkdir -p "$work/l1"
  (cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/l1/initramfs.cpio.gz"
  cp "$work/pkg/boot/vmlinuz-$kver" "$work/l1/vmlinuz"
  cp "$work/pkg/boot/System.map-$kver" "$work/l1/System.map"
  rm -rf "$l1"
  mv "$work/l1" "$l1"
  rm -rf "$work"
  trap - EXIT
  # Builds for other versions or older scripts are stale now (an L1 already running has
  # its kernel and initramfs in QEMU's memory).
  for old in "$cache_root/nested/${pkg}_"*; do
    [ "$old" = "$l1" ] || rm -rf "$old"
  done
fi

# --- run ------------------------------------------------------------------------------------
own_out=""
if [ -z "$out" ]; then
  out="$(mktemp -d /tmp/nested-out.XXXXXX)"
  own_out="$out"
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cwd="$(cd "$cwd" && pwd)"
rm -f "$out/rc" "$out/broken"
{
  echo "# written by scripts/nested.sh"
  env | grep -E '^(SUPERMACHINE_[A-Z_]*|RUST_[A-Z_]*|CARGO_TARGET_DIR)=' | grep -v '^SUPERMACHINE_NESTED=' |
    while IFS='=' read -r k v; do printf 'export %s=%q\n' "$k" "$v"; done
  for kv in ${extra_env[@]+"${extra_env[@]}"}; do
    printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"
  done
  printf 'export NESTED_OUT=%q\n' "$out"
  printf '%q ' "$@"
  echo
} >"$out/cmd.sh"

# tmpfs for the overlay's writes: all but 1 GiB of L1's memory (tmpfs takes only what is used)
tmpfs_mib=$((memory > 2048 ? memory - 1024 : memory / 2))
set +e
timeout --foreground -k 10 "$timeout_s" \
  qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp "$vcpus" -m "$memory" \
    -display none -monitor "unix:$out/monitor.sock,server=on,wait=off" -serial stdio \
    -no-reboot -nodefaults \
    -kernel "$l1/vmlinuz" -initrd "$l1/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 nokaslr nested.out=$out nested.cwd=$cwd nested.tmpfs=${tmpfs_mib}m" \
    -virtfs local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap \
    -virtfs "local,path=$out,mount_tag=out,security_model=none" </dev/null
qrc=$?
set -e
rc=""
if [ $qrc -eq 124 ] || [ $qrc -eq 137 ]; then
  echo "nested: L1 ran past --timeout ${timeout_s}s and was killed" >&2
  rc=124
elif [ -f "$out/broken" ]; then
  echo "nested: L1 could not run the command: $(cat "$out/broken")" >&2
  rc=125
elif [ -f "$out/rc" ]; then
  rc="$(cat "$out/rc")"
else
  echo "nested: L1 ended (qemu status $qrc) without the command's exit status" >&2
  rc=125
fi
[ -n "$own_out" ] && rm -rf "$own_out"
exit "$rc"
