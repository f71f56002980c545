"""``--target onnx-seq2seq``: BART and T5 directories (tiny random configs) through ``surgeon optimize``
to encoder + decoder + decoder-with-past files with Optimum's names; greedy tokens of the ORT files equal
to transformers' ``generate``; ``surgeon generate`` on the OUTDIR; the README's loop with onnxruntime,
numpy and tokenizers only; and what the target cannot handle refused in one line in the first seconds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _cli import run_cli

transformers = pytest.importorskip("transformers")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz.,'",
         *("##" + c for c in "abcdefghijklmnopqrstuvwxyz")]
PROMPTS = ["the quick brown fox", "jumps over", "a lazy dog sleeps in the sun"]  # batch 3 (exported at 2)
FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")


def _tokenizer() -> Any:
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


def _bart(path: Path, tok: Any) -> Path:
    torch.manual_seed(0)
    # init_std 0.5: a random model whose greedy tokens vary (0.02 repeats one token), so equality says something
    cfg = transformers.BartConfig(vocab_size=len(WORDS), d_model=32, encoder_layers=1, decoder_layers=2,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                                  eos_token_id=3, decoder_start_token_id=2, init_std=0.5,
                                  architectures=["BartForConditionalGeneration"])
    transformers.BartForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _t5(path: Path, tok: Any) -> Path:
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=len(WORDS), d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                num_heads=2, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0,
                                initializer_factor=5.0, architectures=["T5ForConditionalGeneration"])
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["bart", "t5"])
def outdir(request: Any, tmp_path_factory: Any) -> tuple[Path, Path]:
    """(model dir, OUTDIR of ``surgeon optimize DIR --target onnx-seq2seq``), one per architecture."""
    from surgeon import cli

    root = tmp_path_factory.mktemp(request.param)
    model_dir = (_bart if request.param == "bart" else _t5)(root / "model", _tokenizer())
    code = cli.main(["optimize", str(model_dir), "--target", "onnx-seq2seq", "-o", str(root / "out")])
    assert code == 0
    return model_dir, root / "out"


def _reference(model_dir: Path, prompts: list[str], new: int) -> tuple[list[list[int]], list[str]]:
    """transformers' greedy generate on the prompts, right-padded as one batch: tokens (no start token) and texts."""
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(model_dir)).eval()
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False,
                             num_beams=1, max_new_tokens=new)
    rows = [[int(t) for t in r[1:]] for r in out]
    pad = model.config.pad_token_id
    return rows, [tok.decode([t for t in r if t != pad], skip_special_tokens=True) for r in rows]


