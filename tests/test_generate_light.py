"""``surgeon generate`` without torch: a fresh process running it on a tiny decoder OUTDIR imports neither
torch nor transformers, and prints what the transformers tokenizer with the target's own session gives
(the path it took before); an OUTDIR that does not state its session config still runs (through the
target)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _decoder_models import save_lm

from surgeon.decoder.generate import OrtRunner, generate, pad_and_eos
from surgeon.decoder.generate_cli import FP8_DISABLED_OPTIMIZERS, load_outdir

PROMPTS = ["The quick brown fox", "Lighter parts"]
NEW = 6


@pytest.fixture(scope="module")
def outdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from surgeon import cli

    root = tmp_path_factory.mktemp("light")
    lm = save_lm("llama", root / "lm", steps=5)
    out = root / "out"
    assert cli.main(["export", str(lm), "-o", str(out), "--target", "onnx-decoder"]) == 0
    return out


def _heavy_results(out: Path) -> list[dict]:
    """What ``surgeon generate --json`` printed before: transformers' tokenizer, the target's session."""
    import transformers

    from surgeon import targets  # type: ignore[attr-defined]

    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    runner = OrtRunner(targets.get_target("onnx-decoder").session(out / "model.onnx"), "model.onnx", max_positions=128)
    pad, eos = pad_and_eos(tok)
    gen = generate(runner, [tok(p)["input_ids"] for p in PROMPTS], NEW, pad_id=pad, eos_id=eos)
    texts = [tok.decode(ids[:ids.index(eos) + 1] if eos in ids else ids, skip_special_tokens=True) for ids in gen.tokens]
    return [{"prompt": p, "completion": t, "tokens": ids} for p, t, ids in zip(PROMPTS, texts, gen.tokens)]


def test_generate_in_a_fresh_process_imports_no_torch(outdir: Path) -> None:
    args = ["generate", str(outdir), *[a for p in PROMPTS for a in ("--prompt", p)], "--max-new-tokens", str(NEW), "--json"]
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from surgeon import cli
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = cli.main({args!r})
        print(json.dumps({{"rc": rc, "out": json.loads(buf.getvalue()),
                          "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["rc"] == 0 and got["heavy"] == []
    assert got["out"]["results"] == _heavy_results(outdir)


def test_the_tokenizer_matches_transformers(outdir: Path) -> None:
    import transformers

    heavy = transformers.AutoTokenizer.from_pretrained(str(outdir), local_files_only=True)
    _, light = load_outdir(outdir)
    assert type(light).__name__ == "LightTokenizer"
    assert (light.eos_token_id, light.pad_token_id, light.unk_token_id) == \
        (heavy.eos_token_id, heavy.pad_token_id, heavy.unk_token_id)
    for text in ["The quick brown fox", "  two spaces, then <|endoftext|> and ümlauts", ""]:
        ids = heavy(text)["input_ids"]
        assert light(text)["input_ids"] == ids
        for skip in (True, False):
            assert light.decode(ids, skip_special_tokens=skip) == heavy.decode(ids, skip_special_tokens=skip)


def test_an_outdir_without_its_session_config_still_generates(outdir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(outdir, bare)
    (bare / "report.json").unlink()  # the session config comes from the target then
    runner, tok = load_outdir(bare)
    pad, eos = pad_and_eos(tok)
    gen = generate(runner, [tok(p)["input_ids"] for p in PROMPTS], NEW, pad_id=pad, eos_id=eos)
    assert [r["tokens"] for r in _heavy_results(outdir)] == gen.tokens


def test_the_fp8_session_options_are_the_targets() -> None:
    from surgeon.targets._ort_session import FP8_DISABLED_OPTIMIZERS as TARGETS

    assert FP8_DISABLED_OPTIMIZERS == TARGETS
