"""The ``onnx-seq2seq`` target: an encoder-decoder (BART, T5, Marian ``…ForConditionalGeneration``) as
the three files inference servers run, in Hugging Face Optimum's layout and names:
``encoder_model.onnx``, ``decoder_model.onnx`` (the first step, which also returns the cross-attention
keys/values) and ``decoder_with_past_model.onnx`` (later steps), for ONNX Runtime's CPU provider.

``lower(model, None, outdir)`` captures and exports the three parts (``surgeon.seq2seq.export``) and
runs ``onnx.checker`` on each; the pipeline (``surgeon.seq2seq.pipeline``) verifies them together
(``surgeon.seq2seq.check``). No pass runs yet: the files hold the model's fp32 weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgeon import profile as _profile
from surgeon.errors import SurgeonError

from ._base import ModelKind, Target
from ._cleanup import all_nodes
from ._external_data import onnx_bytes

__all__ = ["ONNX_SEQ2SEQ", "OnnxSeq2SeqTarget"]


@dataclass(frozen=True)
class OnnxSeq2SeqTarget(Target):
    """``OUTDIR/encoder_model.onnx`` + ``decoder_model.onnx`` + ``decoder_with_past_model.onnx``."""

    model_kind: ModelKind = "encoder-decoder"

    @property
    def opset(self) -> int:
        from ._lowering import OPSET

        return self.profile.onnx_opset or OPSET

    def unmet_promise(self, module: Any) -> str | None:
        return None  # fp32 files: nothing is promised beyond the model itself

    def session_config(self, path: str | os.PathLike) -> dict[str, str]:
        from ._ort_session import session_config

        return session_config(path)

    def lower(self, module: Any, example_inputs: Any, outdir: str | os.PathLike, **kw: Any) -> dict[str, Any]:
        """Export the three files of the ``…ForConditionalGeneration`` ``module`` into ``outdir`` (which
        the caller places atomically) and check each; return their figures by file name."""
        import onnx

        from surgeon.seq2seq.export import export_parts

        paths = export_parts(module, kw["layers"], kw["vocab"], outdir, opset=self.opset)
        figures: dict[str, Any] = {}
        for name, path in paths.items():
            try:
                onnx.checker.check_model(str(path), full_check=True)
            except Exception as exc:  # noqa: BLE001
                raise SurgeonError(f"onnx.checker rejected {name}: {' '.join(str(exc).split())[:300]}") from exc
            model = onnx.load(str(path), load_external_data=False)
            figures[name] = {"bytes": onnx_bytes(path), "opset": self.opset,
                             "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output],
                             "ops": sorted({n.op_type for n in all_nodes(model.graph)})}
        return {"target": self.name, "files": figures, "path": str(Path(outdir))}

    def verify(self, path: str | os.PathLike, module: Any, inputs: Any, **kw: Any) -> dict[str, Any]:
        raise SurgeonError("onnx-seq2seq files are verified together by surgeon optimize / export "
                           "(surgeon.seq2seq.check.verify_files), not one by one")


ONNX_SEQ2SEQ = OnnxSeq2SeqTarget(
    name="onnx-seq2seq", format="onnx", runtime=_profile.ORT_CPU.runtime, profile=_profile.ORT_CPU,
    description="an encoder-decoder (BART, T5, Marian) as encoder + decoder + decoder-with-past files "
                "(Optimum's names, fp32, no pass yet), for inference servers; surgeon generate runs them",
    default_passes="none", filename="encoder_model.onnx")  # "none": no pass runs yet (stated, not parsed)
