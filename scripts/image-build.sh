#!/usr/bin/env bash
# Build the splitrelay OCI image with buildah, from a debootstrapped Debian 12
# rootfs (no registry, no FROM): `make image`.
#
#   sudo scripts/image-build.sh [--force]
#
# Steps, each cached in $SPLITRELAY_IMAGE_CACHE (default /var/cache/splitrelay/image)
# and skipped when its result is newer than its inputs:
#   rootfs/    debootstrap of bookworm (minbase) with python3, python3-bpfcc, libopus0,
#              libbpf1 and Debian's kernel headers merged for bcc (see below)
#   wheels/    the project's wheel and every dependency, built/downloaded by the
#              host's pip (same Debian 12, same Python 3.11 as the image)
# Then a buildah container from scratch gets the rootfs, a venv at
# /opt/splitrelay (system site packages: bcc is Debian's) with the wheels
# installed offline, and the CLIs on PATH: relayd, relayctl, splitrelay-transceiver.
# It is committed as $SPLITRELAY_IMAGE (default localhost/splitrelay:<version>),
# the name deploy/ uses.
#
# Kernel headers: bcc compiles the XDP programs at start. The image carries
# Debian's newest linux-headers-*-{common,amd64} merged into one tree under
# /var/lib/splitrelay/kernel-headers, the layout scripts/setup.sh makes and
# relayd looks for when the running kernel has no headers of its own (the
# programs use only UAPI types, so any recent version compiles for any kernel).
# A node's own headers win when mounted (/lib/modules and /usr/src, read-only).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${SPLITRELAY_IMAGE_CACHE:-/var/cache/splitrelay/image}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/pyproject.toml" | head -n1)"
image="${SPLITRELAY_IMAGE:-localhost/splitrelay:$version}"
venv_py="${SPLITRELAY_VENV:-$here/.venv}/bin/python"
force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "image-build: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

