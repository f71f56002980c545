"""ONNX files past protobuf's 2 GB limit: the weights as external data beside the graph.

A proto over 2 GB cannot be serialized (``EncodeError: Failed to serialize proto``), so a model whose
tensors exceed ``EXTERNAL_DATA_THRESHOLD`` is written as a pair: ``model.onnx`` (the graph, tensors
referring to their offsets) and ``model.onnx.data`` (every tensor over 1 KiB, in one file), the layout
``onnx.save_model(save_as_external_data=True, all_tensors_to_one_file=True)`` writes and onnxruntime
and ``onnx.load`` read from the file's directory. Smaller models stay one file.

``placed_onnx`` writes the pair under a temporary directory inside OUTDIR and renames the data file,
then the graph, into place: the graph names its data file by a path relative to itself, so the pair is
written under its final names, and a reader who sees the new ``model.onnx`` finds its data there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from surgeon.resources import data_file
from surgeon.resources import file_bytes as onnx_bytes

__all__ = ["EXTERNAL_DATA_THRESHOLD", "data_file", "onnx_bytes", "placed_onnx", "save_onnx", "tensor_bytes"]

# below protobuf's 2 GiB with room for the graph itself (names, shapes, attributes); tests patch it
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
_MIN_EXTERNAL_TENSOR = 1024  # smaller tensors (shapes, scalars) stay inline, where shape inference reads them


def tensor_bytes(model: Any) -> int:
    """Bytes of the model's initializers and constant tensors held in the proto (what external data
    would move out), counted without serializing it (which fails past 2 GB)."""
    from onnx import external_data_helper

    return sum(t.ByteSize() for t in external_data_helper._get_all_tensors(model))


def save_onnx(model: Any, path: str | os.PathLike) -> Path:
    """Write ``model`` (a ``ModelProto``) to ``path``, its tensors in ``data_file(path)`` when they
    exceed ``EXTERNAL_DATA_THRESHOLD``; a stale data file of an earlier write is removed first (onnx
    appends to an existing one) or when the model is written as one file."""
    import onnx

    path = Path(path)
    data = data_file(path)
    data.unlink(missing_ok=True)
    if tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=_MIN_EXTERNAL_TENSOR)
    else:
        onnx.save_model(model, str(path))
    return path


@contextlib.contextmanager
def placed_onnx(outdir: str | os.PathLike, filename: str) -> Iterator[Path]:
    """A path named ``filename`` in a temporary directory inside ``outdir``; when the block ends without
    error, the file (and its external data, when written) replace ``outdir/filename`` (and its data
    file); otherwise nothing of them is left."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{Path(filename).stem}-", suffix=".onnx.tmp", dir=str(out)))
    try:
        tmp = tmpdir / filename
        yield tmp
        data = data_file(tmp)
        external = data.exists()
        if external:  # data first: a reader of the new graph finds its data
            os.replace(data, data_file(out / filename))
        os.replace(tmp, out / filename)  # (open() gave both files their mode; mkdtemp's 0700 is the directory's)
        if not external:  # a one-file model replaced a pair: its old data is nobody's now
            data_file(out / filename).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
