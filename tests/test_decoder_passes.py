"""onnx-decoder with graph passes beside the cache pass: a tiny Llama (GQA 4:2, RoPE) through
``surgeon optimize DIR --target onnx-decoder --passes 'linear-quant{dtype=int8},kv-cache-quant'``, as a
user runs it.

* the captured step computes what the step module computes, at prefill (past 0) and decode (new 1);
* the file's logits match its own torch module (the captured step with the kept sites, 8-bit cache) to
  1e-4 at the export checks and at all but rare greedy steps (an int8 activation on a rounding boundary:
  one code apart, ≤ 0.1), and greedy tokens equal the torch module's;
* report.json lists every linear site with its rung and solo figures; a tolerance too tight for the
  int8 rung (greedy agreement 0.99) rolls sites back, reported with the figure that broke it;
* the built-in guard text holds out ≥ 2,000 tokens for a real tokenizer (bench/data/tiny-decoder's
  trained byte-level BPE), and fewer than 512 held-out tokens is a warning naming the number.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _decoder_models import LINES, save_lm

STEP_TOL = 1e-4  # max |Δlogits| per step, ORT vs its torch module (measured ≤ 1.1e-6 here)
FLIP_TOL = 0.1  # a step where one int8 activation code differs (one rounding boundary; measured 0.027)
PASSES = "linear-quant{dtype=int8},kv-cache-quant"
TINY_DECODER = Path(__file__).resolve().parents[1] / "bench" / "data" / "tiny-decoder"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lm("llama", tmp_path_factory.mktemp("lm") / "llama")


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "prompts.txt"
    path.write_text("\n".join(LINES + [s.lower() for s in LINES]) + "\n")
    return path


def _optimize(llama: Path, calib: Path, out: Path, tolerance: str) -> tuple[int, dict]:
    from surgeon import cli

    code = cli.main(["optimize", str(llama), "-o", str(out), "--target", "onnx-decoder", "--passes", PASSES,
                     "--calib", str(calib), "--tolerance", tolerance, "--no-speed"])
    return code, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def loose(llama: Path, calib: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, Path]:
    out = tmp_path_factory.mktemp("outs") / "loose"
    code, report = _optimize(llama, calib, out, "ppl_increase=0.5,agreement=0.5")
    return code, report, out


def test_captured_step_computes_the_step(llama: Path) -> None:
    from surgeon.decoder.graph import GraphStep, capture_step
    from surgeon.decoder.step import DecoderStep, check_standard_cache
    from surgeon.loaders import load_decoder
    from surgeon.targets.onnx_decoder import example_step_inputs

    lm = load_decoder(str(llama)).model
    step = DecoderStep(lm, check_standard_cache(lm, str(llama))).eval()
    graph = GraphStep(capture_step(step), step)
    for past, new in ((0, 5), (0, 1), (3, 1), (5, 4)):  # prefill and decode, beyond the capture's sizes
        inputs = example_step_inputs(step, past=past, new=new, seed=past + new)
        with torch.no_grad():
            a, b = graph(*inputs), step(*inputs)
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.shape == y.shape
            assert (x - y).abs().max().item() <= 1e-5


def test_linear_and_cache_sites_written_and_verified(loose: tuple[int, dict, Path]) -> None:
    import onnx

    code, report, out = loose
    assert code == 0 and report["verdict"]["status"] == "met"
    linear = [s for s in report["sites"] if s["kind"] == "linear"]
    assert len(linear) == 15  # 2 layers × (q, k, v, o, gate, up, down) + the LM head
    for s in linear:
        assert s["pass"] == "linear-quant" and s["status"] == "applied" and s["rung"] == s["ladder"][0]
        assert s["ladder"][-1] == "keep"
        assert s["solo"]["ppl_ratio"] > 0 and 0 <= s["solo"]["agreement"] <= 1
    cache = [s for s in report["sites"] if s["site"] == "kv_cache"]
    assert cache and cache[0]["rung"] == "int8-head"
    v = report["verification"]
    # the file against its torch module along 16 greedy steps: ≤ 1e-4 but where an int8 activation sits on
    # a rounding boundary and ORT's QuantizeLinear lands one code away from torch's (measured: 1 step of
    # 16 at 0.027, the rest ≤ 1.1e-6); the tokens are the same
    per_step = v["logits_max_abs_diff_per_step"]
    assert sum(d > STEP_TOL for d in per_step) <= 2 and max(per_step) <= FLIP_TOL
    assert v["greedy_identical_to_torch_module"] is True
    assert report["targets"]["onnx-decoder"]["max_abs_diff"] <= STEP_TOL
    graph = onnx.load(str(out / "model.onnx")).graph
    assert {i.type.tensor_type.elem_type for i in graph.input[3:]} == {onnx.TensorProto.INT8}
    ort_ops = report["targets"]["onnx-decoder"]["ort_ops"]
    assert ort_ops.get("MatMulIntegerToFloat", 0) + ort_ops.get("DynamicQuantizeMatMul", 0) >= 1
    # the calibration file is short: the guard says how little it held out
    held = report["calibration"]["held_out_tokens"]
    assert held < 512
    assert any(f"held-out text is {held} tokens" in w for w in report["warnings"])


def test_a_tight_tolerance_rolls_linear_sites_back(llama: Path, calib: Path, tmp_path: Path) -> None:
    # every int8 linear on: greedy agreement 0.965 with the fp32 step on these held-out lines (measured)
    code, report = _optimize(llama, calib, tmp_path / "tight", "ppl_increase=0.01,agreement=0.99")
    linear = [s for s in report["sites"] if s["kind"] == "linear"]
    rolled = [s for s in linear if s["status"] == "rolled_back"]
    assert rolled, "a tolerance of 0.99 greedy agreement kept every int8 linear"
    for s in rolled:
        assert s["rung"] == "keep" and "agreement" in s["reason"] and "< 0.99" in s["reason"]
    assert report["tolerance"]["met"] is True and code in (0, 3)
    assert report["verification"]["logits_max_abs_diff"] <= FLIP_TOL


@pytest.mark.skipif(not (TINY_DECODER / "tokenizer.json").is_file(), reason="bench/data/tiny-decoder not present")
def test_built_in_text_holds_out_enough_tokens() -> None:
    import transformers

    from surgeon.decoder.pipeline import DEFAULT_DECODER_TEXT, MIN_HELD_OUT_TOKENS, split_texts

    tok = transformers.AutoTokenizer.from_pretrained(str(TINY_DECODER), local_files_only=True)
    assert sum(len(line.split()) for line in DEFAULT_DECODER_TEXT) >= 10_000
    for seed in (0, 1):
        _, held, _ = split_texts(tok, list(DEFAULT_DECODER_TEXT), 2048, seed)
        assert sum(map(len, held)) >= 2_000 > MIN_HELD_OUT_TOKENS
        # words, not this small vocabulary's tokens: ≥ 2,000 tokens for a 50k-vocab BPE too (≥ 1 token a word)
        assert sum(len(tok.decode(x).split()) for x in held) >= 2_000