say() { echo "image-build: $*"; }
die() { echo "image-build: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot, buildah)"
for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || die "$tool is missing (make setup installs it)"
done
[ -x "$venv_py" ] || die "no project environment at $venv_py (make setup)"

# The rootfs's packages; a change of this list rebuilds it.
pkgs=(python3 python3-venv python3-bpfcc libbpf1 ca-certificates
      libopus0)  # the transceiver's Opus (opuslib-next loads it)
rootfs="$cache/rootfs"
stamp="$rootfs/.splitrelay-rootfs"
want="$(printf '%s\n' "${pkgs[@]}" | sha256sum | cut -c1-16)"
mkdir -p "$cache"
if [ "$force" = 1 ]; then
  say "--force: removing the cached rootfs and wheels"
  rm -rf "$rootfs" "$cache/wheels"
fi

# --- 1. rootfs (cached) -----------------------------------------------------------
if [ ! -e "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "1/3 debootstrap bookworm into $rootfs (a few minutes; cached afterwards)"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include="$(IFS=,; echo "${pkgs[*]}")" \
    bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || die "debootstrap failed (see $cache/debootstrap.log)"
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://security.debian.org/debian-security bookworm-security main
EOF
  # The newest headers (linux-headers-amd64 follows the security archive),
  # unpacked without their compiler dependencies and merged as setup.sh does.
  chroot "$rootfs" apt-get update -qq >>"$cache/debootstrap.log" 2>&1 || die "apt-get update in the rootfs failed"
  DEBIAN_FRONTEND=noninteractive chroot "$rootfs" apt-get -y -qq upgrade >>"$cache/debootstrap.log" 2>&1 \
    || die "apt-get upgrade in the rootfs failed"
  arch_pkg="$(chroot "$rootfs" apt-cache depends linux-headers-amd64 | sed -n 's/.*Depends: \(linux-headers-.*-amd64\)$/\1/p' | head -n1)"
  [ -n "$arch_pkg" ] || die "cannot resolve linux-headers-amd64 in the rootfs"
  common_pkg="${arch_pkg%-amd64}-common"
  debs="$(mktemp -d)"
  (cd "$debs" && chroot "$rootfs" sh -c "cd /tmp && apt-get download -qq $arch_pkg $common_pkg" \
      && mv "$rootfs"/tmp/*.deb .) >>"$cache/debootstrap.log" 2>&1 || die "downloading $arch_pkg failed"
  unpacked="$debs/root"
  for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$unpacked"; done
  merged="$rootfs/var/lib/splitrelay/kernel-headers/${arch_pkg%-amd64}"
  mkdir -p "$merged"
  cp -a "$unpacked/usr/src/$common_pkg/." "$merged/"
  cp -a "$unpacked/usr/src/$arch_pkg/." "$merged/"
  # The -amd64 part links scripts/tools into linux-kbuild, which bcc does not use.
  find "$merged" -xtype l -delete
  touch "$merged/.complete"
  rm -rf "$debs"
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
  echo "$want" >"$stamp"
else
  say "1/3 rootfs: cached ($rootfs)"
fi

# --- 2. wheels (cached per pyproject and source) -----------------------------------
wheels="$cache/wheels"
newest_src="$(find "$here/pyproject.toml" "$here/manager" "$here/cli" "$here/bpf" -type f -newer "$wheels/.done" 2>/dev/null | head -n1 || true)"
if [ ! -e "$wheels/.done" ] || [ -n "$newest_src" ]; then
  say "2/3 wheels: the project and its dependencies into $wheels"
  rm -rf "$wheels" "$cache/build"
  mkdir -p "$wheels"
  # A copy of the tree: building in place would leave build/ and egg-info behind.
  mkdir -p "$cache/build"
  tar -C "$here" --exclude=.venv --exclude=.git --exclude='*.egg-info' --exclude=build --exclude=vagrant \
      --exclude=test-artifacts -cf - pyproject.toml README.md cli manager bpf | tar -C "$cache/build" -xf -
  "$venv_py" -m pip wheel -q --disable-pip-version-check --wheel-dir "$wheels" "$cache/build" \
    >"$cache/wheels.log" 2>&1 || die "pip wheel failed (see $cache/wheels.log)"
  rm -rf "$cache/build"
  touch "$wheels/.done"
else
  say "2/3 wheels: cached ($wheels)"
fi

# --- 3. the image ----------------------------------------------------------------------
say "3/3 image $image"
ctr="$(buildah from scratch)"
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
mnt="$(buildah mount "$ctr")"
tar -C "$rootfs" --exclude=./.splitrelay-rootfs -cf - . | tar -C "$mnt" -xf -
mkdir -p "$mnt/tmp/wheels"
cp "$wheels"/*.whl "$mnt/tmp/wheels/"
chroot "$mnt" python3 -m venv --system-site-packages /opt/splitrelay
chroot "$mnt" /opt/splitrelay/bin/pip install -q --disable-pip-version-check --no-index \
  --find-links /tmp/wheels splitrelay >"$cache/install.log" 2>&1 || die "installing the wheel failed ($cache/install.log)"
rm -rf "$mnt/tmp/wheels" "$mnt/root/.cache"
# debootstrap copied this host's resolver and name; the runtime provides its own.
: >"$mnt/etc/resolv.conf"
echo splitrelay >"$mnt/etc/hostname"
for cli in relayd relayctl splitrelay-transceiver; do
  [ -x "$mnt/opt/splitrelay/bin/$cli" ] || die "the wheel installed no $cli"
  ln -sf "/opt/splitrelay/bin/$cli" "$mnt/usr/local/bin/$cli"
done
# The transceiver's user (relayd runs as uid 0 with only the capabilities it is granted).
chroot "$mnt" sh -c 'id splitrelay >/dev/null 2>&1 || useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin splitrelay'
chroot "$mnt" python3 -c 'import bcc' || die "bcc does not import in the image"
buildah umount "$ctr" >/dev/null
buildah config --label org.opencontainers.image.title=splitrelay \
  --label org.opencontainers.image.version="$version" \
  --env PATH=/opt/splitrelay/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env PYTHONUNBUFFERED=1 --workingdir / --cmd '' --entrypoint '[]' "$ctr"
old="$(buildah images --noheading --format '{{.ID}}' "$image" 2>/dev/null || true)"
buildah commit -q --rm "$ctr" "$image" >/dev/null
trap - EXIT
# The previous build, now untagged, unless a container still uses it.
[ -z "$old" ] || [ "$old" = "$(buildah images --noheading --format '{{.ID}}' "$image")" ] \
  || buildah rmi "$old" >/dev/null 2>&1 || true
say "ready: $image ($(buildah inspect --format '{{.FromImageID}}' "$image" 2>/dev/null | cut -c1-12 || true))"
