"""A Hugging Face directory loads as the class its checkpoint is (task heads included), a head whose
weights the checkpoint lacks is refused in one line, ``--task`` picks another head on purpose, and
``surgeon optimize --target onnx-int8`` writes the head's outputs (names, shapes, argmax agreement)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import surgeon
from surgeon.errors import SurgeonError
from surgeon.loaders import TASKS, load_model
from tests._cli import run_cli

transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

NUM_LABELS = 3
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}

_WORDS = ("the a small quick brown red old new fox dog cat bird model river city night morning light house "
          "jumps runs sleeps sings reads writes over under near beside through across quietly slowly again "
          "today yesterday green tall short happy").split()


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))).capitalize() + "." for _ in range(n)]


def _bert_seq(vocab: int) -> Any:
    cfg = transformers.BertConfig(vocab_size=vocab, max_position_embeddings=64, num_labels=NUM_LABELS,
                                  **SMALL)
    return transformers.BertForSequenceClassification(cfg)


def _distilbert_qa(vocab: int) -> Any:
    cfg = transformers.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                        max_position_embeddings=64)
    return transformers.DistilBertForQuestionAnswering(cfg)


def _roberta_tok(vocab: int) -> Any:
    # pad_token_id 0: the BERT tokenizer's [PAD] (RoBERTa numbers positions after its padding index).
    cfg = transformers.RobertaConfig(vocab_size=vocab, max_position_embeddings=66, pad_token_id=0,
                                     num_labels=NUM_LABELS, **SMALL)
    return transformers.RobertaForTokenClassification(cfg)


def _vit_cls(vocab: int) -> Any:
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_labels=NUM_LABELS, **SMALL)
    return transformers.ViTForImageClassification(cfg)


BUILDERS: dict[str, Callable[[int], Any]] = {
    "BertForSequenceClassification": _bert_seq,
    "DistilBertForQuestionAnswering": _distilbert_qa,
    "RobertaForTokenClassification": _roberta_tok,
    "ViTForImageClassification": _vit_cls,
}
# The head's ONNX outputs: name → the shape with "batch" / "sequence" for the dynamic dimensions.
OUTPUTS: dict[str, dict[str, tuple]] = {
    "BertForSequenceClassification": {"logits": ("batch", NUM_LABELS)},
    "DistilBertForQuestionAnswering": {"start_logits": ("batch", "sequence"), "end_logits": ("batch", "sequence")},
    "RobertaForTokenClassification": {"logits": ("batch", "sequence", NUM_LABELS)},
    "ViTForImageClassification": {"logits": ("batch", NUM_LABELS)},
}


def _train(model: Any, tokenizer: Any, steps: int = 30) -> None:
    """A few Adam steps on a made-up task: the span first word .. last word (question answering), each
    token's id modulo the labels (token classification). A random head's logits over a dozen positions
    are near-ties that int8 rounding reorders (2 to 4 of 72 QA argmaxes flipped, each by a margin under
    0.07; 1 of 432 token labels); a trained head's answer stands out as a real one's does."""
    batch = tokenizer(_sentences(48, seed=2), padding=True, return_tensors="pt")
    batch.pop("token_type_ids", None)
    if type(model).__name__.endswith("QuestionAnswering"):
        target = {"start_positions": torch.ones(48, dtype=torch.long),
                  "end_positions": batch["attention_mask"].sum(1) - 2}  # the last word, before [SEP]
    else:
        target = {"labels": (batch["input_ids"] % NUM_LABELS).masked_fill(batch["attention_mask"] == 0, -100)}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, **target).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _save(arch: str, tmp_path: Path, hf_tokenizer: Any) -> Path:
    torch.manual_seed(0)
    model = BUILDERS[arch](len(hf_tokenizer)).eval()
    if arch.endswith(("QuestionAnswering", "TokenClassification")):
        _train(model, hf_tokenizer)
    out = tmp_path / arch
    model.save_pretrained(out)
    if arch.startswith("ViT"):
        try:
            transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
        except (ImportError, ValueError):  # the image processor's own dependencies: the model loads without it
            pass
    else:
        hf_tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def bert_cls_dir(tmp_path: Path, hf_tokenizer: Any) -> Path:
    return _save("BertForSequenceClassification", tmp_path, hf_tokenizer)


def _raises(msg: str) -> Any:
    return pytest.raises(SurgeonError, match="^" + re.escape(msg) + "$")


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_directory_loads_as_its_architecture(arch, tmp_path, hf_tokenizer):
    d = _save(arch, tmp_path, hf_tokenizer)
    loaded = load_model(d)
    assert type(loaded.model).__name__ == arch
    assert f"loaded as {arch} (its config's architecture)" in loaded.notes
    model, _ = surgeon.load(d)
    assert type(model).__name__ == arch
    # The captured graph returns the head's outputs, by name, at the captured and another batch size.
    gm = surgeon.capture(loaded.model, loaded.example_inputs).gm
    for inputs in (loaded.example_inputs, _held_out(arch, loaded)[0]):
        with torch.no_grad():
            ref, got = loaded.model(**inputs), gm(**inputs)
        assert list(got.keys()) == list(OUTPUTS[arch]) == [k for k in ref.keys()]
        for name in OUTPUTS[arch]:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5)


def test_real_minilm_loads_without_refusal(minilm_dir):
    """A complete real checkpoint: no weight transformers reports (tied or legacy buffers) trips the check."""
    loaded = load_model(minilm_dir)
    assert type(loaded.model).__name__ == "BertModel"
    assert "loaded as BertModel (its config's architecture)" in loaded.notes


def test_missing_head_weight_is_refused(bert_cls_dir, capsys):
    from safetensors.torch import load_file, save_file

    weights = bert_cls_dir / "model.safetensors"
    state = load_file(weights)
    del state["classifier.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    msg = (f"Hugging Face model directory '{bert_cls_dir}' does not hold the weights its class "
           "BertForSequenceClassification needs: missing classifier.weight (they would be initialised at random); "
           "give the full checkpoint, or --task feature-extraction to load without the head")
    with _raises(msg):
        load_model(bert_cls_dir)
    code, out, err = run_cli(["analyze", str(bert_cls_dir)], capsys)
    assert (code, out, err) == (2, "", f"surgeon: error: {msg}\n")


def test_head_the_checkpoint_lacks_is_refused_under_task(tmp_path, save_hf, hf_tokenizer):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(hf_tokenizer), max_position_embeddings=64, **SMALL)
    d = save_hf(transformers.BertModel(cfg).eval(), "base")
    with _raises(f"Hugging Face model directory '{d}' does not hold the weights its class "
                 "BertForSequenceClassification needs: missing classifier.weight, classifier.bias (they would be "
                 "initialised at random); the checkpoint has no text-classification head: give one that has, or "
                 "--task feature-extraction to load without a head"):
        load_model(d, task="text-classification")


def test_task_feature_extraction_loads_the_base_model(bert_cls_dir, capsys):
    loaded = load_model(bert_cls_dir, task="feature-extraction")
    assert type(loaded.model).__name__ == "BertModel"
    assert "loaded as BertModel (--task feature-extraction: AutoModel)" in loaded.notes
    assert ("checkpoint weights BertModel does not use: classifier.bias, classifier.weight "
            "(--task feature-extraction drops them)") in loaded.notes
    code, out, err = run_cli(["analyze", str(bert_cls_dir), "--task", "feature-extraction", "--json"], capsys)
    assert code == 0 and err == ""


def test_task_feature_extraction_on_vit_classifier_leaves_out_the_pooler(tmp_path, hf_tokenizer):
    """ViTForImageClassification's checkpoint holds ViTModel without its pooler: built without one
    rather than with a random pooler."""
    d = _save("ViTForImageClassification", tmp_path, hf_tokenizer)
    loaded = load_model(d, task="feature-extraction")
    assert type(loaded.model).__name__ == "ViTModel" and loaded.model.pooler is None
    assert "built without the pooler its checkpoint does not hold (add_pooling_layer=False: no pooler_output)" \
        in loaded.notes


def test_unknown_task_is_one_line(bert_cls_dir, capsys):
    msg = f"unknown task 'sentiment' (known: {', '.join(TASKS)})"
    with _raises(msg):
        load_model(bert_cls_dir, task="sentiment")
    code, out, err = run_cli(["optimize", str(bert_cls_dir), "-o", str(bert_cls_dir.parent / "out"),
                              "--task", "sentiment"], capsys)
    assert (code, out, err) == (2, "", f"surgeon: error: {msg}\n")
    assert not (bert_cls_dir.parent / "out").exists()


def test_task_on_something_else_than_a_directory(tmp_path):
    with _raises("--task applies only to Hugging Face model directories (it picks the head transformers builds); "
                 "'tests._models:mlp' is not one"):
        load_model("tests._models:mlp", task="text-classification")


def test_generative_architecture_keeps_the_base_model(save_hf, hf_tokenizer):
    """GPT2LMHeadModel (a causal LM): optimize and export take encoder-style models, so it loads as
    GPT2Model, as before, and says so."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(hf_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    d = save_hf(transformers.GPT2LMHeadModel(cfg).eval(), "gpt2")
    loaded = load_model(d)
    assert type(loaded.model).__name__ == "GPT2Model"
    assert ("loaded as GPT2Model (AutoModel) without the generative head of its config's architecture "
            "GPT2LMHeadModel: optimize and export take encoder-style models (--target onnx-decoder exports a causal "
            "LM with its cache; --task picks another head)") in loaded.notes


