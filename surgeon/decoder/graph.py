"""The decoder step as an fx graph, so the registry's graph passes (``linear-quant``, …) run on a causal
LM the way they run on every other model: capture a :class:`~surgeon.decoder.step.DecoderStep` with
``torch.export`` (batch, new length and past length dynamic), run the pass manager and calibration of
``surgeon.pipeline.fit`` on it, and wrap the result as a :class:`GraphStep`, which the guard, the
target and ``surgeon.decoder.generate`` use exactly as they use a ``DecoderStep``.

The capture is exported at past and new lengths ≥ 2 (torch.export specialises 0 and 1); the input
range check ``ExportedProgram.module`` installs is removed, since the graph computes prefill (past 0)
and decode (new 1) the same way (tests/test_decoder_passes.py compares it with the step at both).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import fx, nn

from .generate import left_pad
from .step import CacheFormat, CacheGeometry, DecoderStep

__all__ = ["GraphStep", "capture_step", "step_batches"]


def _dims(layers: int) -> tuple[Any, ...]:
    d = torch.export.Dim.DYNAMIC
    return ({0: d, 1: d}, {0: d, 1: d}, {0: d, 1: d}, tuple({0: d, 2: d} for _ in range(2 * layers)))


def _example(step: DecoderStep, batch: int = 2, past: int = 3, new: int = 4) -> tuple[torch.Tensor, ...]:
    """Inputs with ``past`` cached tokens (the step's own cache of them) and ``new`` new ones."""
    g = torch.Generator().manual_seed(0)
    total = past + new
    ids = torch.randint(0, step.vocab_size, (batch, total), generator=g)
    mask = torch.ones(batch, total, dtype=torch.long)
    pos = mask.cumsum(-1) - 1
    with torch.no_grad():
        cache = step(ids[:, :past], mask[:, :past], pos[:, :past], *step.empty_past(batch))[1:]
    return (ids[:, past:], mask, pos[:, past:], *cache)


def capture_step(step: DecoderStep) -> fx.GraphModule:
    """``step`` as a GraphModule taking and returning what the step takes and returns."""
    from torch.export._unlift import _check_input_constraints_pre_hook

    from ..errors import CaptureError, first_line, quiet

    step.eval()
    try:
        with quiet(output=True):
            ep = torch.export.export(step, _example(step), dynamic_shapes=_dims(step.geometry.layers), strict=False)
    except Exception as exc:  # noqa: BLE001 - any capture failure is the model's, named in one line
        raise CaptureError(f"cannot capture the decoder step of {type(step.lm).__name__} as a graph: "
                           f"{first_line(exc)}") from exc
    gm = ep.module(check_guards=False)
    for key, hook in list(gm._forward_pre_hooks.items()):
        if hook is _check_input_constraints_pre_hook:  # past 0 / new 1 are in range for the graph
            del gm._forward_pre_hooks[key]
    return gm


class GraphStep(nn.Module):
    """A captured (and possibly rewritten) decoder step with what the guard, the target and the
    generation loop read from a ``DecoderStep``: its cache geometry and format, vocabulary, empty past."""

    def __init__(self, gm: fx.GraphModule, step: DecoderStep) -> None:
        super().__init__()
        self.gm = gm
        self.geometry: CacheGeometry = step.geometry
        self.cache_format: CacheFormat | None = step.cache_format
        self.cache_dtype = step.cache_dtype
        self.vocab_size = step.vocab_size
        self._empty_past = step.empty_past

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        return self._empty_past(batch)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.gm(input_ids, attention_mask, position_ids, *past))


def step_batches(step: DecoderStep, token_lists: Sequence[Sequence[int]], pad_id: int,
                 size: int = 8) -> list[tuple[torch.Tensor, ...]]:
    """Prefill batches (left-padded, empty past) of ``token_lists``, by length (less padding to run):
    the graph's calibration inputs."""
    out = []
    token_lists = sorted(token_lists, key=len)
    for i in range(0, len(token_lists), size):
        chunk = [list(x) for x in token_lists[i:i + size] if x]
        if not chunk:
            continue
        ids, mask = left_pad(chunk, pad_id)
        m = torch.from_numpy(mask)
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        out.append((torch.from_numpy(ids), m, pos, *step.empty_past(len(chunk))))
    return out
