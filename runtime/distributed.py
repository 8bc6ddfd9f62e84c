"""Data-parallel training over processes: MPI ranks (mpi4py), NCCL between GPUs.

    mpirun -n 4 convc train model.cell --out runs/m       # finds MPI by itself
    srun --mpi=pmix -n 4 convc train model.cell --out runs/m

Every rank holds the same parameters and optimizer state. At each step it
computes the loss and gradients of its shard of the global batch (the rows
`kernels.shard_bounds(batch, ranks)[rank]`), the ranks sum the gradients,
and every rank takes the same optimizer step on the same summed gradient,
global-norm clipping included.

**A fixed order.** MPI's own reductions may add in any order, so two runs
could differ in the last bits. Here rank r scales its gradient by its share
of the batch, w_r; the flat gradient is cut into one chunk per rank; an
all-to-all hands rank j chunk j of every rank, which it adds in rank order,
g_0 w_0 + g_1 w_1 + ...; an all-gather gives everyone every summed chunk.
That is exactly the arithmetic `kernels.in_shards` uses for the thread
shards of one process, and what `--shards N` does in one process, so N
ranks give bitwise the losses and parameters of one process running the
same batch cut into the same N shards. It moves 2 (N - 1) / N of the
gradient per rank, as a ring all-reduce does.

**Exchanges that cannot hang.** Before each gradient exchange the ranks
trade a small status (their loss, the seconds since their last exchange,
a stop request, or the error they raised) point to point, so a rank that
is missing is known by name. Every wait polls with a deadline: the slowest
interval of that kind any rank has reported, plus `timeout` seconds
(`FIRST_WAIT` when none has been seen yet). A rank that raised says so in
its status and every rank stops at the same step; a rank that goes silent
(killed, hung) makes the others stop with a message naming it and end the
job with MPI_Abort.

`NCCLGroup` is the same with the gradient on the GPU: the chunks move with
NCCL's grouped send/receive and all-gather (cupy.cuda.nccl), its
communicator bootstrapped over MPI, as ChainerMN did; the statuses stay on
MPI.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time

import numpy as np

from convc.errors import ConvcError
from convc.runtime.kernels import combine_losses, shard_bounds, shard_weights, weigh

# Variables a launcher sets in every process it starts: MPICH's and Intel MPI's
# Hydra, Open MPI, PMIx (Open MPI 5, srun --mpi=pmix), MVAPICH, Slurm's PMI-2.
MPI_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")
MPI_VARIABLES = MPI_SIZE_VARIABLES + ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK",
                                      "PMI_FD")
LOCAL_RANK_VARIABLES = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK",
                        "SLURM_LOCALID", "PMIX_LOCAL_RANK")

# Seconds to wait at an exchange of a kind no rank has timed yet (the first step
# compiles and warms up, the first checkpoint is written, ranks load their data).
FIRST_WAIT = 120.0
# A status is JSON in a fixed-size buffer; error messages are cut to fit.
STATUS_BYTES = 1 << 15
STATUS_TAG = 7301


def mpi_environment() -> str | None:
    """The launcher variable that says this process runs under MPI, or None."""
    return next((name for name in MPI_VARIABLES if os.environ.get(name)), None)


def launched_size() -> int | None:
    """The number of processes the launcher started (from its variables), or None."""
    for name in MPI_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def wanted(setting: bool | None) -> bool:
    """Whether a run is distributed: `distributed` as given, or (None) whether a
    launcher started more than one process."""
    if setting is not None:
        return bool(setting)
    size = launched_size()
    return size is not None and size > 1


class Fault(ConvcError):
    """Another rank failed or went silent; raised on every rank that noticed.

    `rank` is the rank at fault, `abort` whether the job has to be ended with
    MPI_Abort because a rank may still be hanging.
    """

    def __init__(self, message: str, rank: int | None = None, abort: bool = False):
        super().__init__(message)
        self.rank = rank
        self.abort = abort


def describe_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    what = type(exc).__name__
    return (f"{what}: {text}" if not isinstance(exc, ConvcError) else text)[:4000]


def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError:
        raise ConvcError("distributed training needs mpi4py and an MPI: pip install "
                         "'convc[mpi]' (mpi4py and the mpich wheel)") from None
    return MPI


def open_group(device: str = "cpu", collectives: str | None = None,
               margin: float = 5.0) -> "Group":
    """The ranks of this run. Fails clearly when the process was not started by an
    MPI launcher (one process alone would wait for nobody)."""
    if mpi_environment() is None:
        raise ConvcError(
            "distributed training needs an MPI launcher: start it as `mpirun -n N convc "
            "train ...` or `srun --mpi=pmix -n N convc train ...`; none of "
            f"{', '.join(MPI_VARIABLES[:6])} is set in this process")
    MPI = _import_mpi()
    if collectives is None:
        collectives = "nccl" if device == "gpu" and _nccl_available() else "mpi"
    if collectives == "nccl":
        if device != "gpu":
            raise ConvcError("collectives nccl sums gradients between GPUs; it needs "
                             "--device gpu")
        return NCCLGroup(MPI, margin)
    return Group(MPI, margin)


def _nccl_available() -> bool:
    try:
        from cupy.cuda import nccl  # noqa: F401
    except Exception:  # no CuPy, or CuPy built without NCCL
        return False
    return True


def local_rank() -> int:
    for name in LOCAL_RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


class Group:
    """The ranks of one run and the exchanges they make, each with a deadline."""

    name = "mpi"

    def __init__(self, MPI, margin: float):
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.margin = float(margin)
        self.slowest: dict[str, float] = {}
        self.ended = False       # every rank knows the run ends (an agreed stop or error)
        self.stop_signal = 0     # a stop request (signal number) some rank reported
        self.exchange_seconds = 0.0  # time spent in the gradient exchange
        self.status_seconds = 0.0    # time spent in the status rounds
        self.peers: list[str] = [f"rank {r}" for r in range(self.size)]
        self._sends: list = []
        self._mark = time.perf_counter()
        self._buffers: dict = {}
        self._last: tuple[str, int] | None = None  # the last exchange passed

    # ------------------------------------------------------------ waiting
    def wait_limit(self, kind: str) -> float:
        seen = self.slowest.get(kind)
        return (FIRST_WAIT if seen is None else seen) + self.margin

    def _wait(self, requests: list, limit: float, spin: bool = False) -> list[bool]:
        """Poll `requests` until all are done or `limit` seconds pass; which are done.

        A status round waits for the slowest rank's step, so it sleeps between
        polls (up to 5 ms), leaving the cores to ranks still computing. A
        collective moves data that only advances while it is polled (MPICH moves
        a large message in pieces, one per call), so `spin` polls without pause.
        """
        done = [False] * len(requests)
        deadline = time.monotonic() + limit
        pause, polls = 1e-4, 0
        while True:
            for i, request in enumerate(requests):
                if not done[i] and request.Test():
                    done[i] = True
            if all(done):
                return done
            polls += 1
            if not spin or polls % 256 == 0:
                if time.monotonic() > deadline:
                    return done
                # signal handlers run between polls (a SIGTERM sets its flag)
                time.sleep(0 if spin else pause)
                pause = min(pause * 2, 0.005)

    def _settle_sends(self) -> None:
        self._sends = [(buf, reqs) for buf, reqs in self._sends
                       if not all(r.Test() for r in reqs)]

    # ------------------------------------------------------------ statuses
    def exchange(self, kind: str, step: int, **fields) -> list[dict]:
        """Trade a status with every other rank; the statuses of all, by rank.

        Raises Fault naming the rank when one reported an error (unless it is
        this rank's own, which the caller raises) or did not answer in time.
        """
        t0 = time.perf_counter()
        status = {"rank": self.rank, "kind": kind, "step": int(step),
                  "seconds": t0 - self._mark, **fields}
        payload = _encode(status)
        others = [p for p in range(self.size) if p != self.rank]
        self._settle_sends()
        received = {p: bytearray(STATUS_BYTES) for p in others}
        recvs = [self.comm.Irecv(received[p], source=p, tag=STATUS_TAG) for p in others]
        sends = [self.comm.Isend(payload, dest=p, tag=STATUS_TAG) for p in others]
        self._sends.append((payload, sends))
        limit = self.wait_limit(kind)
        done = self._wait(recvs, limit)
        missing = [p for p, ok in zip(others, done) if not ok]
        if missing:
            self.ended = True
            seen = self.slowest.get(kind)
            slowest = (f"the slowest {kind} so far took {seen:.2f} s" if seen is not None
                       else f"no {kind} has been timed yet")
            names = ", ".join(self.peers[p] for p in missing)
            raise Fault(f"rank {self.rank}: no word from {names} for {limit:.1f} s at "
                        f"{_where(kind, step)} ({slowest}; the limit is that plus timeout="
                        f"{self.margin:g} s): it died or hangs", rank=missing[0], abort=True)
        statuses: list[dict] = [{}] * self.size
        statuses[self.rank] = status
        for p in others:
            statuses[p] = json.loads(bytes(received[p]).rstrip(b"\0").decode("utf-8"))
        for st in statuses:
            self.slowest[kind] = max(self.slowest.get(kind, 0.0), float(st.get("seconds", 0)))
            if st.get("stop"):
                self.stop_signal = self.stop_signal or int(st["stop"])
        self._mark = time.perf_counter()
        self.status_seconds += self._mark - t0
        if kind not in ("setup", "ready", "resume"):
            self._last = (kind, int(step))
        self._check(statuses, kind, step)
        return statuses

    def _check(self, statuses: list[dict], kind: str, step: int) -> None:
        failed = [st for st in statuses if st.get("error")]
        if not failed:
            wrong = [st for st in statuses if st.get("kind") != kind]
            if wrong:
                self.ended = True
                st = wrong[0]
                raise Fault(f"rank {self.rank}: {self.peers[st['rank']]} is at {st.get('kind')} "
                            f"{st.get('step')}, not at {kind} {step}", rank=st["rank"])
            return
        self.ended = True
        if any(st["rank"] == self.rank for st in failed):
            return  # this rank's own error: the caller raises it
        st = failed[0]
        where = st.get("where") or f"at {_where(st.get('kind'), st['step'])}"
        raise Fault(f"{self.peers[st['rank']]} failed {where}: {st['error']}", rank=st["rank"])

    def fail(self, exc: BaseException, kind: str = "error", step: int = 0) -> None:
        """Tell the other ranks that this one raised `exc` (once; not when every rank
        already knows the run ends). Waits for nobody."""
        if self.ended or self.size == 1:
            return
        self.ended = True
        where = (f"after {_where(*self._last)}" if self._last else "during setup")
        payload = _encode({"rank": self.rank, "kind": kind, "step": int(step),
                           "seconds": time.perf_counter() - self._mark,
                           "error": describe_error(exc), "where": where})
        sends = [self.comm.Isend(payload, dest=p, tag=STATUS_TAG)
                 for p in range(self.size) if p != self.rank]
        self._sends.append((payload, sends))

    def introduce(self) -> None:
        """The first round: every rank's pid and host, so later messages can name them."""
        statuses = self.exchange("setup", 0, pid=os.getpid(), host=socket.gethostname())
        self.peers = [f"rank {st['rank']} (pid {st['pid']} on {st['host']})"
                      for st in statuses]

    def agree(self, kind: str, step: int, fn, **fields):
        """fn() on every rank, then a status round; this rank's error is raised after
        the others have heard of it, another rank's as a Fault."""
        try:
            value = fn()
        except Exception as exc:
            self.exchange(kind, step, error=describe_error(exc), **fields)
            raise
        return value, self.exchange(kind, step, **fields)

    # ------------------------------------------------------------ data
    def broadcast(self, value):
        """rank 0's `value` on every rank (pickled)."""
        return self.comm.bcast(value, root=0)

    def gather_rows(self, arrays: dict, bounds: list[tuple[int, int]], xp=np) -> dict:
        """Every rank's rows [a, b) of each array, stacked in rank order on every rank."""
        out = {}
        for name in sorted(arrays):
            part = np.ascontiguousarray(_to_host(arrays[name]))
            row = int(np.prod(part.shape[1:], dtype=np.int64))
            whole = np.empty((bounds[-1][1],) + part.shape[1:], dtype=part.dtype)
            counts = [(b - a) * row for a, b in bounds]
            displs = [a * row for a, _ in bounds]
            kind = _mpi_type(part.dtype)
            request = self.comm.Iallgatherv([part, kind], [whole, counts, displs, kind])
            self._collective(request, "states")
            out[name] = xp.asarray(whole)
        return out

    def _collective(self, request, what: str) -> None:
        kind = "exchange"
        limit = self.wait_limit(kind)
        t0 = time.perf_counter()
        if not self._wait([request], limit, spin=True)[0]:
            self.ended = True
            raise Fault(f"rank {self.rank}: the {what} exchange did not finish within "
                        f"{limit:.1f} s: a rank died or hangs", abort=True)
        took = time.perf_counter() - t0
        self.slowest[kind] = max(self.slowest.get(kind, 0.0), took)
        self.exchange_seconds += took

    # ------------------------------------------------------------ gradients
    def sum_gradients(self, grads: dict, weight: float) -> dict:
        """sum_r w_r g_r, added in rank order, identical on every rank.

        `grads` are this rank's gradients (scaled in place by `weight`);
        the result's arrays are views of one flat buffer, reused next step.
        Names that share one array (as generated code may return) share it
        in the result too.
        """
        names, aliases = _unique(grads)
        xp = _array_module(grads[names[0]])
        flat = self._pack(grads, names)
        weigh(flat, weight)
        total = self._sum_flat(flat)
        result = _unpack(total, grads, names, aliases)
        if xp is not np:
            result = {k: xp.asarray(v) for k, v in result.items()}
        return result

    def _pack(self, grads: dict, names: list[str]) -> np.ndarray:
        size = sum(int(grads[n].size) for n in names)
        dtype = np.dtype(grads[names[0]].dtype)
        flat = self._buffer("flat", (size,), dtype)
        at = 0
        for name in names:
            g = _to_host(grads[name]).reshape(-1)
            flat[at:at + g.size] = g
            at += g.size
        return flat

    def _buffer(self, key: str, shape: tuple, dtype) -> np.ndarray:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._buffers[key] = np.empty(shape, dtype=dtype)
        return buf

    def _sum_flat(self, flat: np.ndarray) -> np.ndarray:
        size = self.size
        if size == 1:
            return flat
        chunks = shard_bounds(flat.size, size)
        counts = [b - a for a, b in chunks]
        displs = [a for a, _ in chunks]
        mine = counts[self.rank]
        parts = self._buffer("parts", (size, mine), flat.dtype)
        kind = _mpi_type(flat.dtype)
        self._collective(self.comm.Ialltoallv(
            [flat, counts, displs, kind],
            [parts, [mine] * size, [p * mine for p in range(size)], kind]), "gradient")
        summed = self._buffer("summed", (mine,), flat.dtype)
        summed[...] = parts[0]
        for p in range(1, size):  # rank order, as in_shards adds its shards
            summed += parts[p]
        total = self._buffer("total", flat.shape, flat.dtype)
        self._collective(self.comm.Iallgatherv([summed, kind], [total, counts, displs, kind]),
                         "gradient")
        return total

    # ------------------------------------------------------------ the end
    def farewell(self) -> None:
        """Wait (bounded) until every rank is done, so that no rank leaves while rank 0
        still writes its last checkpoint (a launcher ends all when one exits)."""
        if self.size == 1:
            return
        request = self.comm.Ibarrier()
        self._wait([request], FIRST_WAIT / 2 + self.margin)
        self._settle_sends()

    def abort(self, message: str, code: int = 1) -> None:
        print(f"convc: error: {message}", file=sys.stderr, flush=True)
        time.sleep(0.5)  # the launcher forwards the line before it tears the job down
        self.MPI.COMM_WORLD.Abort(code)


class NCCLGroup(Group):
    """Group with the gradients summed on the GPUs through NCCL, in the same fixed order.

    The NCCL communicator is bootstrapped over MPI (rank 0's unique id is
    broadcast), one GPU per rank: the local rank modulo the GPUs visible.
    Chunks are padded to one length so NCCL's equal-count all-gather can
    carry them; the padding is never read.
    """

    name = "nccl"

    def __init__(self, MPI, margin: float):
        super().__init__(MPI, margin)
        import cupy
        from cupy.cuda import nccl

        self.cupy, self.nccl = cupy, nccl
        count = cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(local_rank() % count).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)

    def sum_gradients(self, grads: dict, weight: float) -> dict:
        cp, nccl = self.cupy, self.nccl
        names, aliases = _unique(grads)
        dtype = np.dtype(grads[names[0]].dtype)
        size = sum(int(grads[n].size) for n in names)
        mine = -(-size // self.size)
        flat = self._device_buffer("flat", (self.size * mine,), dtype)
        at = 0
        for name in names:
            g = cp.asarray(grads[name]).reshape(-1)
            flat[at:at + g.size] = g
            at += g.size
        weigh(flat, weight)
        if self.size == 1:
            return _unpack(flat, grads, names, aliases)
        kind = {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                np.dtype(np.float64): nccl.NCCL_FLOAT64}[dtype]
        parts = self._device_buffer("parts", (self.size, mine), dtype)
        total = self._device_buffer("total", (self.size * mine,), dtype)
        summed = self._device_buffer("summed", (mine,), dtype)
        cp.cuda.get_current_stream().synchronize()
        s = self.stream.ptr
        nccl.groupStart()
        for p in range(self.size):
            self.nccl_comm.send(flat[p * mine:(p + 1) * mine].data.ptr, mine, kind, p, s)
            self.nccl_comm.recv(parts[p].data.ptr, mine, kind, p, s)
        nccl.groupEnd()
        self._stream_wait("gradient")
        summed[...] = parts[0]
        for p in range(1, self.size):
            summed += parts[p]
        cp.cuda.get_current_stream().synchronize()
        self.nccl_comm.allGather(summed.data.ptr, total.data.ptr, mine, kind, s)
        self._stream_wait("gradient")
        return _unpack(total, grads, names, aliases)

    def _device_buffer(self, key: str, shape: tuple, dtype):
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._buffers[key] = self.cupy.empty(shape, dtype=dtype)
        return buf

    def _stream_wait(self, what: str) -> None:
        limit = self.wait_limit("exchange")
        t0 = time.perf_counter()
        deadline = time.monotonic() + limit
        while not self.stream.done:
            if time.monotonic() > deadline:
                self.ended = True
                self.nccl_comm.abort()
                raise Fault(f"rank {self.rank}: the NCCL {what} exchange did not finish "
                            f"within {limit:.1f} s: a rank died or hangs", abort=True)
            time.sleep(1e-4)
        took = time.perf_counter() - t0
        self.slowest["exchange"] = max(self.slowest.get("exchange", 0.0), took)
        self.exchange_seconds += took


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _where(kind: str | None, step: int) -> str:
    """Where a status was sent, in words: 'step 5', 'validation after step 4', 'setup'."""
    if kind and kind.startswith("step"):
        return f"step {step}"
    if kind == "validation":
        return f"the validation after step {step}"
    return {"error": f"step {step + 1}" if step else "setup", "ready": "setup",
            "resume": "setup (finding the checkpoint to resume)"}.get(kind or "", "setup")


def _encode(status: dict) -> bytearray:
    payload = json.dumps(status).encode("utf-8")
    if len(payload) >= STATUS_BYTES and status.get("error"):
        status = dict(status, error=status["error"][:1000] + " [...]")
        payload = json.dumps(status).encode("utf-8")
    if len(payload) >= STATUS_BYTES:
        raise ConvcError(f"a status of {len(payload)} bytes does not fit the "
                         f"{STATUS_BYTES}-byte exchange")
    buf = bytearray(STATUS_BYTES)
    buf[:len(payload)] = payload
    return buf


def _unique(grads: dict) -> tuple[list[str], dict[str, str]]:
    """The names of distinct arrays, sorted, and each other name's first name."""
    names, aliases, seen = [], {}, {}
    for name in sorted(grads):
        first = seen.setdefault(id(grads[name]), name)
        if first == name:
            names.append(name)
        else:
            aliases[name] = first
    return names, aliases


def _unpack(flat, grads: dict, names: list[str], aliases: dict[str, str]) -> dict:
    out, at = {}, 0
    for name in names:
        shape = grads[name].shape
        count = int(np.prod(shape, dtype=np.int64))
        out[name] = flat[at:at + count].reshape(shape)
        at += count
    for name, first in aliases.items():
        out[name] = out[first]
    return out


def _array_module(a):
    from convc.runtime.optim import array_module

    return array_module(a)


def _to_host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def split_validation(count: int, chunk: int, ranks: int, rank: int) -> list[tuple[int, int, int]]:
    """The validation chunks (number, start, stop) of `rank`: chunk j goes to rank j % ranks.

    Every rank computes the loss of whole chunks of `chunk` clips, as one process
    does, and the contributions are added in chunk order, so the validation loss
    is the one of a single process, whatever the number of ranks.
    """
    return [(j, start, min(start + chunk, count))
            for j, start in enumerate(range(0, count, chunk)) if j % ranks == rank]


__all__ = ["Fault", "Group", "NCCLGroup", "open_group", "wanted", "mpi_environment",
           "launched_size", "split_validation", "shard_bounds", "shard_weights",
           "combine_losses"]


def _mpi_type(dtype):
    from mpi4py.util.dtlib import from_numpy_dtype

    return from_numpy_dtype(np.dtype(dtype))
