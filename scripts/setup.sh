#!/usr/bin/env bash
# Idempotent set-up of a Debian 12 machine for splitrelay: apt packages, kernel
# headers bcc can use, bpffs, and the project's virtual environment.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SPLITRELAY_VENV:-$here/.venv}"
headers_root="${SPLITRELAY_HEADERS_DIR:-/var/lib/splitrelay/kernel-headers}"

die() { echo "setup: $*" >&2; exit 1; }
say() { echo "setup: $*"; }

# --- apt packages -----------------------------------------------------------
pkgs=(python3 python3-venv python3-pip python3-bpfcc bpfcc-tools libbpf1 bpftool
      python3-yaml iproute2 ethtool linux-headers-amd64 procps util-linux
      nftables conntrack  # the lab client's NAT (NAT rebinding tests)
      redis-server        # a fleet lab's shared registry (started per lab, on its own socket)
      coturn rtpengine-daemon python3-matplotlib  # make bench-peers: real peers (started per run), plots
      libopus0            # the media engine's codec (opuslib-next loads it)
      chromium fonts-liberation  # real browser calls in the tests (headless, fake audio device)
      espeak-ng           # speech for the agent tests (the Pipecat bot's VAD hears it)
      firefox-esr python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-plugins-bad-1.0
      gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-nice
      pulseaudio          # interop clients (Firefox: a null sink clocks its Web Audio)
      debootstrap buildah podman runc)  # make image / image-test (runc: crun 1.8 refuses hybrid cgroups)
# `kubectl kustomize` renders deploy/overlays in the manifest tests: Debian's
# kubectl, unless one is installed already (another package's owns the path).
command -v kubectl >/dev/null || pkgs+=(kubernetes-client)
# npm fetches a browser-side WHIP client for the conformance test (below);
# Debian's, unless a Node.js with its own npm is installed.
command -v npm >/dev/null || pkgs+=(npm)
# `setup.sh --apt-packages`: the list alone (vagrant/build-box.sh puts them in the box).
if [ "${1:-}" = "--apt-packages" ]; then
  printf '%s\n' "${pkgs[@]}"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (loading XDP programs and creating namespaces needs CAP_SYS_ADMIN/CAP_NET_ADMIN)"
[ -e /sys/kernel/btf/vmlinux ] || [ -d /sys/fs/bpf ] || die "this kernel has no BPF support (/sys/fs/bpf missing)"
grep -q '^ID=debian' /etc/os-release 2>/dev/null || say "warning: not Debian; package names may differ"

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
fi

# The lab and the tests start their own redis-server; Debian's service is not used.
if [ "${#missing[@]}" -gt 0 ] && printf '%s\n' "${missing[@]}" | grep -qx redis-server; then
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now redis-server >/dev/null 2>&1 || true
  else
    service redis-server stop >/dev/null 2>&1 || true
  fi
fi
# The same for coturn and rtpengine: bench-peers starts them itself, on its own ports.
for svc in coturn rtpengine-daemon; do
  if [ "${#missing[@]}" -gt 0 ] && printf '%s\n' "${missing[@]}" | grep -qx "$svc"; then
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
      systemctl disable --now "$svc" >/dev/null 2>&1 || true
    else
      service "$svc" stop >/dev/null 2>&1 || true
    fi
  fi
done

# --- bpffs ---------------------------------------------------------------------
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs on /sys/fs/bpf"
  say "mounted bpffs on /sys/fs/bpf"
fi

# --- kernel headers for bcc ----------------------------------------------------
# bcc compiles against /lib/modules/$(uname -r)/build. Where the running kernel
# ships none (no package, no kheaders), merge Debian's split -common and -amd64
# header packages into one tree and point bcc at it with BCC_KERNEL_SOURCE. XDP
# programs use only UAPI types, so an older header version is fine.
kbuild="/lib/modules/$(uname -r)/build"
kernel_source=""
# The running kernel's own headers: one tree, or Debian's split (build holds
# the -amd64 part, source the -common part), which bcc follows by itself.
if [ -e "$kbuild/include/linux/kconfig.h" ] || [ -e "/lib/modules/$(uname -r)/source/include/linux/kconfig.h" ] \
   || [ -e /sys/kernel/kheaders.tar.xz ]; then
  kernel_source=""
else
  arch_dir="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)"
  [ -n "$arch_dir" ] || die "no kernel headers for $(uname -r) and no linux-headers-amd64 under /usr/src"
  common_dir="${arch_dir%-amd64}-common"
  [ -d "$common_dir" ] || die "missing $common_dir (linux-headers-*-common)"
  merged="$headers_root/$(basename "${arch_dir%-amd64}")"
  if [ ! -e "$merged/.complete" ]; then
    say "no headers for kernel $(uname -r); merging $(basename "$common_dir") and $(basename "$arch_dir") into $merged for bcc"
    rm -rf "$merged"; mkdir -p "$merged"
    cp -a "$common_dir/." "$merged/"
    cp -a "$arch_dir/." "$merged/"
    touch "$merged/.complete"
  fi
  kernel_source="$merged"
fi

# --- virtual environment --------------------------------------------------------
# bcc is not on PyPI: the venv sees Debian's python3-bpfcc through the system
# site packages, so it must be built on Debian's own python3.
stamp="$venv/.splitrelay-installed"
if [ ! -x "$venv/bin/python" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
  say "creating virtual environment in $venv"
  [ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -e "$here[test,pipecat]" || die "pip install failed"
  touch "$stamp"
fi

# --- browser-side test clients from npm ----------------------------------------
# tests/e2e/test_whip_client.py drives whip-whep (the WHIP RFC's author's
# browser client, unmodified) in Chromium.
whip_dir="$here/.cache/npm/whip-whep-1.2.0"
if [ ! -f "$whip_dir/whip.js" ]; then
  say "fetching the whip-whep client from npm"
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent whip-whep@1.2.0 >/dev/null) || die "npm pack whip-whep@1.2.0 failed"
  mkdir -p "$whip_dir"
  tar xzf "$tmp/whip-whep-1.2.0.tgz" -C "$whip_dir" --strip-components=1 || die "unpacking whip-whep failed"
  rm -rf "$tmp"
fi

# --- final check: bcc compiles and the kernel accepts an XDP program -------------
[ -z "$kernel_source" ] || export BCC_KERNEL_SOURCE="$kernel_source"
"$venv/bin/python" - <<'PY' || die "bcc cannot load an XDP program on this machine (see the error above)"
import sys
from bcc import BPF
b = BPF(text="int xdp_ok(struct xdp_md *ctx) { return XDP_PASS; }")
b.load_func("xdp_ok", BPF.XDP)
PY
say "ready (venv $venv)"