@pytest.mark.slow  # one optimize run per architecture (~30 s each on a shared 2-core machine)
def test_files_have_optimums_names_and_greedy_equals_transformers(outdir: tuple[Path, Path]) -> None:
    import onnxruntime as ort

    from surgeon.seq2seq.runner import GreedyConfig, Seq2SeqRunner

    model_dir, out = outdir
    for name in (*FILES, "config.json", "generation_config.json", "tokenizer.json", "report.json", "README.md"):
        assert (out / name).is_file(), name
    names = {f: ([i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()])
             for f in FILES for s in [ort.InferenceSession(str(out / f), providers=["CPUExecutionProvider"])]}
    assert names["encoder_model.onnx"] == (["input_ids", "attention_mask"], ["last_hidden_state"])
    assert names["decoder_model.onnx"][0] == ["input_ids", "encoder_hidden_states", "encoder_attention_mask"]
    assert names["decoder_model.onnx"][1] == ["logits"] + [f"present.{i}.{p}.{kv}" for i in range(2)
                                                         for p in ("decoder", "encoder") for kv in ("key", "value")]
    assert names["decoder_with_past_model.onnx"][0] == ["input_ids", "encoder_attention_mask"] + [
        f"past_key_values.{i}.{p}.{kv}" for i in range(2) for p in ("decoder", "encoder") for kv in ("key", "value")]
    assert names["decoder_with_past_model.onnx"][1] == ["logits"] + [f"present.{i}.decoder.{kv}" for i in range(2)
                                                                    for kv in ("key", "value")]
    # Optimum's axis names; the encoder's and the decoder's lengths never share one (ORT reads equal names as equal sizes)
    past = ort.InferenceSession(str(out / "decoder_with_past_model.onnx"), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in past.get_inputs()} | {o.name: o.shape for o in past.get_outputs()}
    assert shapes["input_ids"] == ["batch", "decoder_sequence_length"]
    assert shapes["encoder_attention_mask"] == ["batch", "encoder_sequence_length"]
    assert shapes["past_key_values.0.decoder.key"][::2] == ["batch", "past_decoder_sequence_length"]
    assert shapes["past_key_values.0.encoder.key"][::2] == ["batch", "encoder_sequence_length"]
    assert shapes["present.0.decoder.key"][::2] == ["batch", "past_decoder_sequence_length + decoder_sequence_length"]
    enc = ort.InferenceSession(str(out / "encoder_model.onnx"), providers=["CPUExecutionProvider"])
    assert enc.get_inputs()[0].shape == ["batch", "encoder_sequence_length"]
    report = json.loads((out / "report.json").read_text())
    v = report["verification"]
    assert v["ok"] and v["greedy"]["identical_to_transformers_generate"], v
    assert max(v["max_abs_diff"].values()) <= v["atol"] == 1e-3
    assert report["guarded"] is False and report["passes"] == [] and report["target"]["model_kind"] == "encoder-decoder"
    # another batch size than the export's (2) and the report's (3): 4 prompts, the files alone
    prompts = PROMPTS + ["over the hills and far away, far away"]
    ref, _ = _reference(model_dir, prompts, 10)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    cfg = GreedyConfig(**json.loads((out / "greedy_config.json").read_text()))
    got = Seq2SeqRunner.open(out).greedy([tok(p)["input_ids"] for p in prompts], 10, cfg)
    assert got == [r + [cfg.pad_token_id] * (len(got[0]) - len(r)) for r in ref]
    assert len({t for r in ref for t in r}) > 2  # the tokens vary: the equality is not of one repeated token


@pytest.mark.slow
def test_surgeon_generate_prints_transformers_text(outdir: tuple[Path, Path], capsys: Any) -> None:
    model_dir, out = outdir
    argv = ["generate", str(out), "--max-new-tokens", "8"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    code, stdout, err = run_cli(argv + ["--json"], capsys)
    assert code == 0, err
    results = json.loads(stdout)["results"]
    tokens, texts = _reference(model_dir, PROMPTS, 8)
    width = len(results[0]["tokens"])
    assert [r["tokens"] for r in results] == [t + [0] * (width - len(t)) for t in tokens]
    assert [r["output"] for r in results] == texts
    code, plain, _ = run_cli(argv, capsys)  # without --json: one line per prompt
    assert code == 0 and plain.splitlines() == [" ".join(t.split("\n")) for t in texts]
    if "bart" in str(model_dir):  # learned positions (64): refused in one line, not in ORT
        code, _, err = run_cli(["generate", str(out), "--prompt", "x " * 100], capsys)
        assert code == 2 and "surgeon: error: prompt 1 has 102 tokens, more than the model's 64 positions" in err, err
        code, _, err = run_cli(["generate", str(out), "--prompt", "x", "--max-new-tokens", "64"], capsys)
        assert code == 2 and ("surgeon: error: --max-new-tokens 64 leaves no room in the model's 64 positions (the "
                              "decoder start token takes one)") in err, err
    code, _, err = run_cli(["generate", str(out), "--prompt", "x", "--sample"], capsys)
    assert code == 2 and "surgeon: error: --sample is not supported on a seq2seq OUTDIR yet (greedy decoding only)" in err


@pytest.mark.slow
def test_readme_loop_runs_with_onnxruntime_numpy_and_tokenizers_only(outdir: tuple[Path, Path]) -> None:
    model_dir, out = outdir
    readme = (out / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)  # type: ignore[union-attr]
    code = code.replace('PROMPT = "translate this"', f"PROMPT = {PROMPTS[0]!r}").replace("MAX_NEW_TOKENS = 32",
                                                                                        "MAX_NEW_TOKENS = 8")
    check = code + ("\nimport sys\nassert not {'torch', 'transformers', 'surgeon'} & set(sys.modules), "
                    "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'surgeon'))\n")
    proc = subprocess.run([sys.executable, "-c", check], cwd=out, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _, texts = _reference(model_dir, PROMPTS[:1], 8)
    assert proc.stdout.strip() == texts[0]


# ------------------------------------------------------------------------------------------------
# refusals: one line, exit 2, nothing written, in the first seconds (no weight read)
# ------------------------------------------------------------------------------------------------
def _gpt2(path: Path) -> Path:
    cfg = transformers.GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                  architectures=["GPT2LMHeadModel"])
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def _bert(path: Path) -> Path:
    cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, architectures=["BertModel"])
    transformers.BertModel(cfg).save_pretrained(path)
    return path