# ------------------------------------------------------------------------------------ optimize → ONNX


def _held_out(arch: str, loaded: Any) -> list[dict]:
    """Batches of 3 (calibration used 8) the calibration never saw."""
    if arch.startswith("ViT"):
        gen = torch.Generator().manual_seed(1)
        return [{"pixel_values": torch.randn(3, 3, 32, 32, generator=gen)} for _ in range(12)]
    sentences = _sentences(36, seed=1)
    return [loaded.text_inputs(sentences[i:i + 3]) for i in range(0, len(sentences), 3)]


def _calibration(arch: str, tmp_path: Path) -> Path:
    if arch.startswith("ViT"):
        gen = torch.Generator().manual_seed(0)
        path = tmp_path / "calib.pt"
        torch.save([{"pixel_values": torch.randn(8, 3, 32, 32, generator=gen)} for _ in range(6)], path)
        return path
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(_sentences(48, seed=0)) + "\n")
    return path


def _onnx_outputs(path: Path) -> dict[str, tuple]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {o.name: tuple(d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim) for o in graph.output}


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_optimize_onnx_int8_keeps_the_head(arch, tmp_path, hf_tokenizer, capsys):
    from surgeon.targets._ort_session import run_ort, session

    d = _save(arch, tmp_path, hf_tokenizer)
    out = tmp_path / "out"
    code, _, err = run_cli(["optimize", str(d), "-o", str(out), "--target", "onnx-int8", "--no-speed",
                            "--calib", str(_calibration(arch, tmp_path))], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"]["status"] == "met" and any(site["status"] == "applied" for site in report["sites"])
    # the report says which class the checkpoint was loaded as, and that the verdict is the file's
    assert any(n.startswith(f"loaded as {report['model']['class']} (its config's architecture)")
               for n in report["model"]["load_notes"])
    assert report["end_to_end"]["measured_on"]["file"] == "model.onnx"
    assert report["end_to_end"]["agreement"] >= 0.99
    path = out / "model.onnx"
    assert _onnx_outputs(path) == OUTPUTS[arch]

    loaded = load_model(d)
    sess = session(path)
    agree = total = 0
    for batch in _held_out(arch, loaded):
        with torch.no_grad():
            ref = loaded.model(**batch)
        got = dict(zip([o.name for o in sess.get_outputs()], run_ort(sess, batch)))
        for name in OUTPUTS[arch]:
            expected = ref[name].numpy()
            assert got[name].shape == expected.shape, name
            if arch.startswith("Roberta"):  # token classification: the real (unpadded) positions only
                real = batch["attention_mask"].numpy().astype(bool)
                a, b = got[name].argmax(-1)[real], expected.argmax(-1)[real]
            elif arch.startswith("DistilBert"):  # an answer's start or end: a real position, never padding
                real = batch["attention_mask"].numpy().astype(bool)
                a, b = (np.where(real, x, -np.inf).argmax(-1) for x in (got[name], expected))
            else:
                a, b = got[name].argmax(-1), expected.argmax(-1)
            agree += int(np.sum(a == b))
            total += a.size
    assert total >= 30 and agree / total >= 0.99, f"argmax agreement {agree}/{total}"


@pytest.mark.parametrize("command", ["optimize", "export"])
def test_task_with_the_decoder_target_is_refused(command, tmp_path, capsys):
    code, out, err = run_cli([command, str(tmp_path / "lm"), "-o", str(tmp_path / "out"), "--target", "onnx-decoder",
                              "--task", "fill-mask"], capsys)
    assert (code, out, err) == (2, "", "surgeon: error: --task does not apply to --target onnx-decoder: it loads the "
                                       "causal LM head (AutoModelForCausalLM)\n")


def test_multiple_choice_and_audio_heads_get_example_inputs(save_hf, hf_tokenizer, tmp_path):
    """(batch, choices, sequence) token inputs for a multiple-choice head; a waveform for an audio one."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(hf_tokenizer), max_position_embeddings=64, **SMALL)
    loaded = load_model(save_hf(transformers.BertForMultipleChoice(cfg).eval(), "mc"))
    assert {tuple(v.shape[:2]) for v in loaded.example_inputs.values()} == {(2, 4)}
    with torch.no_grad():
        assert loaded.model(**loaded.example_inputs).logits.shape == (2, 4)
    wcfg = transformers.Wav2Vec2Config(conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                                       num_feat_extract_layers=2, num_labels=NUM_LABELS, vocab_size=32, **SMALL)
    transformers.Wav2Vec2ForSequenceClassification(wcfg).eval().save_pretrained(tmp_path / "w2v")
    loaded = load_model(tmp_path / "w2v", task="audio-classification")
    assert type(loaded.model).__name__ == "Wav2Vec2ForSequenceClassification"
    assert "example input_values: 1 s of noise at 16000 Hz" in loaded.notes
    with torch.no_grad():
        assert loaded.model(**loaded.example_inputs).logits.shape == (2, NUM_LABELS)
