"""The shipped calibration sentences and the bench's held-out sentences: sizes, encoding, disjointness.

``surgeon/data/calib_sentences.txt`` feeds the demo (a seeded quarter of its batches is the check set, which
needs at least 64 samples); ``bench/data/heldout_sentences.txt`` tests a deployed file on text that neither
calibration nor the check saw, so no line may appear in both.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT / "surgeon" / "data" / "calib_sentences.txt"
HELDOUT = ROOT / "bench" / "data" / "heldout_sentences.txt"


def _lines(path: Path) -> list[str]:
    data = path.read_bytes()
    text = data.decode("utf-8")  # raises on anything that is not UTF-8
    assert text.endswith("\n") and "\r" not in text, path
    return text[:-1].split("\n")


def test_data_files() -> None:
    calib, held = _lines(CALIB), _lines(HELDOUT)
    for name, lines in [("calib", calib), ("heldout", held)]:
        assert all(line.strip() for line in lines), f"{name}: empty line"
        assert all(line == line.strip() for line in lines), f"{name}: surrounding whitespace"
        assert len(set(lines)) == len(lines), f"{name}: duplicate lines"
    assert len(set(calib)) >= 300
    assert len(set(held)) >= 200
    assert not {s.casefold() for s in calib} & {s.casefold() for s in held}