def _whisper(path: Path) -> Path:
    cfg = transformers.WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                                     max_source_positions=100, max_target_positions=32,
                                     architectures=["WhisperForConditionalGeneration"])
    transformers.WhisperForConditionalGeneration(cfg).save_pretrained(path)
    transformers.WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path


def _bart_base(path: Path) -> Path:
    cfg = transformers.BartConfig(vocab_size=len(WORDS), d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64, architectures=["BartModel"])
    transformers.BartModel(cfg).save_pretrained(path)
    return path


def _marian_no_tokenizer(path: Path) -> Path:
    cfg = transformers.MarianConfig(vocab_size=len(WORDS), d_model=32, encoder_layers=1, decoder_layers=1,
                                    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                    decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0,
                                    decoder_start_token_id=0, architectures=["MarianMTModel"])
    transformers.MarianMTModel(cfg).save_pretrained(path)  # no tokenizer files (Marian's need sentencepiece)
    return path


REFUSALS = [
    (_gpt2, [], "'{d}' is not an encoder-decoder (GPT2LMHeadModel): --target onnx-seq2seq exports text "
                "encoder-decoders (BART, T5, Marian …ForConditionalGeneration); a causal LM takes --target onnx-decoder, "
                "an encoder-only model the module targets (onnx, onnx-int8, …)"),
    (_bert, [], "'{d}' is not an encoder-decoder (BertModel): --target onnx-seq2seq exports text encoder-decoders "
                "(BART, T5, Marian …ForConditionalGeneration); a causal LM takes --target onnx-decoder, an encoder-only "
                "model the module targets (onnx, onnx-int8, …)"),
    (_whisper, [], "'{d}' is an encoder-decoder whose encoder takes input_features (WhisperForConditionalGeneration): "
                   "--target onnx-seq2seq exports text encoder-decoders (BART, T5, Marian …ForConditionalGeneration) "
                   "whose encoder takes input_ids; an audio or image encoder-decoder is not supported yet (export its "
                   "encoder alone: a factory returning model.get_encoder())"),
    (_bart_base, [], "'{d}' is an encoder-decoder without a generative head (BartModel): --target onnx-seq2seq exports "
                     "text encoder-decoders (BART, T5, Marian …ForConditionalGeneration), whose decoder ends in logits "
                     "over the vocabulary"),
    (_marian_no_tokenizer, [], "Hugging Face model directory '{d}' has no tokenizer files (tokenizer.json, vocab.txt, "
                               "...): a text model needs its tokenizer for example inputs"),
    (lambda p: _bart(p, _tokenizer()), ["--passes", "linear-quant"],
     "--target onnx-seq2seq runs no pass yet (it writes fp32 weights and guards no site): drop --passes 'linear-quant'"),
    (lambda p: _bart(p, _tokenizer()), ["--task", "fill-mask"],
     "--task does not apply to --target onnx-seq2seq: it loads the config's …ForConditionalGeneration class"),
    (lambda p: _bart(p, _tokenizer()), ["--tolerance", "cosine_mean=0.99"],
     "--tolerance does not apply to --target onnx-seq2seq yet: no pass runs, and the files are verified against fixed "
     "figures (max |Δ| ≤ 1e-3, greedy tokens identical)"),
]


