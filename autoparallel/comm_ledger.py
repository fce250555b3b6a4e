"""The communication ledger: what one training step actually moved, per rank, measured at the transport.

Bytes come from the kernel, not from tensor shapes: gloo (CPU) talks to every peer over its own TCP
connections, and `getsockopt(TCP_INFO)` on each of this process's TCP sockets gives the bytes the kernel sent
and received on it (`tcpi_bytes_sent`, `tcpi_bytes_received`). The rendezvous store's connections (the master
endpoint's port) are left out, so what remains is what crossed the process group, headers included.

Kinds come from a thin counting wrapper around the Python entry points that communicate: the
`paddle.distributed` collectives (all_reduce, all_gather, broadcast, reduce_scatter, alltoall, send/recv, the
*_object variants, barrier) and `dist.reshard`, whose kind follows from its placement change per mesh axis
(Partial -> Replicate: all-reduce, Shard -> Replicate: all-gather, Partial -> Shard: reduce-scatter, ...). The
bytes measured between a wrapped call's entry and exit are attributed to its kind. Reshards Paddle performs
inside C++ op dispatch (a tensor-parallel matmul's Partial output, an SPMD rule's input reshard, autograd
backward reshards) never pass through Python: their bytes land in `other` (total minus the attributed
kinds), their number is unknown.

CPU workarounds: cpu_compat's all-to-all (gloo has none) is pairwise send/recv that moves exactly an
all-to-all's bytes, so it is wrapped as one `all_to_all` call (its sends and receives are not counted apart).
Under cpu_compat a Partial -> Shard reshard is an all-reduce plus a local slice (gloo has no
reduce-scatter). The ledger records it as `reduce_scatter` and, separately, under `workaround`, so that the
figure a GPU run would move (a ring reduce-scatter: half a ring all-reduce) can be read off a CPU run.

On NCCL nothing crosses a socket within a node (NVLink / shared memory): the same wrapper would time the
kinds, and the bytes would come from the payloads handed to the collectives (NCCL moves exactly the ring
volume) or from `NCCL_DEBUG_SUBSYS=COLL` traces; `Ledger(gloo=False)` counts calls only.
"""
from __future__ import annotations

import functools
import os
import socket
import struct
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paddle.distributed as dist
from paddle.distributed.auto_parallel import api as _api

from autoparallel import cpu_compat

# struct tcp_info (linux/tcp.h): tcpi_bytes_received is at byte 128, tcpi_bytes_sent at byte 200 (Linux >= 4.19).
_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_TCP_INFO_LEN = 232
_BYTES_RECEIVED, _BYTES_SENT = 128, 200

COLLECTIVES = {
    "all_reduce": "all_reduce", "all_gather": "all_gather", "all_gather_object": "all_gather",
    "broadcast": "broadcast", "broadcast_object_list": "broadcast", "reduce": "reduce",
    "reduce_scatter": "reduce_scatter", "alltoall": "all_to_all", "alltoall_single": "all_to_all",
    "send": "send/recv", "recv": "send/recv", "isend": "send/recv", "irecv": "send/recv", "barrier": "barrier",
}


def _socket_inodes() -> dict[int, int]:
    """inode -> fd of every socket this process holds."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out[int(target[8:-1])] = int(name)
    return out


def _tcp_ports() -> dict[int, tuple[int, int]]:
    """inode -> (local port, remote port) of this process's network namespace's established TCP sockets."""
    out = {}
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "01":  # ESTABLISHED
                out[int(cols[9])] = (int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16))
    return out


def store_port() -> int | None:
    """The rendezvous store's port (PADDLE_MASTER / MASTER_PORT), whose traffic is not the process group's."""
    master = os.environ.get("PADDLE_MASTER") or ""
    port = master.rsplit(":", 1)[1] if ":" in master else os.environ.get("MASTER_PORT")
    return int(port) if port and port.isdigit() else None


def group_sockets(exclude_port: int | None) -> list[int]:
    """fds of this process's established TCP connections, except the rendezvous store's."""
    ports = _tcp_ports()
    return [fd for inode, fd in _socket_inodes().items()
            if inode in ports and exclude_port not in ports[inode]]


def socket_bytes(fd: int) -> tuple[int, int]:
    """(sent, received) bytes the kernel counted on TCP socket `fd` since it was opened."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
    if len(info) < _BYTES_SENT + 8:
        raise OSError("TCP_INFO without tcpi_bytes_sent (kernel older than 4.19)")
    return struct.unpack_from("Q", info, _BYTES_SENT)[0], struct.unpack_from("Q", info, _BYTES_RECEIVED)[0]


