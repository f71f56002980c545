"""The committed tiny decoder (bench/data/tiny-decoder, written by bench/train_decoder.py): it loads
offline, it was never trained on its held-out or calibration text, and it is a trained model (its
held-out perplexity is far below the uniform baseline), so what the KV-cache benchmark measures on it
means something."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).resolve().parents[1] / "bench" / "data"
MODEL = DATA / "tiny-decoder"
# The committed model measures 19.2 on the text this test reads (19.2 on all of it, training.json);
# the bound leaves room for another torch's kernels and is still 40× below the uniform baseline
# (the vocab size, 1024), which is what an untrained model scores.
PPL_BOUND = 25.0


def _lines(name: str) -> list[str]:
    return (MODEL / name).read_text(encoding="utf-8").splitlines()


def test_loads_offline_as_a_gqa_llama_with_its_tokenizer() -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(MODEL), local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(str(MODEL), local_files_only=True)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers == 4
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA: the cache is kv_heads wide
    assert cfg.max_position_embeddings >= 2048                # the benchmark decodes at past 1024
    assert len(tok) == cfg.vocab_size
    assert None not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    # Byte-level: any text round-trips, including what the training text never had.
    text = "def f(x):\n    return x  # ünïcode ✓\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_heldout_and_calibration_files_were_never_trained_on() -> None:
    train, calib, held = set(_lines("training_files.txt")), set(_lines("calib_files.txt")), set(_lines("heldout_files.txt"))
    assert train and calib and held
    assert not train & calib and not train & held and not calib & held
    # The held-out text is exactly the files heldout_files.txt names, in that order.
    text = (DATA / "decoder_heldout.txt").read_text(encoding="utf-8")
    headers = re.findall(r"^# ---- stdlib file: (.+) ----$", text, flags=re.M)
    assert headers == _lines("heldout_files.txt")
    for name, chars in (("decoder_calib.txt", 1000), ("decoder_calib_lines.txt", 10)):
        prompts = (DATA / name).read_text(encoding="utf-8").splitlines()
        assert len(prompts) == 64 and all(len(p.strip()) >= chars for p in prompts), name
        # Nothing calibrated on is measured on: no prompt occurs in the held-out text.
        assert not [p for p in prompts if p.strip() in text], name


def test_heldout_perplexity_is_far_below_uniform() -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(MODEL), local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(MODEL), local_files_only=True)
    text = (DATA / "decoder_heldout.txt").read_text(encoding="utf-8")
    # verbose=False: the text is longer than the model's context on purpose (it is cut into windows).
    ids = torch.tensor(tok(text[:40_000], add_special_tokens=False, verbose=False)["input_ids"])
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 512):  # the windows train_decoder.py measures with
            x = ids[s:s + 513]
            logits = model(input_ids=x[None, :-1]).logits[0]
            nll += torch.nn.functional.cross_entropy(logits.float(), x[1:], reduction="sum").item()
            count += len(x) - 1
    ppl = math.exp(nll / count)
    recorded = json.loads((MODEL / "training.json").read_text(encoding="utf-8"))["heldout_perplexity"]
    assert ppl < PPL_BOUND < model.config.vocab_size, (ppl, recorded)
