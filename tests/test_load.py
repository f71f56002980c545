"""surgeon.load: every accepted format on tiny models, every bad input with its exact message."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

import surgeon
from surgeon.errors import SurgeonError
from surgeon.inputs import call, tensors_of
from surgeon.load import _OTHER_TEXTS, DEFAULT_TEXT, load_model

transformers = pytest.importorskip("transformers")



def _assert_same_outputs(a: nn.Module, b: nn.Module, inputs) -> None:
    with torch.no_grad():
        out_a, out_b = tensors_of(call(a, inputs)), tensors_of(call(b, inputs))
    assert len(out_a) == len(out_b) >= 1
    for x, y in zip(out_a, out_b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def _assert_batch_seq(inputs: dict) -> None:
    for v in inputs.values():
        assert v.shape[0] == 2 and v.shape[1] >= 3, v.shape


def _bert(vocab_size: int) -> nn.Module:
    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def _raises(msg: str):
    """pytest.raises matching ``msg`` exactly (one line)."""
    import re

    return pytest.raises(SurgeonError, match="^" + re.escape(msg) + "$")


# ------------------------------------------------------------------------------------------ Hugging Face


def test_hf_bert_dir_gives_tokenized_batch_and_same_outputs(save_hf, hf_tokenizer):
    original = _bert(len(hf_tokenizer))
    d = save_hf(original, "bert")
    loaded = load_model(d)
    assert (loaded.kind, loaded.source, loaded.is_text) == ("hf", str(d), True)
    inputs = loaded.example_inputs
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    _assert_batch_seq(inputs)
    # The two sentences differ in length, so the batch is padded and the mask has zeros.
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1] and min(lengths) < inputs["input_ids"].shape[1]
    assert inputs["input_ids"][0, : lengths[0]].tolist() == hf_tokenizer(DEFAULT_TEXT)["input_ids"]
    assert loaded.model.config.use_cache is False and not loaded.model.training
    assert "use_cache=False" in loaded.notes
    _assert_same_outputs(loaded.model, original, inputs)
    model, inputs2 = surgeon.load(d)
    assert isinstance(model, transformers.BertModel) and inputs2.keys() == inputs.keys()


def test_hf_text_option_and_second_sentence_of_other_length(tiny_bert_dir, hf_tokenizer):
    loaded = load_model(tiny_bert_dir, text=_OTHER_TEXTS[0])
    mask = loaded.example_inputs["attention_mask"]
    assert loaded.example_inputs["input_ids"][0, : int(mask[0].sum())].tolist() == \
        hf_tokenizer(_OTHER_TEXTS[0])["input_ids"]
    assert mask[0].sum() != mask[1].sum()


def test_text_inputs_pads_and_truncates(tiny_bert_dir):
    loaded = load_model(tiny_bert_dir)
    batch = loaded.text_inputs(["one", "a somewhat longer sentence here", "two words"])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert batch["input_ids"].shape[0] == 3 and batch["attention_mask"][0].sum() < batch["input_ids"].shape[1]
    short = loaded.text_inputs(["word " * 100], max_length=8)
    assert short["input_ids"].shape == (1, 8)
    # Capped by the model's position limit (64) even when asked for more.
    assert loaded.text_inputs(["word " * 100], max_length=1000)["input_ids"].shape == (1, 64)
    with _raises("no sentences to tokenize"):
        loaded.text_inputs([])


def test_hf_gpt2_without_pad_token_pads_with_fallback(save_hf, hf_tokenizer, tmp_path):
    torch.manual_seed(2)
    cfg = transformers.GPT2Config(vocab_size=len(hf_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  bos_token_id=None, eos_token_id=None)
    original = transformers.GPT2Model(cfg).eval()
    hf_tokenizer.save_pretrained(tmp_path / "tok")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    tok.pad_token = None  # like GPT-2's own tokenizer
    d = save_hf(original, "gpt2", tokenizer=tok)
    original.config.use_cache = False  # compare hidden states only
    loaded = load_model(d)
    assert loaded.model.config.use_cache is False
    assert loaded.tokenizer.pad_token == "[UNK]"
    assert "tokenizer has no pad token: padding with '[UNK]'" in loaded.notes
    _assert_batch_seq(loaded.example_inputs)
    with torch.no_grad():
        assert loaded.model(**loaded.example_inputs).past_key_values is None  # export returns plain tensors
    _assert_same_outputs(loaded.model, original, loaded.example_inputs)


def test_hf_encoder_decoder_gets_decoder_inputs(save_hf, hf_tokenizer):
    torch.manual_seed(7)
    cfg = transformers.T5Config(vocab_size=len(hf_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_heads=4, decoder_start_token_id=0)
    original = transformers.T5Model(cfg).eval()
    loaded = load_model(save_hf(original, "t5"))
    inputs = loaded.example_inputs
    assert set(inputs) == {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"}
    assert torch.equal(inputs["decoder_input_ids"], inputs["input_ids"])
    _assert_batch_seq(inputs)
    original.config.use_cache = False
    _assert_same_outputs(loaded.model, original, inputs)

def test_hf_t5_encoder_dir_loads_as_the_encoder_it_holds(save_hf, hf_tokenizer):
    """config.architectures = ["T5EncoderModel"] (sentence-T5 and the like): AutoModel would add a
    decoder with random weights and ask for decoder inputs; the loader builds the encoder it holds."""
    torch.manual_seed(7)
    cfg = transformers.T5Config(vocab_size=len(hf_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    original = transformers.T5EncoderModel(cfg).eval()
    loaded = load_model(save_hf(original, "t5enc"))
    assert type(loaded.model).__name__ == "T5EncoderModel"
    assert "loaded as T5EncoderModel (its config's architecture: an encoder without the decoder)" in loaded.notes
    assert set(loaded.example_inputs) == {"input_ids", "attention_mask"}
    _assert_same_outputs(loaded.model, original, loaded.example_inputs)


def test_hf_vit_dir_gives_pixel_values_and_no_tokenizer(save_hf):
    torch.manual_seed(3)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8, num_channels=3)
    original = transformers.ViTModel(cfg).eval()
    d = save_hf(original, "vit", tokenizer=False)
    loaded = load_model(d)
    assert (loaded.kind, loaded.tokenizer, loaded.is_text) == ("hf", None, False)
    assert list(loaded.example_inputs) == ["pixel_values"]
    x = loaded.example_inputs["pixel_values"]
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, load_model(d).example_inputs["pixel_values"])  # fixed seed
    _assert_same_outputs(loaded.model, original, loaded.example_inputs)
    with _raises(f"model '{d}' has no tokenizer: text inputs need a Hugging Face text model directory"):
        loaded.text_inputs(["hello"])
    with _raises(f"a sentence (--text) applies only to Hugging Face text models; '{d}' is a ViTModel (no input_ids)"):
        load_model(d, text="hello")


def test_hf_pytorch_model_bin_is_read_weights_only(hf_tokenizer, tmp_path):
    original = _bert(len(hf_tokenizer))
    d = tmp_path / "bin"
    d.mkdir()
    original.config.to_json_file(d / "config.json")
    hf_tokenizer.save_pretrained(d)
    torch.save(original.state_dict(), d / "pytorch_model.bin")
    loaded = load_model(d)
    assert "weights read from pytorch_model.bin (a pickle) with weights_only=True" in loaded.notes
    _assert_same_outputs(loaded.model, original, loaded.example_inputs)


class _WritesFile:
    """A pickle payload whose unpickling creates a file (stands in for arbitrary code)."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_hf_malicious_pytorch_model_bin_is_not_executed(tiny_bert_dir, tmp_path):
    (tiny_bert_dir / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"w": _WritesFile(marker)}, tiny_bert_dir / "pytorch_model.bin")
    with pytest.raises(SurgeonError, match=f"^could not load Hugging Face model from '{tiny_bert_dir}': "):
        load_model(tiny_bert_dir)
    assert not marker.exists()


