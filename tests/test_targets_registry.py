"""The target registry: every target has a profile, a description and a format; each can time the
file it writes; onnx-int8's verify reads ORT's optimized graph against the profile's requirements."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from surgeon.capture import capture  # noqa: E402
from surgeon.errors import SurgeonError  # noqa: E402
from surgeon.profile import KEEP, ORT_CPU_INT8, Profile  # noqa: E402
from surgeon.registry import discover, pass_classes, target_objects  # noqa: E402
from surgeon.targets import TARGETS, Target, check_target, get_target, register, registered, unregister, write_target  # noqa: E402


def test_registered_targets_are_described() -> None:
    assert registered()[0] == "torch" and set(TARGETS) <= set(registered())
    for name in registered():
        t = get_target(name)
        assert isinstance(t, Target) and t.name == name
        assert t.format in ("pt2", "onnx", "openvino-ir") and t.runtime == t.profile.runtime
        assert t.description and "\n" not in t.description
        assert t.default_passes and t.filename.endswith("." + {"openvino-ir": "xml"}.get(t.format, t.format))
        assert isinstance(t.profile, Profile) and t.profile.ladders
        for kind in t.profile.kinds():
            assert t.profile.formats(kind)[-1] == KEEP
        assert t.profile.formats("no-such-kind") == (KEEP,)
        hash(t.profile)  # frozen and hashable
    assert get_target("onnx-int8").default_passes == "linear-quant{dtype=int8}"
    assert get_target("onnx-fp8").default_passes == "attention-fp8,linear-quant{dtype=fp8}"
    assert get_target("torch").default_passes == get_target("onnx").default_passes == "attention-fp8"
    assert [n for n in registered() if get_target(n).needs_passes] == ["onnx-fp8", "onnx-int8", "onnx-int8-vnni",
                                                                        "openvino-int8"]
    assert get_target("onnx-int8").profile.int8_weight_bits == 7 and get_target("onnx-int8-vnni").profile.int8_weight_bits == 8


def test_check_target_message() -> None:
    with pytest.raises(SurgeonError) as info:
        check_target("nope")
    assert str(info.value) == ("unknown target 'nope' (known: torch, onnx, onnx-fp8, onnx-int8, onnx-int8-vnni, "
                               "onnx-decoder, onnx-seq2seq, openvino-int8)")
    with pytest.raises(SurgeonError):
        get_target("nope")


def test_register_and_unregister_like_passes() -> None:
    """Targets register as passes do (surgeon.registry): an object or "module:attr", refused twice, removable."""
    import dataclasses

    import surgeon.passes

    twin = dataclasses.replace(get_target("onnx"), name="onnx-twin")
    register("onnx-twin", twin)
    try:
        assert registered()[-1] == "onnx-twin" and get_target("onnx-twin") is twin
        with pytest.raises(SurgeonError, match=r"^target 'onnx-twin' is already registered"):
            register("onnx-twin", "surgeon.targets.onnx_targets:ONNX")
    finally:
        unregister("onnx-twin")
    assert "onnx-twin" not in registered()
    with pytest.raises(SurgeonError, match=r"^unknown target 'onnx-twin' \(known: torch, "):
        unregister("onnx-twin")
    with pytest.raises(SurgeonError, match="must be written 'module:attr'"):
        register("x", "no-colon")
    with pytest.raises(SurgeonError, match="expected a Target"):
        register("x", object())
    register("misnamed", "surgeon.targets.onnx_targets:ONNX")  # resolved lazily: checked on first use
    try:
        with pytest.raises(SurgeonError, match="is not the Target 'misnamed'"):
            get_target("misnamed")
    finally:
        unregister("misnamed")
    with pytest.raises(SurgeonError, match=r"^unknown pass 'onnx' \(known: attention-fp8, "):
        surgeon.passes.unregister("onnx")  # the same messages, the same mechanism


def test_discovery_reads_sources_in_one_order(tmp_path: Path) -> None:
    (tmp_path / "b_mod.py").write_text('A = MyTarget(name="alpha")\nB = MyTarget(name="beta")\nC = other(name="no")\n')
    (tmp_path / "a_mod.py").write_text('T = MyTarget(name="zeta")\n')
    (tmp_path / "_private.py").write_text('P = MyTarget(name="hidden")\n')
    (tmp_path / "c_pass.py").write_text('class P(Pass):\n    name: ClassVar[str] = "p"\n')
    found = discover("target", tmp_path, "pkg", target_objects)
    assert found == {"alpha": "pkg.b_mod:A", "beta": "pkg.b_mod:B", "zeta": "pkg.a_mod:T"}
    assert list(discover("target", tmp_path, "pkg", target_objects, first=("zeta",))) == ["zeta", "alpha", "beta"]
    assert discover("pass", tmp_path, "pkg", pass_classes) == {"p": "pkg.c_pass:P"}
    (tmp_path / "d_mod.py").write_text('X = MyTarget(name="alpha")\n')
    with pytest.raises(SurgeonError, match="target 'alpha' is defined twice: pkg.b_mod:A and pkg.d_mod:X"):
        discover("target", tmp_path, "pkg", target_objects)


def test_profile_refuses_a_ladder_without_keep() -> None:
    with pytest.raises(ValueError, match="must end in 'keep'"):
        Profile(runtime="r", machine="m", ladders={"linear": ("int8",)})
    # ORT CPU: the fused dynamic kernel first, the outlier split next, the calibrated scale last
    assert ORT_CPU_INT8.ladder_map["linear"] == ("int8-dynamic", "int8-dynamic-outliers", "int8-static", "keep")
    assert ORT_CPU_INT8.speed_of("int8-dynamic") == 1.0 > ORT_CPU_INT8.speed_of("int8-static")
    assert ORT_CPU_INT8.to_json()["int8_weight_bits"] == 7


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("name", ["torch", "onnx"])
def test_time_returns_a_positive_median(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tiny().eval()
    x = (torch.randn(2, 3, 8),)
    target = get_target(name)
    path = write_target(name, capture(model, x).gm, tmp_path, example_inputs=x, original=model)
    assert path.name == target.filename and path.exists()
    t = target.time(path, x, runs=3)
    assert t["median_ms"] > 0 and t["runs"] == 3 and t["threads"] == 2
    assert t["batch"] == {"arg0": [2, 3, 8]}
    v = target.verify(path, model, (torch.randn(5, 3, 8),))  # another batch size: the file is dynamic
    assert v["max_abs_diff"] <= 1e-4


def test_int8_verify_reports_the_fused_integer_kernels(tmp_path: Path) -> None:
    from surgeon.calibration import calibrate
    from surgeon.pass_manager import PassContext
    from surgeon.passes.linear_quant import LinearQuant

    torch.manual_seed(0)
    model = Tiny().eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 6, 8, generator=g),) for _ in range(4)]  # 3-d: ORT fuses (2-d becomes Gemm)
    p = LinearQuant(dtype="int8")
    ctx = PassContext()
    gm = p.call(capture(model, batches[0]).gm, ctx).gm
    calibrate(gm, batches[:3], progress=False)
    p.fit(gm, ctx, batches[:3])
    target = get_target("onnx-int8")
    path = write_target("onnx-int8", gm, tmp_path, example_inputs=batches[0], original=model)
    v = target.verify(path, gm, batches[3])
    assert v["ort_cpu"] == {"integer_kernels": 2, "float_matmul_after_dequantize": 0}
    assert [c["requirement"] for c in v["graph_requirements"]] == list(target.profile.graph_requirements)
    assert v["graph_requirements_met"] is True
    assert v["max_abs_diff"] <= 1e-4
    t = target.time(path, batches[3], runs=3)
    assert t["median_ms"] > 0 and t["intra_op_spinning"] is False