@pytest.mark.parametrize("build, extra, message", REFUSALS, ids=["gpt2", "bert", "whisper", "bart-base",
                                                                 "marian-no-tokenizer", "passes", "task", "tolerance"])
def test_what_onnx_seq2seq_cannot_handle_is_refused_early_in_one_line(build: Any, extra: list[str], message: str,
                                                                      tmp_path: Path, capsys: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = build(tmp_path / "model")
    # no weight is read before the refusal: loading one fails the test
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: pytest.fail("weights read before the refusal")))
    start = time.perf_counter()
    code, out, err = run_cli(["optimize", str(model_dir), "--target", "onnx-seq2seq", "-o", str(tmp_path / "out"),
                              *extra], capsys)
    wall = time.perf_counter() - start
    assert code == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("surgeon: error:")]
    assert lines == ["surgeon: error: " + message.format(d=model_dir)], err
    assert not (tmp_path / "out").exists()
    assert wall < 20, wall


def test_generate_refuses_an_incomplete_seq2seq_outdir(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "encoder_model.onnx").write_bytes(b"")
    code, _, err = run_cli(["generate", str(tmp_path), "--prompt", "x"], capsys)
    assert code == 2
    assert f"surgeon: error: '{tmp_path}' is not a complete seq2seq OUTDIR: no decoder_model.onnx, " \
           "decoder_with_past_model.onnx, greedy_config.json (write one with surgeon optimize DIR --target " \
           "onnx-seq2seq -o OUTDIR)" in err.splitlines()


def test_a_verification_miss_is_exit_3_naming_what_missed() -> None:
    from surgeon.seq2seq.pipeline import seq2seq_verdict

    ok = {"ok": True, "within_atol": True, "atol": 1e-3, "max_abs_diff": {"decoder_logits": 1e-6},
          "greedy": {"identical_to_transformers_generate": True, "prompts": 3, "rows_identical": 3}}
    assert seq2seq_verdict(ok)["exit_code"] == 0
    bad = {**ok, "ok": False, "within_atol": False, "max_abs_diff": {"decoder_logits": 0.5},
           "greedy": {"identical_to_transformers_generate": False, "prompts": 3, "rows_identical": 2}}
    v = seq2seq_verdict(bad)
    assert (v["status"], v["exit_code"]) == ("not_met", 3)
    assert v["message"] == ("verification missed: max |Δ| 0.5 > 0.001; greedy tokens differ from transformers' "
                            "generate in 1 of 3 prompts")


def test_a_failing_reference_generate_is_one_line() -> None:
    """T5 with fewer encoder than decoder layers: transformers' generate sizes its cache by the encoder's
    count and fails (IndexError); the files cannot be verified, said in one line (nothing is written)."""
    from surgeon.errors import SurgeonError
    from surgeon.seq2seq.check import reference_greedy
    from surgeon.seq2seq.runner import GreedyConfig

    cfg = transformers.T5Config(vocab_size=len(WORDS), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=2,
                                num_heads=2, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with pytest.raises(SurgeonError, match=r"^transformers' generate failed on T5ForConditionalGeneration \(IndexError: "
                                           r".*\): the greedy reference the files are verified against cannot be computed$"):
        reference_greedy(model, [[5, 6, 7, 3]], 4, GreedyConfig(0, 3, 0))
