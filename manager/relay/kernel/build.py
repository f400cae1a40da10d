"""Compiling and loading the relay's XDP program (bcc), with the kernel
headers it needs found or prepared."""

from __future__ import annotations

import glob
import hashlib
import os

from manager.relay.config import DatapathConfig
from manager.relay.kernel.errors import DatapathError
from manager.relay.kernel.structs import BPF_DIR

PROG_SOURCE = BPF_DIR / "relay.bpf.c"
PROG_NAME = "xdp_relay"
DEFAULT_HEADERS_ROOT = "/var/lib/splitrelay/kernel-headers"


def ensure_kernel_headers() -> str | None:
    """Point bcc at usable kernel headers when the running kernel has none.

    scripts/setup.sh merges Debian's split header packages into one tree;
    bcc takes a single directory through BCC_KERNEL_SOURCE.
    """
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return os.environ["BCC_KERNEL_SOURCE"]
    release = os.uname().release
    # The running kernel's own headers: one tree, or Debian's split (build holds
    # the -amd64 part, source the -common part), which bcc follows by itself.
    if any(os.path.exists(f"/lib/modules/{release}/{part}/include/linux/kconfig.h") for part in ("build", "source")):
        return None
    root = os.environ.get("SPLITRELAY_HEADERS_DIR", DEFAULT_HEADERS_ROOT)
    merged = sorted(p for p in glob.glob(os.path.join(root, "*")) if os.path.exists(os.path.join(p, ".complete")))
    if not merged:
        raise DatapathError(f"no kernel headers for {release} and none prepared under {root}: run `make setup`")
    os.environ["BCC_KERNEL_SOURCE"] = merged[-1]
    return merged[-1]


def cflags(cfg: DatapathConfig) -> list[str]:
    return [
        f"-I{BPF_DIR}",
        f'-DPIN_DIR="{cfg.pin_dir}"',
        f"-DMAX_FLOWS={cfg.max_flows}",
        f"-DMAX_FLOWS6={cfg.max_flows6}",
        f"-DMAX_REVERSE={cfg.max_reverse}",
        f"-DMAX_OWNERS={cfg.max_owners}",
    ]


def source_digest(cfg: DatapathConfig) -> int:
    """A digest of what the program is built from (its C sources and build
    flags, not where its maps are pinned), kept in layout[1]: a restarted
    relayd adopts the pinned program only if it was built from the same."""
    h = hashlib.sha256()
    for path in sorted([*BPF_DIR.glob("*.h"), PROG_SOURCE]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(repr([f for f in cflags(cfg) if not f.startswith("-DPIN_DIR=")]).encode())
    return int.from_bytes(h.digest()[:8], "little") or 1


def compile_and_load(cfg: DatapathConfig) -> int:
    """Compile the program with bcc and load it; maps are created or reused
    from the pin directory. Returns a program fd the caller owns."""
    ensure_kernel_headers()
    try:
        from bcc import BPF  # noqa: PLC0415 - slow to import; only loading needs it
    except ImportError as exc:
        raise DatapathError("bcc is not importable: install python3-bpfcc (run `make setup`)") from exc
    cfg.pin_dir.mkdir(parents=True, exist_ok=True)
    try:
        bpf = BPF(src_file=str(PROG_SOURCE).encode(), cflags=cflags(cfg))
        fn = bpf.load_func(PROG_NAME.encode(), BPF.XDP)
    except Exception as exc:
        raise DatapathError(f"cannot load {PROG_SOURCE.name}: {exc}") from exc
    # Keep our own reference; bcc's object (and its fds) can then go.
    fd = os.dup(fn.fd)
    bpf.cleanup()
    return fd