@pytest.mark.minilm
def test_real_minilm_dir(minilm_dir):
    loaded = load_model(minilm_dir, text="Surgeon keeps what holds.")
    assert isinstance(loaded.model, transformers.BertModel) and loaded.model.config.num_hidden_layers == 6
    _assert_batch_seq(loaded.example_inputs)
    assert loaded.tokenizer.decode(loaded.example_inputs["input_ids"][0], skip_special_tokens=True) == \
        "surgeon keeps what holds."
    with torch.no_grad():
        out = loaded.model(**loaded.example_inputs).last_hidden_state
    assert out.shape[:2] == loaded.example_inputs["input_ids"].shape and out.shape[2] == 384
    assert torch.isfinite(out).all()


def test_hf_directory_errors(tmp_path, tiny_bert_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with _raises(f"directory '{empty}' is not a Hugging Face model directory: no config.json"):
        load_model(empty)
    (tiny_bert_dir / "model.safetensors").unlink()
    with _raises(f"Hugging Face model directory '{tiny_bert_dir}' has no weights: expected model.safetensors "
                 "(or pytorch_model.bin)"):
        load_model(tiny_bert_dir)


def test_hf_text_model_without_tokenizer(save_hf, hf_tokenizer):
    d = save_hf(_bert(len(hf_tokenizer)), "bert-no-tok", tokenizer=False)
    with _raises(f"Hugging Face model directory '{d}' has no tokenizer files (tokenizer.json, vocab.txt, ...): "
                 "a text model needs its tokenizer for example inputs"):
        load_model(d)


def test_hf_remote_code_is_never_run(tmp_path):
    d = tmp_path / "remote"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mystery-net", "auto_map": {"AutoModel": "m.Net"}}))
    (d / "model.safetensors").write_bytes(b"")
    (d / "m.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w')\nNet = None\n")
    with pytest.raises(SurgeonError, match=r"surgeon never uses trust_remote_code: load it in a "
                                           r"package.module:factory instead\)$"):
        load_model(d)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------------- .pt2


class _Affine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 5)

    def forward(self, x, y=None):
        return self.lin(x) if y is None else self.lin(x) * y


