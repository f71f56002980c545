"""An OUTDIR's tokenizer without transformers: ``tokenizers.Tokenizer`` on ``tokenizer.json``, with the
special tokens ``tokenizer_config.json`` names. transformers' ``AutoTokenizer`` imports torch (seconds
on a busy machine, and a large resident set) for what ``surgeon generate`` needs: encode, decode and
the EOS / pad ids. A fast tokenizer saved by ``save_pretrained`` keeps its whole behaviour (normalizer,
pre-tokenizer, post-processor with BOS, decoder) in ``tokenizer.json``, so encoding and decoding with
``tokenizers`` gives transformers' ids and text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["LightTokenizer", "light_tokenizer"]


def _content(token: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` spells it: a string or a serialized ``AddedToken``."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


class LightTokenizer:
    """What the generation loop and ``surgeon generate`` call on a tokenizer: ``tok(text)["input_ids"]``,
    ``decode(ids, skip_special_tokens=...)`` and the EOS / pad / UNK ids (``None`` when there is none)."""

    def __init__(self, backend: Any, config: dict[str, Any]) -> None:
        self.backend = backend
        ids = {name: None if (tok := _content(config.get(f"{name}_token"))) is None else backend.token_to_id(tok)
               for name in ("eos", "pad", "unk")}
        self.eos_token_id: int | None = ids["eos"]
        self.pad_token_id: int | None = ids["pad"]
        self.unk_token_id: int | None = ids["unk"]

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self.backend.encode(text).ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return str(self.backend.decode(ids, skip_special_tokens=skip_special_tokens))


def light_tokenizer(outdir: Path) -> LightTokenizer | None:
    """The tokenizer of ``outdir`` read with ``tokenizers`` alone, or ``None`` when that would not give
    transformers' text: no ``tokenizer.json`` (a slow tokenizer), or a config asking transformers to clean
    up spaces after decoding (its own step, not ``tokenizers``')."""
    path = outdir / "tokenizer.json"
    try:
        config = json.loads((outdir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if not path.is_file() or not isinstance(config, dict) or config.get("clean_up_tokenization_spaces"):
        return None
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(path))
    # tokenizer.json keeps whatever truncation / padding the last call before save_pretrained set (the
    # pipeline truncates its calibration lines); transformers resets both on every call that does not ask
    # for them, so a prompt is encoded whole here as well
    backend.no_truncation()
    backend.no_padding()
    return LightTokenizer(backend, config)
