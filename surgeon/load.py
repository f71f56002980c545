"""Model loading (being written): see issue 2 §2."""

from __future__ import annotations


def load(spec, **kwargs):  # noqa: ANN001, ANN201
    raise NotImplementedError("surgeon.load is being written")