def _export_pt2(path: Path, args: tuple, kwargs: dict | None = None) -> nn.Module:
    torch.manual_seed(4)
    model = _Affine().eval()
    torch.export.save(torch.export.export(model, args, kwargs), path)
    return model


def test_pt2_positional_inputs(tmp_path):
    x = torch.randn(2, 3, 4)
    original = _export_pt2(tmp_path / "m.pt2", (x,))
    loaded = load_model(tmp_path / "m.pt2")
    assert loaded.kind == "pt2" and isinstance(loaded.example_inputs, tuple)
    torch.testing.assert_close(loaded.example_inputs[0], x, rtol=0, atol=0)
    _assert_same_outputs(loaded.model, original, loaded.example_inputs)
    loaded.model.eval()  # ExportedProgram.module() raises here; capture calls it on every model


def test_pt2_keyword_inputs(tmp_path):
    original = _export_pt2(tmp_path / "m.pt2", (), {"x": torch.randn(2, 3, 4), "y": torch.randn(2, 3, 5)})
    loaded = load_model(tmp_path / "m.pt2")
    assert isinstance(loaded.example_inputs, dict) and list(loaded.example_inputs) == ["x", "y"]
    _assert_same_outputs(loaded.model, original, loaded.example_inputs)


def test_pt2_mixed_inputs_become_keywords_and_capture(tmp_path):
    original = _export_pt2(tmp_path / "m.pt2", (torch.randn(2, 3, 4),), {"y": torch.randn(2, 3, 5)})
    loaded = load_model(tmp_path / "m.pt2")
    assert list(loaded.example_inputs) == ["x", "y"]
    _assert_same_outputs(loaded.model, original, loaded.example_inputs)
    captured = surgeon.capture(loaded.model, loaded.example_inputs)
    assert captured.method.startswith("export")
    _assert_same_outputs(captured.gm, original, loaded.example_inputs)


