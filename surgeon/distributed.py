"""Calibration and verification across processes with ``torch.distributed`` (gloo on CPU).

Run the CLI under ``torchrun`` (or call ``surgeon.optimize`` inside an initialised process group)::

    torchrun --nproc-per-node 2 -m surgeon optimize model/ --calib data.txt -o out/

Every rank materialises the same calibration list and computes the same seeded fit/check split from
it; each rank then keeps its strided share (``shard``: items ``rank, rank + world, …``), so the split
is the single-process one. What is computed from the data is combined with collectives:

    calibration   amax → MAX;  histogram range hi → MAX, then counts → SUM (bins aligned, exact);
                  sums of a calibratable (binary-P least squares) → SUM
    verification  Σ ref², Σ out², Σ ref·out, Σ err², Σ per-sample cosine, sample and batch counts,
                  Σ user metric → SUM;  max |err|, max |ref| → MAX;  min cosine → MIN

so every rank finalises the same scales and takes the same rollback decisions. Amax and histogram
counts equal the single-process values exactly; sums differ only by the order of float64 additions
(relative 1e-15 for the sizes used here). Fitting passes (norm-gate, flow-inverse, SmoothQuant) run
on the full fit list on every rank, seeded alike, and rank 0's fitted parameters are then broadcast
(``broadcast_module_state``) so that all ranks verify the same model. Only rank 0 writes ``OUTDIR``.

A rank that dies or stops answering makes every collective on the others fail within the process
group's timeout (``--dist-timeout``, default 300 s); that failure becomes ``PeerLost``, a one-line
error with exit code 5, instead of a hang.
"""

from __future__ import annotations

import atexit
import datetime
import math
import os
import re
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Sequence, TypeVar

import torch
from torch import Tensor, nn

from .errors import SurgeonError, first_line

__all__ = ["DEFAULT_TIMEOUT_S", "PeerLost", "init_from_env", "active", "rank", "world_size", "is_writer",
           "shard", "all_reduce", "all_reduce_optional", "all_gather_object", "broadcast_object",
           "broadcast_module_state", "barrier", "agree", "timeout_s", "leave"]

DEFAULT_TIMEOUT_S = 300.0
LEAVE_TIMEOUT_S = 10.0  # how long a rank waits at exit for its peers before it tears the group down
T = TypeVar("T")
_OPS = ("sum", "max", "min")
_timeout: float | None = None  # what init_from_env set; None when the caller built the group


class PeerLost(SurgeonError):
    """Another rank died or stopped answering within the timeout. Exit code 5."""

    exit_code = 5


def exit_after_peer_loss(code: int) -> None:
    """Leave the process now with ``code``, after a lost peer.

    A normal interpreter exit runs the process group's destructors while gloo's threads still wait
    on the dead peer; the C++ runtime then aborts (SIGABRT) and the documented exit code is lost. So
    flush what was printed and ``os._exit``."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def active() -> bool:
    """Whether a process group with more than one rank is initialised."""
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return _dist().get_world_size() if active() else 1


def is_writer() -> bool:
    """Whether this process writes outputs (rank 0, or the only process)."""
    return rank() == 0


def timeout_s() -> float | None:
    """The collective timeout ``init_from_env`` set (None when the caller initialised the group)."""
    return _timeout


def init_from_env(timeout: float | None = None) -> bool:
    """Join the ``torchrun`` job described by the environment, if there is one.

    With ``WORLD_SIZE > 1`` and no process group yet, initialise a gloo group (``env://``: MASTER_ADDR,
    MASTER_PORT, RANK, WORLD_SIZE) whose collectives give up after ``timeout`` seconds (default
    ``DEFAULT_TIMEOUT_S``). A group the caller initialised is used as it is. Returns ``active()``."""
    global _timeout
    dist = _dist()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return active()
    if not dist.is_available():
        raise SurgeonError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    t = DEFAULT_TIMEOUT_S if timeout is None else float(timeout)
    if not t > 0 or math.isinf(t):
        raise SurgeonError(f"distributed timeout must be a positive number of seconds, got {timeout}")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise SurgeonError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: launch "
                           "with torchrun (e.g. torchrun --nproc-per-node 2 -m surgeon optimize ...)")
    try:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=t))
    except Exception as exc:  # noqa: BLE001 - the rendezvous failing is one user-facing error
        raise PeerLost(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: could not join the process "
                       f"group at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {t:g} s: "
                       f"{first_line(exc, trim=True)}") from None
    _timeout = t
    atexit.register(leave)
    return active()


def leave() -> None:
    """Tear down the group ``init_from_env`` joined, every rank together, rank 0 last (run at exit)."""
    # Left to the interpreter's teardown, gloo's worker threads are destroyed while still joinable and
    # the process aborts ("terminate called without an active exception", exit -6) after a run that
    # succeeded; destroying the group joins them. (A rank that lost its peers leaves by os._exit.)
    # The ranks meet first: a rank that tears its group down while a peer's last message is still in
    # flight left that peer aborting the same way (seen once more in test_two_ranks_equal_one_process).
    # A monitored barrier has its own timeout, so a peer that is gone costs seconds, not a hang.
    # Rank 0 hosts the rendezvous store and leaves last: it waits until every peer has torn its group
    # down (a key each sets in the store), so no peer's teardown talks to a store that is gone (the
    # abort was seen a third time with the barrier alone, in a loaded CI run).
    dist = _dist()
    try:
        if dist.is_available() and dist.is_initialized():
            store = _store(dist)
            me, world = dist.get_rank(), dist.get_world_size()
            try:
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=LEAVE_TIMEOUT_S))
            except Exception:  # noqa: BLE001 - a peer already gone: destroy all the same
                pass
            if me == 0 and store is not None:
                try:
                    store.wait([f"surgeon/left/{r}" for r in range(1, world)], datetime.timedelta(seconds=LEAVE_TIMEOUT_S))
                except Exception:  # noqa: BLE001 - a peer gone without a word: leave all the same
                    pass
            dist.destroy_process_group()
            if me != 0 and store is not None:
                store.set(f"surgeon/left/{me}", "1")
    except Exception:  # noqa: BLE001 - nothing left to report to at exit
        pass


def _store(dist: Any) -> Any:
    """The default group's rendezvous store, or None where this torch keeps it elsewhere."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a private accessor: without it the ranks leave unordered
        return None


