#!/usr/bin/env bash
# `make vm-test`: the whole suite in a Debian 12 VM on its stock 6.1 kernel
# with its own headers. Builds the box if missing, `vagrant up` (libvirt),
# `make test` inside, prints the summary, `vagrant destroy`. Not part of
# `make test`. Logs: vagrant/.box/vm-test.log (and .box/*.log for the box).
#
# SPLITRELAY_VM_ACCEL=kvm|tcg overrides the probe (vagrant/accel.sh);
# SPLITRELAY_VM_REALTIME=1 runs the realtime tests under TCG too;
# SPLITRELAY_VM_PYTEST_ARGS adds pytest arguments (a subset of the tests).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
box_name="${SPLITRELAY_BOX_NAME:-splitrelay/bookworm64}"
log="$here/.box/vm-test.log"
say() { echo "vm-test: $*"; }
die() { echo "vm-test: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root (libvirt system connection, box build)"
mkdir -p "$here/.box"
: >"$log"
t_start=$(date +%s)

need=()
for p in vagrant vagrant-libvirt libvirt-daemon-system qemu-system-x86 qemu-utils debootstrap rsync dnsmasq-base; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
  say "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$log" 2>&1 \
    || die "apt-get install failed (see $log)"
fi

# libvirt: its system service where systemd runs, else the daemons by hand.
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  say "starting libvirtd"
  if [ -d /run/systemd/system ]; then
    systemctl start libvirtd virtlogd >>"$log" 2>&1 || true
  else
    virtlogd -d >>"$log" 2>&1 || true
    libvirtd -d >>"$log" 2>&1 || true
  fi
  for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
  virsh -c qemu:///system version >/dev/null 2>&1 || die "libvirt cannot run here: $(virsh -c qemu:///system version 2>&1 | tail -n1)"
fi

if ! vagrant box list 2>/dev/null | grep -q "^$box_name "; then
  say "no box $box_name: building it (vagrant/build-box.sh)"
  "$here/build-box.sh"
fi

# qemu runs as libvirt-qemu, which cannot read root's ~/.vagrant.d: the box's
# kernel and initramfs go where it can.
box_dir="$(ls -d "$HOME/.vagrant.d/boxes/${box_name//\//-VAGRANTSLASH-}"/*/libvirt 2>/dev/null | sort -V | tail -n1)"
[ -n "$box_dir" ] || die "box $box_name has no libvirt directory under ~/.vagrant.d"
export SPLITRELAY_VM_BOOT_DIR=/var/lib/libvirt/boot/splitrelay
install -d -m 755 "$SPLITRELAY_VM_BOOT_DIR"
install -m 644 "$box_dir/vmlinuz" "$box_dir/initrd.img" "$SPLITRELAY_VM_BOOT_DIR/"

export SPLITRELAY_VM_ACCEL="${SPLITRELAY_VM_ACCEL:-$("$here/accel.sh")}"
say "acceleration: $SPLITRELAY_VM_ACCEL (SPLITRELAY_VM_ACCEL overrides)"

cd "$here"
cleanup() {
  say "vagrant destroy"
  vagrant destroy -f >>"$log" 2>&1 || say "vagrant destroy failed (see $log)"
}
trap cleanup EXIT

say "vagrant up --provider=libvirt (boot, rsync, provisioning with scripts/setup.sh)"
t0=$(date +%s)
vagrant up --provider=libvirt >>"$log" 2>&1 || { tail -n 20 "$log" >&2; die "vagrant up failed (see $log)"; }
t_up=$(( $(date +%s) - t0 ))
kernel=$(vagrant ssh -c 'uname -r' 2>/dev/null | tr -d '\r')
say "VM up in ${t_up}s, kernel $kernel; running make test inside (long under TCG)"

# Under TCG the guest's CPU is emulated, some ten times slower: tests marked
# realtime (aiortc encoding and decoding audio at 50 frames/s, switch gaps in
# milliseconds, consent timeouts) miss the wall clock there for time, not for
# the kernel, so they are left out unless SPLITRELAY_VM_REALTIME=1. Everything
# else, every test that loads the XDP program among it, runs.
select=""
# pytest's per-test limit (300 s) is for real hardware too.
[ "$SPLITRELAY_VM_ACCEL" = tcg ] && select="--timeout=1800"
if [ "$SPLITRELAY_VM_ACCEL" = tcg ] && [ "${SPLITRELAY_VM_REALTIME:-0}" != 1 ]; then
  select="$select -m 'not realtime'"
  say "TCG: tests marked realtime are left out (SPLITRELAY_VM_REALTIME=1 runs them too)"
fi
# SPLITRELAY_VM_PYTEST_ARGS: more pytest arguments (a subset, -vv, ...).
select="$select ${SPLITRELAY_VM_PYTEST_ARGS:-}"
# Under TCG relayd's start (bcc compiling the XDP program, Python imports)
# takes minutes, not the seconds the lab waits on real hardware.
start_timeout=$([ "$SPLITRELAY_VM_ACCEL" = tcg ] && echo 900 || echo 30)
t0=$(date +%s)
set +e
vagrant ssh -c "cd /splitrelay && sudo SPLITRELAY_LAB_START_TIMEOUT=$start_timeout make test PYTEST_ARGS=\"$select\" 2>&1" 2>>"$log" \
  | tee -a "$log" | grep --line-buffered -E '^(tests/|=+|FAILED|ERROR)'
rc=${PIPESTATUS[0]}
set -e
t_test=$(( $(date +%s) - t0 ))
summary=$(grep -E '^=+ .*(passed|failed|error).* =+$' "$log" | tail -n1)
say "kernel $kernel, accel $SPLITRELAY_VM_ACCEL: vagrant up ${t_up}s, make test ${t_test}s, total $(( $(date +%s) - t_start ))s"
say "summary: ${summary:-none (see $log)}"
exit "$rc"