def test_pt2_truncated_file(tmp_path):
    _export_pt2(tmp_path / "m.pt2", (torch.randn(2, 4),))
    data = (tmp_path / "m.pt2").read_bytes()
    (tmp_path / "bad.pt2").write_bytes(data[: len(data) // 2])
    with _raises(f"could not read .pt2 file '{tmp_path / 'bad.pt2'}': BadZipFile: File is not a zip file"):
        load_model(tmp_path / "bad.pt2")


# --------------------------------------------------------------------------------------------- factory


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """``write(body) -> module name``: a fresh module in tmp_path, the working directory."""
    monkeypatch.chdir(tmp_path)
    names = []

    def write(body: str) -> str:
        name = f"surgeon_factory_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text("import torch\nfrom torch import nn\n" + body)
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_factory_tuple_and_dict_inputs(factory_module, tmp_path):
    mod = factory_module(
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Linear(4, 3), (torch.randn(2, 4),)\n"
        "def make_kw():\n"
        "    return nn.Bilinear(2, 3, 4), {'input1': torch.randn(2, 2), 'input2': torch.randn(2, 3)}\n")
    before = list(sys.path)
    loaded = load_model(f"{mod}:make")
    assert sys.path == before  # the cwd was importable only while importing
    assert loaded.kind == "factory" and loaded.source == f"{mod}:make"
    assert isinstance(loaded.model, nn.Linear) and loaded.example_inputs[0].shape == (2, 4)
    model, inputs = surgeon.load(f"{mod}:make_kw")
    assert isinstance(model, nn.Bilinear) and set(inputs) == {"input1", "input2"}
    assert call(model, inputs).shape == (2, 4)


def test_factory_size_one_dimension_is_noted(factory_module):
    mod = factory_module("def make():\n    return nn.Linear(4, 3), torch.randn(1, 4)\n")
    loaded = load_model(f"{mod}:make")
    assert loaded.notes == ["example input arg0 has shape (1, 4): torch.export specialises dimensions of size 1, "
                            "so the captured graph will only accept that size there"]


def test_factory_errors(factory_module):
    mod = factory_module(
        "def boom():\n    raise RuntimeError('no weights here')\n"
        "def only_model():\n    return nn.Linear(2, 2)\n"
        "def bad_inputs():\n    return nn.Linear(2, 2), 'x'\n"
        "not_callable = 3\n")
    with _raises("cannot import module 'surgeon_no_such_module' of factory 'surgeon_no_such_module:make': "
                 "ModuleNotFoundError: No module named 'surgeon_no_such_module'"):
        load_model("surgeon_no_such_module:make")
    with _raises(f"module '{mod}' has no attribute 'missing' (factory '{mod}:missing')"):
        load_model(f"{mod}:missing")
    with _raises(f"factory '{mod}:boom' raised RuntimeError: no weights here"):
        load_model(f"{mod}:boom")
    with _raises(f"factory '{mod}:only_model' must return (nn.Module, example_inputs) with example_inputs a "
                 "tuple or dict, got Linear"):
        load_model(f"{mod}:only_model")
    with _raises(f"factory '{mod}:bad_inputs' must return (nn.Module, example_inputs) with example_inputs a "
                 "tuple or dict, got tuple (Linear, str)"):
        load_model(f"{mod}:bad_inputs")
    with _raises(f"factory '{mod}:not_callable' is not callable (it is a int)"):
        load_model(f"{mod}:not_callable")
    with _raises(f"a sentence (--text) applies only to Hugging Face text models; '{mod}:boom' is a factory"):
        load_model(f"{mod}:boom", text="hi")


def test_factory_module_failing_at_import(factory_module):
    mod = factory_module("raise ImportError('needs a GPU build')\n")
    with _raises(f"cannot import module '{mod}' of factory '{mod}:make': ImportError: needs a GPU build"):
        load_model(f"{mod}:make")


# ---------------------------------------------------------------------------------------------- pickle


def test_pickle_refused_without_trust_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save(_WritesFile(marker), path)
    with _raises(f"refusing to load pickle '{path}': unpickling can run arbitrary code; pass --trust-pickle "
                 "only if you trust its source, or save the model with torch.export.save (.pt2)"):
        load_model(path)
    assert not marker.exists()
    with _raises(f"a sentence (--text) applies only to Hugging Face text models; '{path}' is a pickle"):
        load_model(path, trust_pickle=True, text="hi")
    assert not marker.exists()


@pytest.mark.parametrize("first, shape", [(nn.Linear(6, 3), (2, 6)), (nn.Conv2d(3, 4, 3), (2, 3, 32, 32)),
                                          (nn.Linear(2, 3), (3, 2))])
def test_pickled_module_inputs_inferred_from_first_layer(tmp_path, first, shape):
    torch.manual_seed(5)
    original = nn.Sequential(first, nn.ReLU()).eval()
    torch.save(original, tmp_path / "m.pth")
    loaded = load_model(tmp_path / "m.pth", trust_pickle=True)
    assert loaded.kind == "pickle" and loaded.example_inputs[0].shape == shape
    assert "'m.pth' unpickled fully (it holds code objects; --trust-pickle given)" in loaded.notes
    _assert_same_outputs(loaded.model, original, loaded.example_inputs)


def test_pickled_model_with_inputs_tuple_dict_and_plain_pickle(tmp_path):
    torch.manual_seed(6)
    original = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)).eval()
    ids = torch.randint(0, 10, (2, 5))
    torch.save((original, (ids,)), tmp_path / "pair.pt")
    torch.save({"model": original, "example_inputs": {"input": ids}}, tmp_path / "dict.pt")
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump((original, [ids]), f)
    for name in ("pair.pt", "dict.pt", "plain.pkl"):
        loaded = load_model(tmp_path / name, trust_pickle=True)
        got = loaded.example_inputs["input"] if name == "dict.pt" else loaded.example_inputs[0]
        assert torch.equal(got, ids)
        _assert_same_outputs(loaded.model, original, loaded.example_inputs)


