"""Resource checks made before any work, and the atomic output directory.

Memory: ``check_memory(model, example_inputs, batches)`` estimates the run's peak and refuses with
``InsufficientMemory`` (exit code 4) when it exceeds what is available, instead of being OOM-killed
half way. The estimate is

    peak ≈ parameters × PARAM_COPIES + activations(largest batch) × ACTIVATION_COPIES + calibration data

* parameters: unique parameter and buffer storages of the model;
* ``PARAM_COPIES = 5``: the original (shared with the captured graph), the fitted copy, the rebuilt
  copy, the serialized ``model.pt2`` and, for ONNX targets, the exporter's model proto;
* activations: the peak of live tensor bytes during one forward on the example inputs (counted op by
  op under a dispatch mode), scaled to the largest calibration batch by its number of input elements
  and once more by the growth of its longest non-batch dimension (attention scores grow with the
  square of the sequence length);
* ``ACTIVATION_COPIES = 3``: the verifier runs the original and the candidate side by side while the
  calibration statistics are held;
* calibration data: the batches themselves (they are held in memory for the fit/check split).

Available memory is the smallest of ``MemAvailable`` (``/proc/meminfo``), the cgroup limit minus
current usage (``/sys/fs/cgroup/memory.max`` − ``memory.current``, or cgroup v1's
``memory.limit_in_bytes`` − ``memory.usage_in_bytes``), and ``SURGEON_MEMORY_LIMIT`` (bytes, or with a
K/M/G suffix: ``SURGEON_MEMORY_LIMIT=2G``), which a pipeline can set to keep surgeon within a budget.
Where none can be read (not Linux), the check is skipped.

Output directory: ``atomic_dir(OUTDIR, force)`` yields ``OUTDIR.partial-<pid>`` to write into and
publishes it with one rename at the end (with ``force``, an atomic exchange with the existing
``OUTDIR`` where the OS offers one, ``renameat2(RENAME_EXCHANGE)`` on Linux), so after a crash or a
SIGKILL ``OUTDIR`` is either absent, the old complete one, or the new complete one. What a killed run
leaves beside it (``OUTDIR.partial-<pid>``, ``OUTDIR.old-<pid>`` whose process is gone) is removed by
the next run writing the same ``OUTDIR``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InsufficientMemory, SurgeonError

__all__ = [
    "ACTIVATION_COPIES",
    "PARAM_COPIES",
    "MemoryEstimate",
    "atomic_dir",
    "available_memory",
    "check_memory",
    "check_output_dir",
    "clean_stale",
    "estimate_memory",
    "parse_bytes",
    "publish_mode",
]

PARAM_COPIES = 5
ACTIVATION_COPIES = 3
ENV_LIMIT = "SURGEON_MEMORY_LIMIT"
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


# --------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------
def publish_mode(path: str | os.PathLike) -> None:
    """Give a file written through ``tempfile.mkstemp`` (mode 0600) the mode ``open()`` would have:
    0666 less the process umask, like every other output in OUTDIR."""
    mask = os.umask(0)
    os.umask(mask)  # reading the umask means setting it: put it straight back
    os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def placed_file(outdir: str | os.PathLike, filename: str, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file in ``outdir`` (created if needed) that becomes ``outdir/filename`` (with the
    mode ``open()`` gives) when the block ends without error, and is removed otherwise: a reader
    never sees a partial file."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{Path(filename).stem}-", suffix=suffix, dir=str(out))
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish_mode(tmp)  # mkstemp made it 0600
        os.replace(tmp, out / filename)
    finally:
        if tmp.exists():
            tmp.unlink()


def parse_bytes(text: str) -> int:
    """``"2G"`` → 2147483648; plain numbers are bytes; K/M/G/T are powers of 1024."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise SurgeonError(f"{ENV_LIMIT}={text!r} is not a size (bytes, or a number with K, M, G or T)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _fmt(n: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) → None


def available_memory() -> tuple[int, str] | None:
    """``(bytes, where the figure comes from)``: the tightest of the env limit, the cgroup and the host."""
    found: list[tuple[int, str]] = []
    if os.environ.get(ENV_LIMIT):
        found.append((parse_bytes(os.environ[ENV_LIMIT]), ENV_LIMIT))
    for limit, usage, what in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "cgroup memory.max"),
                               ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                "/sys/fs/cgroup/memory/memory.usage_in_bytes", "cgroup memory.limit_in_bytes")):
        cap = _read_int(limit)
        if cap is not None and cap < 2**60:  # cgroup v1 writes a huge number for "no limit"
            found.append((max(0, cap - (_read_int(usage) or 0)), what))
            break
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except (OSError, ValueError, IndexError):
        pass
    return min(found) if found else None


@dataclass
class MemoryEstimate:
    """The parts of the estimated peak, in bytes."""

    parameters: int
    activations: int  # one forward at the largest batch, before ACTIVATION_COPIES
    data: int
    batch_scale: float

    @property
    def total(self) -> int:
        return self.parameters * PARAM_COPIES + self.activations * ACTIVATION_COPIES + self.data

    def describe(self) -> str:
        return (f"parameters {_fmt(self.parameters)} × {PARAM_COPIES} copies + activations {_fmt(self.activations)} "
                f"× {ACTIVATION_COPIES} + calibration data {_fmt(self.data)}")


def _tensors(value: Any) -> Iterator[Any]:
    import torch
    from torch.utils import _pytree as pytree

    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            yield leaf


def _storage_key(t: Any) -> tuple[int, int] | None:
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except Exception:  # noqa: BLE001 - tensors without storage (meta, sparse) take no memory we can count
        return None


