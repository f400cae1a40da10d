#!/usr/bin/env bash
# Build a Debian 12 Vagrant box for libvirt locally (no Vagrant Cloud) and add
# it as splitrelay/bookworm64. Idempotent: each step is skipped when its
# result exists; --force starts over.
#
#   sudo vagrant/build-box.sh [--force] [--no-add]
#
# What it makes (in $SPLITRELAY_BOX_DIR, default vagrant/.box):
#   rootfs/        debootstrap of bookworm: the stock 6.1 kernel (linux-image-amd64)
#                  with its own headers, sshd, sudo, rsync, make, the vagrant user
#                  with Vagrant's well-known insecure key
#   box.img        qcow2 holding one ext4 file system made from rootfs (no partition
#                  table, no boot loader: the VM boots the kernel directly)
#   vmlinuz, initrd.img   that kernel and its initramfs, for direct kernel boot
#   splitrelay-bookworm64.box   metadata.json + Vagrantfile + box.img + vmlinuz + initrd.img
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${SPLITRELAY_BOX_DIR:-$here/.box}"
name="${SPLITRELAY_BOX_NAME:-splitrelay/bookworm64}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
size="${SPLITRELAY_BOX_SIZE:-20G}"
force=0 add=1
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --no-add) add=0 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "build-box: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

say() { echo "build-box: $*"; }
die() { echo "build-box: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot)"
for tool in debootstrap qemu-img mkfs.ext4 tar; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install debootstrap qemu-utils e2fsprogs)"
done

# Vagrant's well-known insecure public key (vagrant replaces it on first boot
# when config.ssh.insert_key is on; the box only has to accept it once).
INSECURE_KEY='ssh-rsa AAAAB3NzaC1yc2EAAAABIwAAAQEA6NF8iallvQVp22WDkTkyrtvp9eWW6A8YVr+kz4TjGYe7gHzIw+niNltGEFHzD8+v1I2YJ6oXevct1YeS0o9HZyN1Q9qgCgzUFtdOKLv6IedplqoPkcmF0aYet2PkEDo3MlTBckFXPITAMzF8dJSIFo9D8HfdOV0IAdx4O7PtixWKn5y2hMNG0zQPyUecp4pzC6kivAIhyfHilFR61RGL+GPXQ2MWZWFYbAGjyiYJnAmCP3NOTd0jMZEnDkbUvxhMmBYSdETk1rRgm+R4LOzFUGaHqHDLKLX+FIPKcF96hrucXzcWyLbIbEgE98OHlnVYCzRdK8jlqm8tehUc9c9WhQ== vagrant insecure public key'

