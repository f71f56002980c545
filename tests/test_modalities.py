"""Vision and audio models end to end (issue 25, items 3 and 5).

* ``--calib DIR`` of images runs each through the model directory's image processor, of WAV/FLAC
  files through its feature extractor, in batches of 8 (``surgeon/pipeline/data.py``), and
  ``surgeon.calibration_batches(DIR, model)`` reads the same;
* OUTDIR/README.md's snippet feeds the ONNX file an image (PIL + the image processor) or a recording
  (soundfile + the feature extractor) and runs in a process where neither torch nor surgeon can be
  imported, giving the head's logits;
* the refusals (docs/errors.md rows 38 and 39): one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import surgeon
from surgeon import cli
from surgeon.deploy import SAMPLE_AUDIO, SAMPLE_IMAGE
from surgeon.errors import SurgeonError
from tests._cli import run_cli

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
ImageDraw = pytest.importorskip("PIL.ImageDraw")
sf = pytest.importorskip("soundfile")
pytest.importorskip("onnxruntime")

NUM_LABELS = 3
RATE = 16000


# --------------------------------------------------------------------------------------------------
# fixtures: a tiny ViT with its image processor, a tiny wav2vec2 with its feature extractor, the data
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ViTForImageClassification (32×32 images, patch 8, hidden 32, 2 layers) and a
    ViTImageProcessor resizing to 32×32."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=NUM_LABELS)
    out = tmp_path_factory.mktemp("vision") / "vit"
    transformers.ViTForImageClassification(cfg).eval().save_pretrained(out)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def _images(directory: Path, n: int, seed: int = 0) -> Path:
    """``n`` PNG images of noise with a rectangle and an ellipse, of varied sizes (the processor resizes)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = Image.fromarray((rng.random((36 + i, 48 - i % 5, 3)) * 255).astype("uint8"))
        draw = ImageDraw.Draw(img)
        draw.rectangle([4, 4, 8 + i, 20], fill=(255, 32 * (i % 8), 0))
        draw.ellipse([10, 12, 30, 32], outline=(0, 0, 255), width=2)
        img.save(directory / f"img{i:02d}.png")
    return directory


@pytest.fixture(scope="module")
def image_dir(vit_dir: Path) -> Path:
    return _images(vit_dir.parent / "images", 24)


@pytest.fixture(scope="module")
def vit_out(vit_dir: Path, image_dir: Path) -> Path:
    """``surgeon optimize VIT --calib IMAGES --target onnx-int8 --no-speed -o out``."""
    out = vit_dir.parent / "out"
    assert cli.main(["optimize", str(vit_dir), "-o", str(out), "--calib", str(image_dir), "--target", "onnx-int8",
                     "--no-speed"]) == 0
    return out


@pytest.fixture(scope="module")
def w2v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Wav2Vec2ForSequenceClassification (2 conv layers, hidden 32, 2 layers) and a
    Wav2Vec2FeatureExtractor at 16 kHz."""
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                      conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8),
                                      num_feat_extract_layers=2, num_conv_pos_embeddings=16,
                                      num_conv_pos_embedding_groups=2, classifier_proj_size=16,
                                      num_labels=NUM_LABELS, apply_spec_augment=False)
    out = tmp_path_factory.mktemp("audio") / "w2v"
    transformers.Wav2Vec2ForSequenceClassification(cfg).eval().save_pretrained(out)
    transformers.Wav2Vec2FeatureExtractor(sampling_rate=RATE).save_pretrained(out)
    return out


def _tones(directory: Path, n: int, rate: int = RATE) -> Path:
    """``n`` WAV files of about 0.25 s of a tone each, of slightly different lengths (the extractor pads)."""
    directory.mkdir(parents=True, exist_ok=True)
    t = np.arange(rate // 4) / rate
    for i in range(n):
        wave = 0.3 * np.sin(2 * np.pi * (220 + 40 * i) * t[:len(t) - 100 * (i % 4)])
        sf.write(directory / f"tone{i:02d}.wav", wave.astype("float32"), rate)
    return directory


def _snippet(outdir: Path, placeholder: str, data: Path) -> Path:
    """README.md's python snippet with its placeholder file replaced by ``data``, as a file in OUTDIR."""
    readme = (outdir / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)  # type: ignore[union-attr]
    assert f'"{placeholder}"' in code
    path = outdir / "README.snippet.py"
    path.write_text(code.replace(f'"{placeholder}"', repr(str(data))))
    return path


