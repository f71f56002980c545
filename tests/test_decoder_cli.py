"""onnx-decoder's bad input on the command line: one line on stderr, exit code 2, no OUTDIR left
behind (the encoder-decoder case in a fresh ``python -m surgeon`` process, the rest in-process); and a
``package.module:factory`` returning a Hugging Face causal LM (with its tokenizer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from _cli import run_cli
from _decoder_models import save_lm
from onnx import TensorProto, helper


@pytest.fixture(scope="module")
def lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    return {k: save_lm(k, root / k, steps=0) for k in ("t5", "mistral-sliding", "gpt2")}


def test_encoder_decoder_is_refused_in_a_fresh_process(lms: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "surgeon", "optimize", str(lms["t5"]), "-o", str(out),
                           "--target", "onnx-decoder"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"surgeon: error: '{lms['t5']}' is an encoder-decoder (T5ForConditionalGeneration): onnx-decoder captures "
        "decoder-only causal LMs (their self-attention key/value cache); an encoder-decoder's cross-attention cache "
        "is not expressed")
    assert not out.exists()


def test_a_non_standard_cache_is_named(lms: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(["optimize", str(lms["mistral-sliding"]), "-o", str(out), "--target", "onnx-decoder"], capsys)
    assert code == 2
    assert err.strip() == (
        f"surgeon: error: the cache of '{lms['mistral-sliding']}' (MistralForCausalLM) is a DynamicCache with "
        "DynamicSlidingWindowLayer layers: onnx-decoder captures only the standard key/value cache (a DynamicCache "
        "of DynamicLayer tensors)")
    assert not out.exists()


@pytest.mark.parametrize("spec,message", [
    ("kv-cache-quant{dtype=int4}", "option kv-cache-quant.dtype=int4 is not one of int8, fp8"),
    ("kv-cache-quant{granularity=block}", "option kv-cache-quant.granularity=block is not one of tensor, head"),
    ("kv-cache-quant{bits=4}", "unknown option 'bits' for pass 'kv-cache-quant' (options: dtype, granularity, "
                               "centre_keys)"),
    # graph passes (linear-quant, …) run on the captured step (tests/test_decoder_passes.py); the cache is one site
    ("kv-cache-quant,kv-cache-quant{dtype=fp8}", "target onnx-decoder runs one cache pass (the cache is the "
                                                 "decoder's one cache site); got kv-cache-quant, kv-cache-quant"),
])
def test_bad_pass_options(spec: str, message: str, lms: dict[str, Path], tmp_path: Path,
                          capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["optimize", str(lms["gpt2"]), "-o", str(tmp_path / "out"), "--target", "onnx-decoder",
                            "--passes", spec], capsys)
    assert (code, err.strip()) == (2, f"surgeon: error: {message}")
    assert not (tmp_path / "out").exists()


def test_bad_tolerance(lms: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["optimize", str(lms["gpt2"]), "-o", str(tmp_path / "out"), "--target", "onnx-decoder",
                            "--tolerance", "cosine_mean=0.99"], capsys)
    assert code == 2
    assert err.strip() == ("surgeon: error: cannot parse decoder tolerance 'cosine_mean=0.99': give ppl_increase=X "
                           "and/or agreement=Y (e.g. ppl_increase=0.01,agreement=0.95; margin=0 judges as measured)")


def test_generate_refuses_what_is_not_a_decoder_outdir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["generate", str(tmp_path), "--prompt", "hi"], capsys)
    assert code == 2
    assert err.strip() == (f"surgeon: error: '{tmp_path}' is not a decoder OUTDIR: it has no model.onnx (write one "
                           "with surgeon optimize LM_DIR --target onnx-decoder -o OUTDIR)")
    x = helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["last_hidden_state"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21)]),
              str(tmp_path / "model.onnx"))
    code, _, err = run_cli(["generate", str(tmp_path), "--prompt", "hi"], capsys)
    assert code == 2
    assert err.strip() == (f"surgeon: error: '{tmp_path}' is not a decoder OUTDIR: its model.onnx has no "
                           "past_key_values.<i>.key inputs (write one with surgeon optimize LM_DIR --target "
                           "onnx-decoder -o OUTDIR)")


FACTORY = '''
import transformers


def build():
    path = {path!r}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return model, transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
'''


def test_factory_returning_a_causal_lm(lms: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "my_lm.py").write_text(FACTORY.format(path=str(lms["gpt2"])))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["export", "my_lm:build", "-o", "out", "--target", "onnx-decoder"], capsys)
    assert code == 0, err
    assert "greedy tokens identical to torch generate: yes" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"]["source"] == "my_lm:build" and report["passes"] == []
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "config.json").is_file()
    code, out, _ = run_cli(["generate", "out", "--prompt", "The quick", "--max-new-tokens", "3"], capsys)
    assert code == 0 and out.startswith("The quick")


def test_ladder_and_tolerance_parsing(capsys: pytest.CaptureFixture) -> None:
    from surgeon.decoder.check import DecoderTolerance
    from surgeon.passes import pass_class
    from surgeon.targets import get_target

    profile = get_target("onnx-decoder").profile
    assert profile.formats("kv_cache") == ("int8-head", "fp8-head", "keep")
    kvq = pass_class("kv-cache-quant")
    assert kvq().rungs(profile) == ("int8-head", "fp8-head", "keep")
    assert kvq(dtype="fp8").rungs(profile) == ("fp8-head", "keep")
    assert kvq(granularity="tensor").rungs(profile) == ("int8-tensor", "keep")  # not on the profile's ladder
    assert DecoderTolerance.parse(None) == DecoderTolerance(0.01, 0.95)
    assert DecoderTolerance.parse("agreement=0.9") == DecoderTolerance(0.01, 0.9)
    code, out, _ = run_cli(["passes", "--json"], capsys)
    listed = {p["name"]: p for p in json.loads(out)["passes"]}
    assert code == 0 and [o["name"] for o in listed["kv-cache-quant"]["options"]] == ["dtype", "granularity",
                                                                                      "centre_keys"]
