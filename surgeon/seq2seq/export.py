"""Capture and export the three parts of an encoder-decoder (``surgeon.seq2seq.parts``) to ONNX.

Each part is captured with ``torch.export`` first (batch, lengths and the past dynamic) and the
GraphModule handed to ``targets.onnx.export_onnx``: the exporter then sees the graph in the forms
``targets/_export_form`` rewrites for it (T5's attention output, reshaped after a transpose, fails to
export from the module itself). The examples use lengths ≥ 2 (torch.export specialises 0 and 1); the
input range check ``ExportedProgram.module`` installs is removed, since one new token (decode) is
computed the same way (the verification runs the files at other lengths)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import fx, nn

from ..errors import CaptureError, first_line, quiet
from .parts import DecoderFirst, DecoderWithPast, EncoderPart, decoder_input_names, decoder_output_names
from .runner import DECODER_FILE, DECODER_WITH_PAST_FILE, ENCODER_FILE

__all__ = ["ENCODER_FILE", "DECODER_FILE", "DECODER_WITH_PAST_FILE", "FILES", "capture", "export_parts"]

FILES = (ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE)


def capture(part: nn.Module, example: tuple[torch.Tensor, ...], dims: Any, what: str) -> fx.GraphModule:
    """``part`` as a GraphModule (``torch.export``, non-strict), without the input range check."""
    from torch.export._unlift import _check_input_constraints_pre_hook

    part.eval()
    try:
        with quiet(output=True):
            ep = torch.export.export(part, example, dynamic_shapes=dims, strict=False)
    except Exception as exc:  # noqa: BLE001 - any capture failure is the model's, named in one line
        raise CaptureError(f"cannot capture the {what} as a graph: {first_line(exc)}") from exc
    gm = ep.module(check_guards=False)
    for key, hook in list(gm._forward_pre_hooks.items()):
        if hook is _check_input_constraints_pre_hook:
            del gm._forward_pre_hooks[key]
    return gm


_SRC, _TGT, _PAST = "encoder_sequence_length", "decoder_sequence_length", "past_decoder_sequence_length"


def _axis_names(name: str, file: str) -> list[str | None]:
    """Optimum's axis names for a tensor of ``file`` (None: a static axis, left alone)."""
    if name.startswith(("past_key_values.", "present.")):
        if ".encoder." in name:
            length = _SRC
        elif name.startswith("past_key_values."):
            length = _PAST
        else:
            length = f"{_PAST} + {_TGT}" if file == DECODER_WITH_PAST_FILE else _TGT
        return ["batch", None, length, None]
    if file == ENCODER_FILE or name.startswith("encoder_"):
        return ["batch", _SRC, None]
    return ["batch", _TGT, None]  # the decoder's input_ids and logits


def name_axes(path: Path) -> None:
    """Give the dynamic axes of the file's inputs and outputs Optimum's names: the exporter names them
    after its own symbols, and two axes of one name (the encoder's and the decoder's lengths were both
    ``sequence``) tell onnxruntime they are equal."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for vi in list(model.graph.input) + list(model.graph.output):
        for d, n in zip(vi.type.tensor_type.shape.dim, _axis_names(vi.name, path.name)):
            if n is not None and d.dim_param:
                d.dim_param = n
    onnx.save_model(model, str(path))


def _examples(model: nn.Module, layers: int, vocab: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -1] = 0  # a padded row: the mask is an input, not a constant
    dec = torch.randint(0, vocab, (2, 4), generator=g)
    with torch.no_grad():
        hidden = EncoderPart(model)(ids, mask)
        present = DecoderFirst(model, layers)(dec, hidden, mask)[1:]
    return (ids, mask), (dec, hidden, mask), (dec[:, :2], mask, *present)


def export_parts(model: nn.Module, layers: int, vocab: int, outdir: str | os.PathLike, *, opset: int,
                 names: Sequence[str] = FILES) -> dict[str, Path]:
    """Write the encoder, first-step decoder and with-past decoder files of ``model`` into ``outdir``."""
    from targets.onnx import export_onnx

    batch, src = torch.export.Dim("batch"), torch.export.Dim("encoder_sequence_length")
    # the new length unnamed: the attention mask code guards new != past, which holds for the graph either way
    tgt, past = torch.export.Dim.DYNAMIC, torch.export.Dim("past_decoder_sequence_length")
    # one symbol per axis, shared by every tensor on it: the exporter proves the cache's heads and lengths
    # agree only where the capture says they are the same symbol
    ids, enc = {0: batch, 1: src}, {0: batch, 1: src}
    dec = {0: batch, 1: tgt}
    cache = tuple({0: batch, 2: past if (j // 2) % 2 == 0 else src} for j in range(4 * layers))
    enc_ex, first_ex, past_ex = _examples(model, layers, vocab)
    parts = [
        (EncoderPart(model), enc_ex, (ids, enc), ["input_ids", "attention_mask"], ["last_hidden_state"], "encoder"),
        (DecoderFirst(model, layers), first_ex, (dec, {0: batch, 1: src}, enc), decoder_input_names(layers, False),
         decoder_output_names(layers, False), "decoder's first step"),
        (DecoderWithPast(model, layers), past_ex, (dec, enc, cache), decoder_input_names(layers, True),
         decoder_output_names(layers, True), "decoder step with its past"),
    ]
    out: dict[str, Path] = {}
    for name, (part, example, dims, ins, outs, what) in zip(names, parts):
        gm = capture(part, example, dims, what)
        path = Path(outdir) / name
        flat = tuple(d for group in dims for d in (group if isinstance(group, tuple) else (group,)))
        export_onnx(gm, example, path, dynamic_shapes=flat, input_names=ins, output_names=outs, opset=opset)
        name_axes(path)
        out[name] = path
    return out
