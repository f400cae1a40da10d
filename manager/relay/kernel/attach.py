"""Attaching the relay's program to interfaces through pinned BPF links.

A link (BPF_LINK_CREATE, kernel 5.9+) is created only where no XDP program
is attached: the kernel refuses it otherwise, so a foreign program (a DDoS
filter, Cilium's, another relayd's with its own pin directory) is never
replaced without being asked (datapath.xdp_replace). The link is pinned
next to the maps (<pin_dir>/link_<interface>), so the program stays
attached while relayd restarts; a new program version replaces the old one
through the link in one step (no moment without a program).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from manager.relay.kernel import libbpf
from manager.relay.kernel.errors import DatapathError

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODE_FLAGS = {"native": [XDP_FLAGS_DRV_MODE], "generic": [XDP_FLAGS_SKB_MODE],
              "auto": [XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE]}
# IFLA_XDP_ATTACHED, as a number or as pyroute2's decoded name.
XDP_ATTACHED_MODES = {1: "native", 2: "generic", 3: "offload", 4: "multi",
                      "xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload", "xdpmulti": "multi"}


@dataclass
class AttachResult:
    interface: str
    mode: str          # native / generic
    adopted: bool      # the same program was already attached


def xdp_attachment(ifname: str) -> tuple[int | None, str | None]:
    """(program id, mode) of the XDP program attached to ifname, in this
    thread's network namespace."""
    from pyroute2 import IPRoute  # noqa: PLC0415

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise DatapathError(f"no interface named {ifname}")
        link = ipr.get_links(idx[0])[0]
    xdp = link.get_attr("IFLA_XDP")
    if not xdp:
        return None, None
    attached = xdp.get_attr("IFLA_XDP_ATTACHED")
    if not attached:
        return None, None
    return xdp.get_attr("IFLA_XDP_PROG_ID"), XDP_ATTACHED_MODES.get(attached, str(attached))


def link_pin(pin_dir: Path, ifname: str) -> Path:
    return pin_dir / f"link_{ifname}"


def _our_link(pin_dir: Path, ifname: str) -> int | None:
    """An fd of our pinned link on ifname, if it still holds that interface
    (in this namespace); a stale pin (the interface went) is removed."""
    path = link_pin(pin_dir, ifname)
    if not path.exists():
        return None
    fd = libbpf.obj_get(str(path))
    info = libbpf.link_info(fd)
    try:
        here = socket.if_nametoindex(ifname)
    except OSError:
        here = 0
    if info.type == libbpf.BPF_LINK_TYPE_XDP and info.xdp_ifindex and info.xdp_ifindex == here:
        return fd
    os.close(fd)
    path.unlink()
    return None


def attach_one(prog_fd: int, ifname: str, pin_dir: Path, mode: str, *, replace: bool = False,
               previous: int | None = None) -> AttachResult:
    """Attach prog_fd to ifname through a pinned link (see the module's
    docstring); adopt it where it already is. `previous`: the id of the
    program this one replaced in pin_dir (an upgrade), ours wherever it is
    attached."""
    prog_id = libbpf.prog_info(prog_fd).id
    cur_id, cur_mode = xdp_attachment(ifname)
    fd = _our_link(pin_dir, ifname)
    if fd is not None:
        try:
            if libbpf.link_info(fd).prog_id == prog_id:
                return AttachResult(ifname, cur_mode or "?", True)
            libbpf.link_update(fd, prog_fd)
        finally:
            os.close(fd)
        return AttachResult(ifname, cur_mode or "?", False)
    if cur_id == prog_id:
        # Ours, attached without a link (by an older relayd): left as it is.
        return AttachResult(ifname, cur_mode or "?", True)
    if cur_id is not None and cur_id == previous:
        # Our previous version, attached without a link: swapped in place
        # (netlink replaces in one step), as that relayd would have.
        return AttachResult(ifname, _attach_netlink(ifname, prog_fd, cur_mode), False)
    if cur_id is not None:
        if not replace:
            raise DatapathError(
                f"{ifname} already has an XDP program attached (id {cur_id}), not this relay's (pin directory "
                f"{pin_dir}): refusing to replace it. Detach it, or set datapath.xdp_replace = true")
        _detach_netlink(ifname, cur_mode)
        cur_mode = None
    modes = MODE_FLAGS[mode]
    # Replacing an attachment must use the mode it was attached in.
    if cur_mode in ("native", "generic"):
        modes = MODE_FLAGS[cur_mode]
    last: Exception | None = None
    for flags in modes:
        try:
            fd = libbpf.link_create(prog_fd, socket.if_nametoindex(ifname), libbpf.BPF_XDP, flags)
        except OSError as exc:
            last = exc
            continue
        try:
            libbpf.obj_pin(fd, str(link_pin(pin_dir, ifname)))
        finally:
            os.close(fd)
        return AttachResult(ifname, "native" if flags == XDP_FLAGS_DRV_MODE else "generic", False)
    raise DatapathError(f"cannot attach XDP to {ifname} (mode {mode}): {last}")


def _attach_netlink(ifname: str, prog_fd: int, cur_mode: str | None) -> str:
    from bcc.libbcc import lib as bcclib  # noqa: PLC0415 - bcc only where needed

    flags = XDP_FLAGS_SKB_MODE if cur_mode == "generic" else XDP_FLAGS_DRV_MODE
    if bcclib.bpf_attach_xdp(ifname.encode(), prog_fd, flags) < 0:
        raise DatapathError(f"cannot replace our previous XDP program on {ifname}")
    return "generic" if cur_mode == "generic" else "native"


def _detach_netlink(ifname: str, cur_mode: str | None) -> bool:
    """Remove a program attached without a link (a link's refuses: EBUSY)."""
    from bcc.libbcc import lib as bcclib  # noqa: PLC0415 - bcc only where needed

    flags = XDP_FLAGS_SKB_MODE if cur_mode == "generic" else XDP_FLAGS_DRV_MODE
    if bcclib.bpf_attach_xdp(ifname.encode(), -1, flags) < 0:
        raise DatapathError(f"cannot detach the XDP program on {ifname} (attached through a link of another "
                            f"process?)")
    return True


def detach_one(ifname: str, pin_dir: Path, prog_id: int | None) -> bool:
    """Remove our program from ifname: our pinned link, or (attached by an
    older relayd) a netlink attachment of prog_id. False if neither is there."""
    try:
        fd = _our_link(pin_dir, ifname)
    except OSError:
        fd = None
    if fd is not None:
        try:
            libbpf.link_detach(fd)
        finally:
            os.close(fd)
        link_pin(pin_dir, ifname).unlink(missing_ok=True)
        return True
    try:
        cur_id, cur_mode = xdp_attachment(ifname)
    except DatapathError:
        return False
    if cur_id is None or prog_id is None or cur_id != prog_id:
        return False
    try:
        return _detach_netlink(ifname, cur_mode)
    except DatapathError:
        return False