def _run_without_torch_or_surgeon(snippet: Path) -> dict[str, Any]:
    """Run ``snippet`` from its directory in a fresh, isolated Python where importing torch or surgeon
    fails; return the shapes of its ``outputs`` and its logits."""
    check = textwrap.dedent('''
        import json, sys
        sys.modules["torch"] = None  # importing either now raises ImportError
        sys.modules["surgeon"] = None
        outputs = None
        exec(compile(open("README.snippet.py").read(), "README.md", "exec"))
        print(json.dumps({"shapes": {k: list(v.shape) for k, v in outputs.items()},
                          "logits": outputs["logits"].tolist()}))
    ''')
    proc = subprocess.run([sys.executable, "-I", "-c", check], cwd=snippet.parent, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------
def test_image_directory_calibrates_in_batches_of_8(vit_out: Path) -> None:
    rep = json.loads((vit_out / "report.json").read_text())
    assert rep["calibration"]["batches"]["total"] == 3  # 24 images / 8
    assert rep["calibration"]["samples"]["fit"] + rep["calibration"]["samples"]["check"] == 24
    assert rep["targets"]["onnx-int8"]["quantized"]["int8"] > 0
    assert rep["deploy"]["preprocessing"] == {"kind": "image", "channels": 3, "height": 32, "width": 32}
    assert (vit_out / "preprocessor_config.json").is_file()


def test_image_readme_lists_the_processor_shape(vit_out: Path) -> None:
    readme = (vit_out / "README.md").read_text()
    assert "| input | `pixel_values` | float32 | [batch, 3 (channels), 32 (height), 32 (width)] |" in readme
    assert "np.random" not in readme


def test_image_readme_snippet_runs_without_torch_or_surgeon(vit_out: Path, vit_dir: Path, image_dir: Path) -> None:
    got = _run_without_torch_or_surgeon(_snippet(vit_out, SAMPLE_IMAGE, image_dir / "img05.png"))
    assert got["shapes"] == {"logits": [1, NUM_LABELS]}
    # the snippet's logits are the model's on that image (the INT8 file, so close, not equal)
    model = transformers.ViTForImageClassification.from_pretrained(vit_dir).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(vit_dir)
    pixels = processor(images=[Image.open(image_dir / "img05.png").convert("RGB")], return_tensors="np")["pixel_values"]
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(pixels)).logits
    assert torch.nn.functional.cosine_similarity(torch.tensor(got["logits"]), ref).item() > 0.99


def test_calibration_batches_reads_an_image_directory(vit_dir: Path, image_dir: Path) -> None:
    for model in (str(vit_dir), transformers.ViTForImageClassification.from_pretrained(vit_dir)):
        batches = surgeon.calibration_batches(image_dir, model)
        assert [sorted(b) for b in batches] == [["pixel_values"]] * 3
        assert [tuple(b["pixel_values"].shape) for b in batches] == [(8, 3, 32, 32)] * 3
    assert len(surgeon.calibration_batches(image_dir, str(vit_dir), batch_size=5)) == 5  # 24 = 5+5+5+5+4