_LOST = re.compile(r"timed out|timeout|connection|closed|reset by peer|broken pipe|socket", re.IGNORECASE)


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a failed collective (peer gone, timeout) into a one-line ``PeerLost``."""
    try:
        yield
    except SurgeonError:
        raise
    except Exception as exc:  # noqa: BLE001 - gloo raises RuntimeError / DistBackendError / DistNetworkError
        if not _LOST.search(str(exc)):
            raise  # not a lost peer (a bug): keep the traceback
        # gloo's text: "[/path/pair.cc:537] Read error [addr]: Connection reset by peer. This is ..."
        cause = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first_line(exc, trim=True)).split(". This is typically")[0]
        t = f"timeout {_timeout:g} s" if _timeout is not None else "the process group's timeout"
        raise PeerLost(f"rank {rank()} of {world_size()}: another rank stopped responding during {what} ({t}): "
                       f"{cause}") from None


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: ``items[rank::world]`` (all of them without a process group)."""
    return list(items[rank()::world_size()]) if active() else list(items)


def all_reduce(t: Tensor, op: str = "sum", what: str = "a reduction") -> Tensor:
    """``op`` (sum | max | min) of ``t`` over all ranks, returned as a new tensor (``t`` untouched).

    Without a process group this is ``t`` itself. Every rank must call it with the same shape/dtype."""
    if op not in _OPS:
        raise ValueError(f"unknown reduction {op!r} (known: {', '.join(_OPS)})")
    if not active():
        return t
    dist = _dist()
    out = t.detach().clone().contiguous()
    with _collective(what):
        dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return out


_MAX_DIM = 8


def all_reduce_optional(t: Tensor | None, op: str = "max", what: str = "a reduction") -> Tensor | None:
    """Like ``all_reduce`` for a statistic some ranks may not have (None: their share never reached it).

    The ranks first agree on the shape (error if two ranks hold different shapes); a rank without the
    tensor contributes the identity of ``op`` (0 for sum, −inf for max, +inf for min). The result is
    float64 (cast back as needed); None when no rank has it."""
    if not active():
        return t
    if t is not None and t.dim() > _MAX_DIM:
        raise ValueError(f"statistics of more than {_MAX_DIM} dimensions are not supported")
    # header: [has, dim, shape..., -dim, -shape...] → MAX gives the largest shape and (negated) the
    # smallest among ranks that hold the tensor; equal only when all holders agree.
    head = torch.full((2 * (_MAX_DIM + 1) + 1,), -1, dtype=torch.int64)
    if t is not None:
        shape = [t.dim(), *t.shape] + [0] * (_MAX_DIM - t.dim())
        head[0] = 1
        head[1:_MAX_DIM + 2] = torch.tensor(shape)
        head[_MAX_DIM + 2:] = -torch.tensor(shape)
    else:
        head[_MAX_DIM + 2:] = -(2 ** 62)
    head = all_reduce(head, "max", what)
    if int(head[0]) < 1:
        return None
    hi, lo = head[1:_MAX_DIM + 2], -head[_MAX_DIM + 2:]
    if not torch.equal(hi, lo):
        raise SurgeonError(f"{what}: ranks hold statistics of different shapes "
                           f"({_shape(lo)} and {_shape(hi)}); every rank must run the same model")
    if t is None:
        t = torch.full(_shape(hi), {"sum": 0.0, "max": -math.inf, "min": math.inf}[op], dtype=torch.float64)
    # a rank without the tensor cannot know its dtype: reduce in float64 (exact for float32 values)
    return all_reduce(t.to(torch.float64), op, what)