def _parameter_bytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = _storage_key(t)
        if key is None or key[0] in seen:
            continue
        seen.add(key[0])
        total += key[1]
    return total


def _activation_peak(model: Any, inputs: Any) -> int | None:
    """Peak bytes of tensors alive at once during one no-grad forward (None if the forward fails).

    Every op's outputs are registered by storage; a storage stops counting when the last tensor seen
    holding it is garbage (weakref), so in-place ops and views do not count twice."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from .inputs import call

    inputs_keys = {k[0] for k in map(_storage_key, _tensors(inputs)) if k}
    param_keys = {k[0] for k in map(_storage_key, list(model.parameters()) + list(model.buffers())) if k}
    state = {"live": 0, "peak": 0}
    refs: dict[int, list] = {}  # data_ptr -> [live tensor count, bytes]

    def release(ptr: int) -> None:
        entry = refs.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] <= 0:
            state["live"] -= entry[1]
            del refs[ptr]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in _tensors(out):
                key = _storage_key(t)
                if key is None or key[0] == 0 or key[0] in inputs_keys or key[0] in param_keys:
                    continue
                entry = refs.get(key[0])
                if entry is None:
                    refs[key[0]] = entry = [0, key[1]]
                    state["live"] += key[1]
                    state["peak"] = max(state["peak"], state["live"])
                entry[0] += 1
                weakref.finalize(t, release, key[0])
            return out

    try:
        with torch.no_grad(), Count():
            out = call(model, inputs)
        del out
    except Exception:  # noqa: BLE001 - a model that fails here fails again in capture, with a better message
        return None
    return state["peak"]


def _numel(inputs: Any) -> int:
    return sum(int(t.numel()) for t in _tensors(inputs))


def _longest(inputs: Any) -> int:
    return max((max(t.shape[1:], default=1) for t in _tensors(inputs) if t.dim() > 1), default=1)


def estimate_memory(model: Any, example_inputs: Any, batches: Iterable[Any] | None = None) -> MemoryEstimate:
    """Estimate the run's peak memory (see the module docstring)."""
    batches = list(batches) if batches is not None else []
    params = _parameter_bytes(model)
    peak = _activation_peak(model, example_inputs) or 0
    base_numel, base_long = max(1, _numel(example_inputs)), max(1, _longest(example_inputs))
    scale = 1.0
    data = 0
    for b in batches:
        data += sum(int(t.numel()) * t.element_size() for t in _tensors(b))
        s = _numel(b) / base_numel * max(1.0, _longest(b) / base_long)
        scale = max(scale, s)
    return MemoryEstimate(params, int(peak * scale), data, scale)


def check_memory(model: Any, example_inputs: Any, batches: Iterable[Any] | None = None) -> MemoryEstimate | None:
    """Refuse (``InsufficientMemory``, exit code 4) a run whose estimated peak exceeds available memory."""
    avail = available_memory()
    if avail is None:
        return None
    est = estimate_memory(model, example_inputs, batches)
    if est.total > avail[0]:
        hint = ("use smaller calibration batches (fewer sentences or samples per batch)" if est.batch_scale > 1
                else "run on a machine with more memory")
        raise InsufficientMemory(f"would not fit in memory: estimated peak {_fmt(est.total)} ({est.describe()}) "
                                 f"exceeds the {_fmt(avail[0])} available ({avail[1]}); {hint}")
    return est


# --------------------------------------------------------------------------------------------------
# output directory
# --------------------------------------------------------------------------------------------------
def check_output_dir(out: Path, force: bool) -> None:
    """Refuse, before any work, an OUTDIR that exists (without ``force``) or cannot be created."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SurgeonError(f"output path '{out}' exists and is not a directory")
    if out.exists() and not force:
        raise SurgeonError(f"output directory '{out}' already exists (use --force to replace it)")
    if out.exists() and os.path.ismount(out):  # a container volume, say: it cannot be renamed away (EBUSY)
        raise SurgeonError(f"cannot replace output directory '{out}': it is a mount point, and --force replaces "
                           f"OUTDIR as a whole; give a directory inside it (e.g. '{out / 'out'}')")
    anchor = out.absolute().parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise SurgeonError(f"cannot write output directory '{out}': '{anchor}' is not a directory")
    try:  # what matters is whether a directory can be made there (root ignores modes; mounts may be read-only)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=str(anchor)))
    except OSError as exc:
        raise SurgeonError(f"cannot write output directory '{out}': '{anchor}' is not writable "
                           f"({exc.strerror or exc})") from None


_STALE = re.compile(r"^(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier save in this process that was interrupted
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[str]:
    """Remove ``OUTDIR.partial-<pid>`` / ``OUTDIR.old-<pid>`` left by killed runs; returns their names.

    An ``OUTDIR.old-<pid>`` with no ``OUTDIR`` is a previous complete output caught between the two
    renames of a replacement (systems without an atomic exchange): it is put back first."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    removed = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _STALE.match(p.name)
        if not m or m.group("name") != out.name or _alive(int(m.group("pid"))):
            continue
        if m.group("kind") == "old" and not out.exists():
            with contextlib.suppress(OSError):
                p.rename(out)
                continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(partial: Path, out: Path) -> None:
    if not out.exists():
        partial.rename(out)
        return
    if _exchange(partial, out):
        shutil.rmtree(partial, ignore_errors=True)  # now holds the old output
        return
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    out.rename(old)
    try:
        partial.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield ``OUTDIR.partial-<pid>``; on success it becomes ``OUTDIR`` in one step, on error it is removed."""
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    partial = out.parent / f"{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        if out.exists() and not force:  # appeared while we worked
            raise SurgeonError(f"output directory '{out}' already exists (use --force to replace it)")
        _publish(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