def reshard_kind(src: list, dst: list) -> str:
    """The collective a reshard between these placements performs (the largest one, when axes differ)."""
    kinds = set()
    for a, b in zip(src, dst):
        if a.is_partial() and b.is_replicated():
            kinds.add("all_reduce")
        elif a.is_partial() and b.is_shard():
            kinds.add("reduce_scatter")
        elif a.is_shard() and b.is_replicated():
            kinds.add("all_gather")
        elif a.is_shard() and b.is_shard() and a.get_dim() != b.get_dim():
            kinds.add("all_to_all")
    for kind in ("all_reduce", "reduce_scatter", "all_gather", "all_to_all"):
        if kind in kinds:
            return kind
    return "local"


@dataclass
class StepComm:
    """What one rank moved during one step. bytes: kind -> [sent, received]; calls: kind -> count."""
    sent: int = 0
    received: int = 0
    bytes: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    workaround: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    def record(self) -> dict[str, Any]:
        """The `comm` field of metrics.jsonl: kind -> {sent, received, calls}; `other` is what C++ op dispatch
        moved outside any wrapped call; `workaround` the CPU-only decompositions among the kinds."""
        kinds = {k: {"sent": s, "received": r, "calls": self.calls.get(k, 0)} for k, (s, r) in self.bytes.items()}
        for k, n in self.calls.items():
            kinds.setdefault(k, {"sent": 0, "received": 0, "calls": n})
        attributed = [sum(v["sent"] for v in kinds.values()), sum(v["received"] for v in kinds.values())]
        kinds["other"] = {"sent": self.sent - attributed[0], "received": self.received - attributed[1], "calls": None}
        out = {"sent": self.sent, "received": self.received, "kinds": kinds}
        if self.workaround:
            out["workaround"] = {k: {"sent": s, "received": r} for k, (s, r) in self.workaround.items()}
        return out