# --------------------------------------------------------------------------------------------------
# audio
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow  # an optimize of a wav2vec2 (~25 s on two shared cores)
def test_audio_directory_and_readme_snippet(w2v_dir: Path) -> None:
    wavs = _tones(w2v_dir.parent / "wavs", 16)
    out = w2v_dir.parent / "out"
    assert cli.main(["optimize", str(w2v_dir), "-o", str(out), "--calib", str(wavs), "--target", "onnx-int8",
                     "--no-speed"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["calibration"]["batches"]["total"] == 2  # 16 recordings / 8
    assert rep["deploy"]["preprocessing"] == {"kind": "audio", "sampling_rate": RATE}
    assert "| input | `input_values` | float32 | [batch, samples] |" in (out / "README.md").read_text()
    got = _run_without_torch_or_surgeon(_snippet(out, SAMPLE_AUDIO, wavs / "tone03.wav"))
    assert got["shapes"] == {"logits": [1, NUM_LABELS]}


def test_calibration_batches_pads_recordings_as_the_extractor_does(w2v_dir: Path) -> None:
    wavs = _tones(w2v_dir.parent / "wavs_api", 10)
    batches = surgeon.calibration_batches(wavs, str(w2v_dir))
    # 8 + 2 recordings; each batch padded to its longest recording (4000 samples: tone00, tone04, tone08)
    assert [tuple(b["input_values"].shape) for b in batches] == [(8, 4000), (2, 4000)]
    assert all(b["input_values"].dtype == torch.float32 for b in batches)


# --------------------------------------------------------------------------------------------------
# refusals: one line, exit 2, nothing written (docs/errors.md rows 38 and 39)
# --------------------------------------------------------------------------------------------------
def _refused(argv: list[str], capsys: pytest.CaptureFixture, workdir: Path) -> str:
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("surgeon: error: "), err
    assert not (workdir / "out").exists()
    return lines[0][len("surgeon: error: "):]


def _vit_here(vit_dir: Path, workdir: Path, processor: bool = True) -> None:
    shutil.copytree(vit_dir, workdir / "vit")
    if not processor:
        (workdir / "vit" / "preprocessor_config.json").unlink()


def test_unreadable_image_is_named(vit_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    _vit_here(vit_dir, tmp_path)
    _images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "img01.png").write_bytes(b"\x89PNG garbage, not an image")
    msg = _refused(["optimize", "vit", "-o", "out", "--calib", "imgs"], capsys, tmp_path)
    assert msg == "cannot read calibration image 'imgs/img01.png': not an image file PIL can read"


@pytest.mark.parametrize("content, message", [
    ((), "calibration directory 'imgs' is empty"),
    (("notes.txt", "labels.csv"), "calibration directory 'imgs' holds no image files (.png, .jpg, .jpeg, .bmp, .webp); "
                                  "it holds labels.csv, notes.txt"),
])
def test_directory_without_images(vit_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture, content: tuple[str, ...], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    _vit_here(vit_dir, tmp_path)
    (tmp_path / "imgs").mkdir()
    for name in content:
        (tmp_path / "imgs" / name).write_text("x\n")
    assert _refused(["optimize", "vit", "-o", "out", "--calib", "imgs"], capsys, tmp_path) == message


def test_vision_model_without_its_image_processor(vit_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    _vit_here(vit_dir, tmp_path, processor=False)
    _images(tmp_path / "imgs", 2)
    msg = _refused(["optimize", "vit", "-o", "out", "--calib", "imgs"], capsys, tmp_path)
    assert msg == ("a calibration directory of image files needs the model's image processor: 'vit' has no "
                   "preprocessor_config.json (save it there with the image processor's save_pretrained), or give a "
                   ".pt file of input batches")


def test_recording_at_another_rate(w2v_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(w2v_dir, tmp_path / "w2v")
    _tones(tmp_path / "wavs", 2)
    _tones(tmp_path / "wavs8k", 1, rate=8000)
    shutil.copy(tmp_path / "wavs8k" / "tone00.wav", tmp_path / "wavs" / "tone01.wav")
    msg = _refused(["optimize", "w2v", "-o", "out", "--calib", "wavs"], capsys, tmp_path)
    assert msg == ("calibration audio 'wavs/tone01.wav' is sampled at 8000 Hz; the model's feature extractor takes "
                   "16000 Hz: resample the files first (surgeon does not resample)")


def test_unreadable_recording_is_named(w2v_dir: Path, tmp_path: Path) -> None:
    wavs = _tones(tmp_path / "wavs", 1)
    (wavs / "tone00.wav").write_bytes(b"RIFF not a wave file")
    with pytest.raises(SurgeonError, match=r"^cannot read calibration audio '.*tone00\.wav': ") as exc:
        surgeon.calibration_batches(wavs, str(w2v_dir))
    assert "\n" not in str(exc.value)


def test_text_model_refuses_a_directory(image_dir: Path, hf_tokenizer: Any) -> None:
    with pytest.raises(SurgeonError, match=r"^cannot read calibration file '.*images': it is a directory$"):
        surgeon.calibration_batches(image_dir, hf_tokenizer)


@pytest.mark.parametrize("pre, config, want", [
    ({"do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256}}, {},
     (3, 224, 224)),  # the crop decides
    ({"size": {"shortest_edge": 256}}, {"image_size": 384, "num_channels": 1}, (1, 384, 384)),  # the config's
    ({"size": {"shortest_edge": 256}}, {}, (3, None, None)),  # the image's aspect ratio: unknown
])
def test_preprocessing_sizes(tmp_path: Path, pre: dict, config: dict, want: tuple) -> None:
    from surgeon.deploy import preprocessing_of, readme

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = {"inputs": [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", "s1", "s2", "s3"]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 3]}]}
    prep = preprocessing_of(tmp_path, spec)
    assert prep is not None and (prep["channels"], prep["height"], prep["width"]) == want
    text = readme(spec, filename="model.onnx", fp8_option=None, tokenizer=None, pad_token=None, max_length=None,
                  title="t", preprocessing=prep)
    dims = [f"{v} ({n})" if v else n for n, v in zip(("channels", "height", "width"), want)]
    assert f"| input | `pixel_values` | float32 | [batch, {', '.join(dims)}] |" in text
    assert ('.convert("L")' if want[0] == 1 else '.convert("RGB")') in text