mkdir -p "$out"
if [ "$force" = 1 ]; then
  say "--force: removing $out"
  rm -rf "${out:?}"/*
fi
rootfs="$out/rootfs"

# --- 1. debootstrap -------------------------------------------------------------
if [ ! -e "$rootfs/.debootstrap-done" ]; then
  say "1/5 debootstrap bookworm from $mirror into $rootfs (several minutes)"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=systemd-sysv,udev,dbus,openssh-server,sudo,rsync,make,ca-certificates,ifupdown,isc-dhcp-client,iproute2,procps,less,linux-image-amd64,initramfs-tools,kmod,e2fsprogs \
    bookworm "$rootfs" "$mirror" >"$out/debootstrap.log" 2>&1 \
    || die "debootstrap failed (see $out/debootstrap.log)"
  touch "$rootfs/.debootstrap-done"
else
  say "1/5 debootstrap: done before ($rootfs)"
fi

# --- 2. configure the guest ------------------------------------------------------
if [ ! -e "$rootfs/.configured" ]; then
  say "2/5 configuring: apt sources, fstab, network, sshd, the vagrant user"
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://security.debian.org/debian-security bookworm-security main
EOF
  echo splitrelay >"$rootfs/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 splitrelay\n' >"$rootfs/etc/hosts"
  echo '/dev/vda / ext4 defaults,errors=remount-ro 0 1' >"$rootfs/etc/fstab"
  # Whatever the NIC is called (ens3, enp0s3, eth0): DHCP on it.
  cat >"$rootfs/etc/network/interfaces" <<'EOF'
auto lo
iface lo inet loopback
allow-hotplug ens3 ens4 ens5 enp0s3 enp1s0 eth0
iface ens3 inet dhcp
iface ens4 inet dhcp
iface ens5 inet dhcp
iface enp0s3 inet dhcp
iface enp1s0 inet dhcp
iface eth0 inet dhcp
EOF
  chroot "$rootfs" /bin/sh -c 'id vagrant >/dev/null 2>&1 || useradd -m -s /bin/bash vagrant'
  chroot "$rootfs" /bin/sh -c 'echo vagrant:vagrant | chpasswd; echo root:vagrant | chpasswd'
  install -d -m 700 -o 1000 -g 1000 "$rootfs/home/vagrant/.ssh"
  echo "$INSECURE_KEY" >"$rootfs/home/vagrant/.ssh/authorized_keys"
  chroot "$rootfs" chown -R vagrant:vagrant /home/vagrant/.ssh
  chmod 600 "$rootfs/home/vagrant/.ssh/authorized_keys"
  echo 'vagrant ALL=(ALL) NOPASSWD:ALL' >"$rootfs/etc/sudoers.d/vagrant"
  chmod 440 "$rootfs/etc/sudoers.d/vagrant"
  # Faster ssh logins without DNS; host keys are made on first boot.
  echo 'UseDNS no' >"$rootfs/etc/ssh/sshd_config.d/vagrant.conf"
  rm -f "$rootfs"/etc/ssh/ssh_host_*
  cat >"$rootfs/etc/systemd/system/ssh-hostkeys.service" <<'EOF'
[Unit]
Description=Make SSH host keys on first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
[Install]
WantedBy=multi-user.target
EOF
  chroot "$rootfs" systemctl enable ssh-hostkeys.service >/dev/null 2>&1
  # A serial console, so a boot can be followed (and debugged) without graphics.
  chroot "$rootfs" systemctl enable serial-getty@ttyS0.service >/dev/null 2>&1 || true
  chroot "$rootfs" apt-get clean
  touch "$rootfs/.configured"
else
  say "2/5 configuring: done before"
fi

# --- 2b. the newest stock kernel with its own headers -----------------------------
# bcc compiles against /lib/modules/$(uname -r)/{build,source}: the box boots the
# newest bookworm kernel (the security archive's, which is what linux-headers-amd64
# follows), not the one debootstrap took from the point release, and carries
# exactly that kernel's headers, so the guest never needs borrowed ones.
if [ ! -e "$rootfs/.kernel" ]; then
  say "2b/5 kernel: newest linux-image-amd64 and its linux-headers from bookworm(-security)"
  mount -t proc proc "$rootfs/proc"
  trap 'umount "$rootfs/proc" 2>/dev/null || true' EXIT
  chroot "$rootfs" apt-get update -qq >>"$out/debootstrap.log" 2>&1 || die "apt-get update in the box failed"
  DEBIAN_FRONTEND=noninteractive chroot "$rootfs" apt-get install -y -qq --no-install-recommends \
    linux-image-amd64 linux-headers-amd64 git >>"$out/debootstrap.log" 2>&1 \
    || die "installing the kernel and its headers failed (see $out/debootstrap.log)"
  newest="$(ls "$rootfs/lib/modules" | sort -V | tail -n1)"
  for old in $(ls "$rootfs/lib/modules" | sort -V | head -n -1); do
    say "    removing the older kernel $old"
    DEBIAN_FRONTEND=noninteractive chroot "$rootfs" apt-get purge -y -qq "linux-image-$old" >>"$out/debootstrap.log" 2>&1 || true
    rm -rf "$rootfs/lib/modules/$old"
  done
  [ -e "$rootfs/usr/src/linux-headers-$newest/.config" ] || die "no headers for kernel $newest in the box"
  umount "$rootfs/proc"; trap - EXIT
  chroot "$rootfs" apt-get clean
  touch "$rootfs/.kernel"
else
  say "2b/5 kernel: done before ($(ls "$rootfs/lib/modules" | sort -V | tail -n1))"
fi

# --- 2c. the project's apt packages ----------------------------------------------------
# Provisioning runs scripts/setup.sh, which installs these; under TCG dpkg in the
# guest takes half an hour, in the chroot a minute or two. Its services stay
# disabled (setup.sh disables them too; the tests start their own instances).
if [ ! -e "$rootfs/.packages" ] || [ "$rootfs/.packages" -ot "$here/../scripts/setup.sh" ]; then
  mapfile -t pkgs < <(bash "$here/../scripts/setup.sh" --apt-packages)
  say "2c/5 packages: ${#pkgs[@]} from scripts/setup.sh (redis-server, coturn, rtpengine, chromium...)"
  mount -t proc proc "$rootfs/proc"
  trap 'umount "$rootfs/proc" 2>/dev/null || true' EXIT
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"  # no service starts in the chroot
  chmod 755 "$rootfs/usr/sbin/policy-rc.d"
  DEBIAN_FRONTEND=noninteractive chroot "$rootfs" apt-get install -y -qq --no-install-recommends "${pkgs[@]}" \
    >>"$out/debootstrap.log" 2>&1 || die "installing the project's packages failed (see $out/debootstrap.log)"
  for svc in redis-server coturn rtpengine-daemon; do
    chroot "$rootfs" systemctl disable "$svc" >>"$out/debootstrap.log" 2>&1 || true
  done
  rm -f "$rootfs/usr/sbin/policy-rc.d"
  umount "$rootfs/proc"; trap - EXIT
  chroot "$rootfs" apt-get clean
  touch "$rootfs/.packages"
else
  say "2c/5 packages: done before"
fi

# --- 3. kernel for direct boot --------------------------------------------------------
kver="$(ls "$rootfs/lib/modules" | sort -V | tail -n1)"
[ -n "$kver" ] || die "no kernel in $rootfs/lib/modules"
if [ ! -e "$out/initrd.img" ] || [ "$out/initrd.img" -ot "$rootfs/.kernel" ]; then
  say "3/5 kernel $kver: initramfs with the virtio drivers"
  printf 'virtio_pci\nvirtio_blk\nvirtio_net\next4\n' >>"$rootfs/etc/initramfs-tools/modules"
  sort -u -o "$rootfs/etc/initramfs-tools/modules" "$rootfs/etc/initramfs-tools/modules"
  chroot "$rootfs" update-initramfs -u -k "$kver" >"$out/initramfs.log" 2>&1 || die "update-initramfs failed ($out/initramfs.log)"
  cp "$rootfs/boot/vmlinuz-$kver" "$out/vmlinuz"
  cp "$rootfs/boot/initrd.img-$kver" "$out/initrd.img"
else
  say "3/5 kernel $kver: done before"
fi

# --- 4. disk image ------------------------------------------------------------------------
if [ ! -e "$out/box.img" ] || [ "$out/box.img" -ot "$out/initrd.img" ] || [ "$out/box.img" -ot "$rootfs/.packages" ]; then
  say "4/5 disk: ext4 of $size from the rootfs, as qcow2"
  rm -f "$out/root.raw" "$out/box.img"
  truncate -s "$size" "$out/root.raw"
  mkfs.ext4 -q -F -L root -d "$rootfs" "$out/root.raw" || die "mkfs.ext4 -d failed"
  qemu-img convert -O qcow2 "$out/root.raw" "$out/box.img"
  rm -f "$out/root.raw"
else
  say "4/5 disk: done before ($out/box.img)"
fi

# --- 5. the box ----------------------------------------------------------------------------------
box="$out/splitrelay-bookworm64.box"
if [ ! -e "$box" ] || [ "$box" -ot "$out/box.img" ]; then
  say "5/5 packing $box"
  vsize=$(( $(qemu-img info --output=json "$out/box.img" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p') / 1024 / 1024 / 1024 ))
  printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$vsize" >"$out/metadata.json"
  cat >"$out/Vagrantfile" <<'EOF'
# The box's own defaults: boot its kernel directly (no boot loader in the image).
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.driver = "kvm"
    lv.kernel = File.expand_path("vmlinuz", __dir__)
    lv.initrd = File.expand_path("initrd.img", __dir__)
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=1"
  end
end
EOF
  tar -C "$out" -czf "$box.tmp" metadata.json Vagrantfile box.img vmlinuz initrd.img
  mv "$box.tmp" "$box"
else
  say "5/5 box: done before ($box)"
fi

if [ "$add" = 1 ]; then
  if command -v vagrant >/dev/null; then
    say "adding $box to vagrant as $name"
    vagrant box add --force --name "$name" "$box" >/dev/null || die "vagrant box add failed"
  else
    say "vagrant is not installed: box left at $box"
  fi
fi
say "ready: $box (kernel $kver)"
