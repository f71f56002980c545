"""The output directory: checked before any work, written atomically.

``atomic_dir(OUTDIR, force)`` yields ``OUTDIR.partial-<pid>`` to write into and
publishes it with one rename at the end (with ``force``, an atomic exchange with the existing
``OUTDIR`` where the OS offers one, ``renameat2(RENAME_EXCHANGE)`` on Linux), so after a crash or a
SIGKILL ``OUTDIR`` is either absent, the old complete one, or the new complete one. What a killed run
leaves beside it (``OUTDIR.partial-<pid>``, ``OUTDIR.old-<pid>`` whose process is gone) is removed by
the next run writing the same ``OUTDIR``.

``placed_file`` does the same for one file written into a directory (``publish_mode`` gives it the
mode ``open()`` would have).
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
from collections.abc import Iterator
from pathlib import Path

from .errors import SurgeonError

__all__ = ["atomic_dir", "check_output_dir", "clean_stale", "data_file", "file_bytes", "placed_file", "publish_mode"]


def publish_mode(path: str | os.PathLike) -> None:
    """Give a file written through ``tempfile.mkstemp`` (mode 0600) the mode ``open()`` would have:
    0666 less the process umask, like every other output in OUTDIR."""
    mask = os.umask(0)
    os.umask(mask)  # reading the umask means setting it: put it straight back
    os.chmod(path, 0o666 & ~mask)


def data_file(path: str | os.PathLike) -> Path:
    """The external-data file that belongs to the ONNX file ``path``, whether or not it exists (an ONNX
    file past protobuf's 2 GB keeps its weights in ``model.onnx.data``: ``targets/_external_data.py``)."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def file_bytes(path: str | os.PathLike) -> int:
    """Bytes of an output file with its external data file, when it has one (an OpenVINO IR's
    ``model.xml`` keeps its weights in ``model.bin``)."""
    data = Path(path).with_suffix(".bin") if Path(path).suffix == ".xml" else data_file(path)
    return Path(path).stat().st_size + (data.stat().st_size if data.exists() else 0)


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
    removed: list[str] = []
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
