"""Thin ctypes binding to libbpf (libbpf.so.1) for pinned objects.

bcc compiles and loads the program; everything that touches a map or a
program afterwards goes through these calls, so tools can work on the pinned
objects while the daemon (and its bcc state) is gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator

_lib: ctypes.CDLL | None = None


class BpfError(OSError):
    """A BPF syscall failed; the message names the operation and the object."""


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            _lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise BpfError(errno.ENOENT, f"cannot load libbpf ({name}): install libbpf1") from exc
        _lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
        _lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
        _lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        _lib.bpf_map_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        _lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
        _lib.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
        _lib.bpf_map_lookup_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                              ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
        _lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
        _lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.c_void_p]
        _lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
        _lib.bpf_prog_load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p,
                                       ctypes.c_size_t, ctypes.c_void_p]
        _lib.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        _lib.bpf_link_update.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        _lib.bpf_link_detach.argtypes = [ctypes.c_int]
    return _lib


def _check(rc: int, what: str) -> int:
    # libbpf 1.x returns -errno directly and also sets errno.
    if rc < 0:
        err = -rc if rc != -1 else ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return rc


BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2


def obj_get(path: str) -> int:
    """Open a pinned map or program; returns a new fd."""
    return _check(lib().bpf_obj_get(os.fsencode(path)), f"open pinned object {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, os.fsencode(path)), f"pin object at {path}")


class BpfMapInfo(ctypes.Structure):
    """Leading fields of struct bpf_map_info (uapi/linux/bpf.h)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class BpfProgInfo(ctypes.Structure):
    """Leading fields of struct bpf_prog_info (uapi/linux/bpf.h)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
    ]


def map_info(fd: int) -> BpfMapInfo:
    info = BpfMapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return info


def prog_info(fd: int) -> BpfProgInfo:
    info = BpfProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "program info")
    return info


class ProgLoadOpts(ctypes.Structure):
    """struct bpf_prog_load_opts as of libbpf 1.1 (later versions accept it: sz says which)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("attempts", ctypes.c_int),
        ("expected_attach_type", ctypes.c_int),
        ("prog_btf_fd", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_ifindex", ctypes.c_uint32),
        ("kern_version", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("attach_btf_obj_fd", ctypes.c_uint32),
        ("fd_array", ctypes.c_void_p),
        ("func_info", ctypes.c_void_p),
        ("func_info_cnt", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_void_p),
        ("line_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_void_p),
    ]


BPF_PROG_TYPE_SK_LOOKUP = 30
BPF_SK_LOOKUP = 36  # enum bpf_attach_type


def prog_load(prog_type: int, name: str, insns: bytes, *, expected_attach_type: int = 0) -> int:
    """Load instructions (as bcc compiled them, map fds already in place) as
    a program of a type bcc cannot load itself; returns the program fd. A
    refusal carries the verifier's log."""
    log = ctypes.create_string_buffer(1 << 16)
    opts = ProgLoadOpts(sz=ctypes.sizeof(ProgLoadOpts), expected_attach_type=expected_attach_type,
                        log_level=1, log_size=len(log), log_buf=ctypes.cast(log, ctypes.c_void_p))
    buf = ctypes.create_string_buffer(insns, len(insns))
    rc = lib().bpf_prog_load(prog_type, name.encode()[:15], b"GPL", buf, len(insns) // 8, ctypes.byref(opts))
    if rc < 0:
        err = -rc if rc != -1 else ctypes.get_errno()
        tail = log.value.decode(errors="replace").strip().splitlines()[-3:]
        raise BpfError(err, f"load program {name}: {os.strerror(err)}: {' / '.join(tail)}")
    return rc


class LinkCreateOpts(ctypes.Structure):
    """The leading fields of struct bpf_link_create_opts (sz says how many)."""

    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class BpfLinkInfo(ctypes.Structure):
    """Leading fields of struct bpf_link_info (uapi/linux/bpf.h), with the
    XDP member of its union (8-byte aligned, at 16)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("pad0", ctypes.c_uint32),
        ("xdp_ifindex", ctypes.c_uint32),
        ("pad1", ctypes.c_uint32),
    ]


BPF_XDP = 37  # enum bpf_attach_type
BPF_LINK_TYPE_XDP = 6  # enum bpf_link_type


def link_create(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> int:
    """Attach a program through a BPF link; the attachment lives as long as
    the returned fd or a pin of it. For XDP, target_fd is the ifindex and
    flags the mode; the kernel refuses (EBUSY) where a program is attached."""
    opts = LinkCreateOpts(sz=ctypes.sizeof(LinkCreateOpts), flags=flags)
    return _check(lib().bpf_link_create(prog_fd, target_fd, attach_type, ctypes.byref(opts)), "create BPF link")


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the program behind a link in one step (no moment without one)."""
    _check(lib().bpf_link_update(link_fd, prog_fd, None), "update BPF link")


def link_detach(link_fd: int) -> None:
    """Detach a link's program now, whoever else holds the link."""
    _check(lib().bpf_link_detach(link_fd), "detach BPF link")


def link_info(fd: int) -> BpfLinkInfo:
    info = BpfLinkInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "link info")
    return info


def map_update_raw(map_fd: int, key: ctypes._SimpleCData, value: ctypes._SimpleCData) -> None:
    """One update of a map known only by fd (e.g. a sockmap: the value is a socket fd)."""
    _check(lib().bpf_map_update_elem(map_fd, ctypes.byref(key), ctypes.byref(value), BPF_ANY), "update map")


BATCH = 4096  # entries per bpf_map_lookup_batch call
ENOTSUPP = 524  # the kernel's "operation not supported" (not in Python's errno)


class BatchOpts(ctypes.Structure):
    """struct bpf_map_batch_opts (libbpf)."""

    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _NoBatch(Exception):
    """The map type has no batch lookup."""


class PinnedMap:
    """A pinned BPF map with typed keys and values (ctypes structures).

    For per-CPU maps the value type is one CPU's slot; lookups return a list
    with one value per possible CPU.
    """

    def __init__(self, path: str, key_type: type, value_type: type, *, percpu: bool = False):
        self.path = path
        self.key_type = key_type
        self.value_type = value_type
        self.percpu = percpu
        self.fd = obj_get(path)
        info = map_info(self.fd)
        self.max_entries = info.max_entries
        if info.key_size != ctypes.sizeof(key_type) or info.value_size != ctypes.sizeof(value_type):
            os.close(self.fd)
            raise BpfError(
                errno.EINVAL,
                f"pinned map {path} has key/value sizes {info.key_size}/{info.value_size}, "
                f"this version expects {ctypes.sizeof(key_type)}/{ctypes.sizeof(value_type)}",
            )
        self._ncpu = possible_cpus() if percpu else 1
        # Per-CPU values are laid out at 8-byte strides by the kernel.
        stride = (ctypes.sizeof(value_type) + 7) & ~7
        self._vbuf_type = ctypes.c_uint8 * (stride * self._ncpu)
        self._stride = stride

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PinnedMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _values(self, buf: ctypes.Array) -> list:
        return [self.value_type.from_buffer_copy(buf, i * self._stride) for i in range(self._ncpu)]

    def lookup(self, key):
        buf = self._vbuf_type()
        rc = lib().bpf_map_lookup_elem(self.fd, ctypes.byref(key), buf)
        if rc < 0:
            err = -rc if rc != -1 else ctypes.get_errno()
            if err == errno.ENOENT:
                return None
            _check(rc, f"lookup in {self.path}")
        vals = self._values(buf)
        return vals if self.percpu else vals[0]

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        _check(lib().bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), flags), f"update {self.path}")

    def delete(self, key) -> bool:
        rc = lib().bpf_map_delete_elem(self.fd, ctypes.byref(key))
        if rc < 0:
            err = -rc if rc != -1 else ctypes.get_errno()
            if err == errno.ENOENT:
                return False
            _check(rc, f"delete from {self.path}")
        return True

    def keys(self) -> Iterator:
        prev = None
        while True:
            nxt = self.key_type()
            prev_ref = ctypes.byref(prev) if prev is not None else None
            rc = lib().bpf_map_get_next_key(self.fd, prev_ref, ctypes.byref(nxt))
            if rc < 0:
                err = -rc if rc != -1 else ctypes.get_errno()
                if err == errno.ENOENT:
                    return
                _check(rc, f"iterate {self.path}")
            yield nxt
            prev = nxt

    def items(self) -> Iterator[tuple]:
        """Every (key, value). Hash maps are read BATCH entries per syscall
        (a walk of a million flows one get_next_key and one lookup at a time
        would hold the interpreter for tens of seconds); others one by one."""
        if not self.percpu:
            try:
                yield from self._batched()
                return
            except _NoBatch:
                pass
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:  # deleted meanwhile
                yield k, v

    def _batched(self) -> Iterator[tuple]:
        ksize, vsize = ctypes.sizeof(self.key_type), ctypes.sizeof(self.value_type)
        for keys, vals, n in self.raw_batches():
            for i in range(n):
                yield (self.key_type.from_buffer_copy(keys, i * ksize),
                       self.value_type.from_buffer_copy(vals, i * vsize))

    def raw_batches(self) -> Iterator[tuple[bytes, bytes, int]]:
        """(keys, values, count) as the kernel packs them, BATCH entries at a
        time, for walks that read a field or two of a million entries
        without making an object of each. _NoBatch if the map type has no
        batch lookup."""
        ksize, vsize = ctypes.sizeof(self.key_type), ctypes.sizeof(self.value_type)
        keys = (ctypes.c_uint8 * (ksize * BATCH))()
        vals = (ctypes.c_uint8 * (vsize * BATCH))()
        in_b, out_b = ctypes.c_uint64(0), ctypes.c_uint64(0)
        opts = BatchOpts(sz=ctypes.sizeof(BatchOpts))
        first = True
        while True:
            count = ctypes.c_uint32(BATCH)
            rc = lib().bpf_map_lookup_batch(self.fd, None if first else ctypes.byref(in_b), ctypes.byref(out_b),
                                            keys, vals, ctypes.byref(count), ctypes.byref(opts))
            err = 0 if rc >= 0 else (-rc if rc != -1 else ctypes.get_errno())
            if err and err != errno.ENOENT:
                if first and err in (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP):
                    raise _NoBatch  # a map type without batch operations
                _check(rc, f"read {self.path}")
            if count.value:
                yield bytes(keys)[:count.value * ksize], bytes(vals)[:count.value * vsize], count.value
            if err == errno.ENOENT:  # that was the last batch
                return
            in_b.value, first = out_b.value, False