def test_pickle_errors(tmp_path):
    path = tmp_path / "weights.bin"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with _raises(f"pickle '{path}' holds weights only, no model: save the module itself (torch.save(model, path)) "
                 "or (model, example_inputs), or use a .pt2 file or a Hugging Face model directory"):
        load_model(path, trust_pickle=True)
    emb = tmp_path / "emb.pt"
    torch.save(nn.Sequential(nn.Embedding(10, 4)), emb)
    with _raises(f"cannot infer example inputs for the pickled Sequential in '{emb}': its first layer is "
                 "Embedding, not Linear or Conv2d; save (model, example_inputs) instead, e.g. "
                 "torch.save((model, (x,)), path)"):
        load_model(emb, trust_pickle=True)
    other = tmp_path / "list.pkl"
    torch.save([1, 2, 3], other)
    with _raises(f"pickle '{other}' holds a list (int, int, int), not an nn.Module, (model, example_inputs) or "
                 "{'model': ..., 'example_inputs': ...}"):
        load_model(other, trust_pickle=True)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(SurgeonError, match=f"^could not read pickle '{junk}': "):
        load_model(junk, trust_pickle=True)


# ------------------------------------------------------------------------------------------ bad specs


def test_missing_path_and_unknown_format(tmp_path):
    with _raises(f"model path '{tmp_path / 'x.pt2'}' does not exist"):
        load_model(tmp_path / "x.pt2")
    with _raises("model path 'no/such/dir' does not exist"):
        load_model("no/such/dir")
    odd = tmp_path / "model.xyz"
    odd.write_bytes(b"")
    with _raises(f"unknown model format '{odd}': expected a .pt2 file, a Hugging Face model directory, "
                 "package.module:factory, or a pickle (.pt/.pth/.pkl/.bin)"):
        load_model(odd)


def test_import_surgeon_does_not_import_transformers():
    code = "import sys, surgeon; surgeon.load; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