def _shape(h: Tensor) -> tuple[int, ...]:
    return tuple(int(v) for v in h[1:1 + int(h[0])])


def all_gather_object(obj: Any, what: str = "a gather") -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    with _collective(what):
        _dist().all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0, what: str = "a broadcast") -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    with _collective(what):
        _dist().broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_module_state(modules: nn.Module | Sequence[nn.Module], src: int = 0,
                           what: str = "sharing fitted parameters") -> None:
    """Overwrite every parameter and buffer of ``modules`` with rank ``src``'s (same names and shapes
    on every rank are checked first)."""
    if not active():
        return
    if isinstance(modules, nn.Module):
        modules = [modules]
    tensors = [(f"{i}.{k}", v) for i, m in enumerate(modules) for k, v in m.state_dict(keep_vars=True).items()]
    layout = [(k, tuple(v.shape), str(v.dtype)) for k, v in tensors]
    theirs = broadcast_object(layout, src, what)
    if theirs != layout:
        diff = next((a for a, b in zip(layout, theirs) if a != b), layout[len(theirs)] if len(layout) > len(theirs)
                    else theirs[len(layout)])
        raise SurgeonError(f"{what}: rank {rank()} holds a different model than rank {src} (first difference: "
                           f"{diff[0]}); every rank must run the same model and passes")
    # one broadcast of all bytes: gloo has no float8 (quantized weights), and one message beats many
    datas = [v.data if isinstance(v, nn.Parameter) else v for _, v in tensors]
    parts = [d.detach().contiguous().reshape(-1).view(torch.uint8) for d in datas]
    buf = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    with _collective(what):
        _dist().broadcast(buf, src=src)
    offset = 0
    for d, p in zip(datas, parts):
        d.copy_(buf[offset:offset + p.numel()].view(d.dtype).reshape(d.shape))
        offset += p.numel()


def barrier(what: str = "waiting for the other ranks") -> None:
    """Wait for every rank (no-op without a process group)."""
    if active():
        with _collective(what):
            # a tiny all-reduce rather than dist.barrier(): gloo's barrier does not honour the timeout
            # on every torch version, an all-reduce does
            _dist().all_reduce(torch.zeros(1))


def agree(error: BaseException | None, what: str = "checking the inputs", order: int = 0) -> None:
    """Raise the same error on every rank when any rank had one.

    ``error`` is what this rank raised (None: nothing); among the ranks that had one, the lowest
    ``(order, rank)`` wins (``order``: e.g. the index of the bad batch, so that the message is the one a
    single process reading the batches in order would give). A ``SurgeonError`` is raised again with
    its message and exit code on every rank (``agreed_rank`` set: the CLI prints it on rank 0 only);
    any other exception is re-raised where it happened and reported by the others."""
    if not active():
        if error is not None:
            raise error
        return
    info = None if error is None else (order, type(error).__name__, str(error), isinstance(error, SurgeonError),
                                       getattr(error, "exit_code", 1))
    found = [(item, r) for r, item in enumerate(all_gather_object(info, what)) if item is not None]
    if error is not None and not isinstance(error, SurgeonError):
        raise error
    if not found:
        return
    (_, name, message, user, code), r = min(found, key=lambda f: (f[0][0], f[1]))
    exc = error if r == rank() and error is not None else SurgeonError(
        message if user else f"rank {r} of {world_size()} failed during {what}: {name}: {message}")
    if r != rank() and user:
        exc.exit_code = code  # type: ignore[misc]
    exc.agreed_rank = rank()  # type: ignore[attr-defined]  # the CLI prints an agreed error on rank 0 only
    raise exc