def possible_cpus() -> int:
    """Number of possible CPUs, as the kernel sizes per-CPU map values."""
    with open("/sys/devices/system/cpu/possible") as f:
        spec = f.read().strip()
    n = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


class XdpMd(ctypes.Structure):
    """struct xdp_md as passed to BPF_PROG_TEST_RUN (ctx_in)."""

    _fields_ = [
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    ]


class TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.x)."""

    __test__ = False  # not a pytest class
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1


def prog_test_run_xdp(prog_fd: int, frame: bytes, *, ingress_ifindex: int = 0, repeat: int = 1,
                      flags: int = 0, batch_size: int = 0) -> tuple[int, bytes, int]:
    """Run an XDP program on one frame: (verdict, output frame, ns per run)."""
    data_in = ctypes.create_string_buffer(frame, len(frame))
    out_cap = len(frame) + 512
    data_out = ctypes.create_string_buffer(out_cap)
    ctx = XdpMd(data=0, data_end=len(frame), ingress_ifindex=ingress_ifindex)
    live = bool(flags & BPF_F_TEST_XDP_LIVE_FRAMES)
    opts = TestRunOpts(
        sz=ctypes.sizeof(TestRunOpts),
        data_in=ctypes.cast(data_in, ctypes.c_void_p),
        data_out=None if live else ctypes.cast(data_out, ctypes.c_void_p),
        data_size_in=len(frame),
        data_size_out=0 if live else out_cap,
        ctx_in=ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p) if ingress_ifindex else None,
        ctx_size_in=ctypes.sizeof(ctx) if ingress_ifindex else 0,
        repeat=repeat,
        flags=flags,
        batch_size=batch_size,
    )
    _check(lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN")
    out = b"" if live else data_out.raw[: opts.data_size_out]
    return opts.retval, out, opts.duration
