#!/usr/bin/env bash
# Print "kvm" if KVM really boots a guest kernel on this host, else "tcg".
# /dev/kvm may exist and still hang guests (nested virtualisation without the
# MSRs a guest kernel needs): so boot the box's kernel for a few seconds and
# look for its banner on the serial console. The answer is cached per host
# kernel in .box/accel.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
box="${SPLITRELAY_BOX_DIR:-$here/.box}"
cache="$box/accel-$(uname -r)"
[ -s "$cache" ] && { cat "$cache"; exit 0; }
kernel="$box/vmlinuz"
answer=tcg
if [ -r /dev/kvm ] && [ -w /dev/kvm ] && [ -e "$kernel" ] && command -v qemu-system-x86_64 >/dev/null; then
  out="$(timeout 20 qemu-system-x86_64 -accel kvm -cpu host -m 256 -kernel "$kernel" -append "console=ttyS0 panic=-1" \
         -nographic -no-reboot -serial stdio -monitor none 2>&1 | head -c 200000)"
  if grep -q "Linux version" <<<"$out"; then answer=kvm; fi
elif [ -r /dev/kvm ] && [ ! -e "$kernel" ]; then
  answer=kvm  # no kernel to probe with yet: trust /dev/kvm
fi
mkdir -p "$box" 2>/dev/null && echo "$answer" >"$cache" 2>/dev/null
echo "$answer"