class Ledger:
    """Per-step communication of this rank: `start_step()`, the step, `end_step()` -> StepComm."""

    def __init__(self, gloo: bool = True):
        """gloo: the process group runs over gloo (the CPU place): bytes come from its TCP sockets, and a
        Partial -> Shard reshard is cpu_compat's all-reduce + slice. Otherwise (NCCL) only calls are counted."""
        self.cpu_workarounds = self.measures_bytes = gloo
        self.exclude = store_port()
        self.fds: list[int] = []
        self.current: StepComm | None = None
        self.depth = 0  # nested wrapped calls (the cpu_compat reshard calls reshard): outermost attributes

    # ---- transport counters ------------------------------------------------------------------------------
    def totals(self) -> tuple[int, int]:
        """(sent, received) over this process's group sockets, rescanned at every call (a new group opens new
        connections)."""
        if not self.measures_bytes:
            return 0, 0
        self.fds = group_sockets(self.exclude)
        sent = received = 0
        for fd in self.fds:
            try:
                s, r = socket_bytes(fd)
            except OSError:
                continue
            sent, received = sent + s, received + r
        return sent, received

    def start_step(self) -> None:
        self.current = StepComm()
        self.base = self.totals()

    def end_step(self) -> StepComm:
        step, self.current = self.current, None
        sent, received = self.totals()
        step.sent, step.received = sent - self.base[0], received - self.base[1]
        return step

    # ---- wrappers ------------------------------------------------------------------------------------------
    def _counted(self, kind_of: Callable[..., str], fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self.current is None or self.depth:
                return fn(*args, **kwargs)
            kind, workaround = kind_of(*args, **kwargs)
            before = self.totals()
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                after = self.totals()
                if kind != "local":
                    moved = (after[0] - before[0], after[1] - before[1])
                    entry = self.current.bytes[kind]
                    entry[0], entry[1] = entry[0] + moved[0], entry[1] + moved[1]
                    self.current.calls[kind] += 1
                    if workaround:
                        w = self.current.workaround[kind]
                        w[0], w[1] = w[0] + moved[0], w[1] + moved[1]
        wrapper.__wrapped_by_ledger__ = True
        return wrapper

    def _reshard_kind(self, tensor, mesh, placements) -> tuple[str, bool]:
        if not tensor.is_dist() or tensor.process_mesh != mesh:
            return "cross_mesh", False
        kind = reshard_kind(list(tensor.placements), list(placements))
        return kind, kind == "reduce_scatter" and self.cpu_workarounds

    def install(self) -> "Ledger":
        """Wrap the collectives, cpu_compat's all-to-all and `dist.reshard` (after cpu_compat patched it).
        Idempotent."""
        for name, kind in COLLECTIVES.items():
            fn = getattr(dist, name, None)
            if fn is not None and not getattr(fn, "__wrapped_by_ledger__", False):
                setattr(dist, name, self._counted(lambda *a, _k=kind, **k: (_k, False), fn))
        if not getattr(cpu_compat.all_to_all_pairwise, "__wrapped_by_ledger__", False):
            cpu_compat.all_to_all_pairwise = self._counted(lambda *a, **k: ("all_to_all", False),
                                                           cpu_compat.all_to_all_pairwise)
        if not getattr(dist.reshard, "__wrapped_by_ledger__", False):
            wrapped = self._counted(self._reshard_kind, dist.reshard)
            dist.reshard = wrapped
            _api.reshard = wrapped
        return self


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f} MiB"


def render_comm_summary(steps: list[StepComm], planned_cpu: dict[str, int], planned_gpu: dict[str, int]) -> str:
    """Measured bytes this rank sent per step (mean over `steps`) against the planner's ideal for the layout:
    the CPU plan (reduce-scatters done as all-reduces) and the GPU plan; the CPU-only workarounds on their own
    line, with the figure a GPU run would send (a ring reduce-scatter sends half a ring all-reduce)."""
    if not steps:
        return "communication: no steps measured"
    n = len(steps)
    sent = sum(s.sent for s in steps) / n
    workaround = sum(w[0] for s in steps for w in s.workaround.values()) / n
    by_kind: dict[str, float] = defaultdict(float)
    calls: dict[str, float] = defaultdict(float)
    for s in steps:
        for kind, (k_sent, _) in s.bytes.items():
            by_kind[kind] += k_sent / n
        for kind, c in s.calls.items():
            calls[kind] += c / n
    by_kind["other"] = sent - sum(by_kind.values())
    plan_cpu, plan_gpu = sum(planned_cpu.values()), sum(planned_gpu.values())
    gpu_equivalent = sent - workaround / 2

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.3f}" if b else "-"

    lines = [f"communication per step, this rank (measured at the transport, mean of {n} steps): sent "
             f"{_mib(sent)}; planned (CPU) {_mib(plan_cpu)}, measured/planned {ratio(sent, plan_cpu)}"]
    for kind in sorted(set(by_kind) | set(planned_cpu)):
        lines.append(f"  {kind:15} measured {_mib(by_kind.get(kind, 0))} in {calls.get(kind, 0):.0f} calls; "
                     f"planned {_mib(planned_cpu.get(kind, 0))}")
    lines.append(f"  CPU-only workarounds (reduce-scatter as all-reduce + slice): {_mib(workaround)} sent; a GPU "
                 f"reduce-scatter sends half -> GPU-equivalent {_mib(gpu_equivalent)}; planned (GPU) "
                 f"{_mib(plan_gpu)}, ratio {ratio(gpu_equivalent, plan_gpu)}")
    return "\n".join(lines)
