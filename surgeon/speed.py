"""What a written model buys on this machine: latency side by side with the original, bytes, ISA.

``measure(target, optimized, original, inputs)`` times two files of one target on that target's
runtime (``Target.runner``), *round robin* in one process, so that whatever else loads the machine
hits both alike; the figures are medians of ``runs`` timed calls after ``warmup`` calls each. The
ratio is what the report states (``report["speed"]``, docs/report.md); absolute milliseconds are
only comparable within one measurement. ``cpu()`` names the instruction sets that decide what INT8
kernels a CPU runs (AVX2 ``vpmaddubsw``, AVX512-VNNI / AVX-VNNI ``vpdpbusd``, AMX).
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["cpu", "side_by_side", "measure", "measure_decode_step", "bench_outdir", "DEFAULT_RUNS",
           "DEFAULT_THREADS"]

DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3
DEFAULT_THREADS = 2

_ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
              "fma")


def cpu() -> dict[str, Any]:
    """This CPU: model name, cores, the ISA flags that matter for INT8/FP8 kernels, and a short class
    (``x86-64 AVX512-VNNI`` / ``x86-64 AVX-VNNI`` / ``x86-64 AVX2`` / the machine name elsewhere)."""
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name" and value.strip():
            model = value.strip()
    found = [f for f in _ISA_FLAGS if f in flags]
    if "avx512_vnni" in flags:
        klass = "x86-64 AVX512-VNNI"
    elif "avx_vnni" in flags:
        klass = "x86-64 AVX-VNNI"
    elif "avx2" in flags:
        klass = "x86-64 AVX2 (no VNNI)"
    else:
        klass = platform.machine() or "unknown"
    return {"model": model, "cores": os.cpu_count(), "flags": found, "class": klass,
            "vnni": "avx512_vnni" in flags or "avx_vnni" in flags}


def side_by_side(runners: Mapping[str, Callable[[], Any]], *, runs: int = DEFAULT_RUNS,
                 warmup: int = DEFAULT_WARMUP) -> dict[str, dict[str, float]]:
    """Median / min / max and 10th / 90th percentile wall time in ms of each runner, called round robin
    ``runs`` times (the percentiles interpolate between runs; with one run all five are that run)."""
    if runs < 1:
        raise ValueError(f"runs must be ≥ 1, got {runs}")
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            t = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), **_p10_p90(ts)}
            for name, ts in times.items()}


def _p10_p90(ts: list[float]) -> dict[str, float]:
    if len(ts) < 2:
        return {"p10_ms": ts[0], "p90_ms": ts[0]}
    q = statistics.quantiles(ts, n=10, method="inclusive")
    return {"p10_ms": q[0], "p90_ms": q[-1]}


def _shape(inputs: Any) -> dict[str, list[int]]:
    from .inputs import as_args_kwargs

    args, kwargs = as_args_kwargs(inputs)
    items = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    return {k: list(getattr(v, "shape", ())) for k, v in items if hasattr(v, "shape")}


def measure(target: Any, optimized: str | os.PathLike, original: str | os.PathLike, inputs: Any, *,
            runs: int = DEFAULT_RUNS, threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    """``report["speed"]``: latency of ``optimized`` vs ``original`` (two files of ``target``) on
    ``target``'s runtime, side by side, plus their sizes and this machine's CPU."""
    runners = {"original": target.runner(original, inputs, threads=threads),
               "optimized": target.runner(optimized, inputs, threads=threads)}
    timed = side_by_side(runners, runs=runs)
    size = _sizes(original, optimized)
    o, n = timed["original"]["median_ms"], timed["optimized"]["median_ms"]
    memory = _memory(target, {"original": original, "optimized": optimized}, inputs, threads)
    return {
        "target": target.name,
        "runtime": target.runtime,
        "latency_ms": {k: round(v["median_ms"], 3) for k, v in timed.items()},
        "latency_spread_ms": {k: {s: round(v[f"{s}_ms"], 3) for s in ("min", "p10", "p90", "max")}
                              for k, v in timed.items()},
        "latency_ratio": round(n / o, 4) if o > 0 else None,
        "bytes": size,
        "size_ratio": round(size["optimized"] / size["original"], 4) if size["original"] else None,
        "inputs": _shape(inputs),
        "threads": threads,
        "runs": runs,
        "statistic": "median, round robin in one process",
        **({"peak_memory": memory} if memory else {}),
        "cpu": cpu(),
    }


def _sizes(original: str | os.PathLike, optimized: str | os.PathLike) -> dict[str, int]:
    """Bytes of each file, an ONNX file's external data included (``targets/_external_data.py``)."""
    from .resources import file_bytes

    return {"original": file_bytes(original), "optimized": file_bytes(optimized)}


def _memory(target: Any, files: Mapping[str, str | os.PathLike], inputs: Any, threads: int) -> dict[str, Any]:
    """``speed["peak_memory"]``: each file's one-run resident-set peak (``Target.peak_memory``, a fresh
    process per file) and their ratio; empty when the target does not measure it."""
    figures = {k: target.peak_memory(p, inputs, threads=threads) for k, p in files.items()}
    if any(f is None for f in figures.values()):
        return {}
    out: dict[str, Any] = {"run_peak_bytes": {k: f.get("run_peak_bytes") for k, f in figures.items()}}
    errors = {k: f["error"] for k, f in figures.items() if "error" in f}
    if errors:
        out["errors"] = errors
    o, n = out["run_peak_bytes"]["original"], out["run_peak_bytes"]["optimized"]
    out["ratio"] = round(n / o, 4) if o and n is not None else None
    out["how"] = next((f["how"] for f in figures.values() if "how" in f), None)
    return out


DECODE_PAST = 512  # the cache length a decoder OUTDIR's decode step is timed at (fewer when the model has fewer positions)
DECODE_BATCH = 4


def _spread(timed: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {q: round(v[f"{q}_ms"], 3) for q in ("min", "median", "max")} for k, v in timed.items()}


def measure_decode_step(target: Any, optimized: str | os.PathLike, original: str | os.PathLike, *, vocab: int,
                        past: int = DECODE_PAST, batch: int = DECODE_BATCH, runs: int = DEFAULT_RUNS,
                        threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    """``report["speed"]`` of a decoder OUTDIR: one decode step (one new token per row, after a cache of
    ``past`` tokens that each file's own prefill wrote) of ``optimized`` against ``original`` (the
    fp32-cache file), round robin in one process like ``measure``, plus the cache each holds then;
    the same at batch 1 as decode tokens per second, and the prefill of a ``past``-token prompt at batch
    1 (``max(3, runs // 4)`` runs: it is ``past`` times the work); each with min / median / max.
    ``target`` is the decoder target that wrote them (its sessions run them)."""
    import numpy as np

    from .decoder.generate import OrtRunner

    ids = (np.arange(batch * (past + 1), dtype=np.int64).reshape(batch, past + 1) * 7919) % vocab
    mask = np.ones((batch, past + 1), dtype=np.int64)
    pos = np.ascontiguousarray(np.broadcast_to(np.arange(past + 1, dtype=np.int64), (batch, past + 1)))
    files = {"original": original, "optimized": optimized}
    sessions = {k: OrtRunner(target.session(p, threads=threads, spinning=False), str(p)) for k, p in files.items()}
    cache: dict[str, int] = {}
    steps: dict[int, dict[str, Callable[[], Any]]] = {batch: {}, 1: {}}
    prefill: dict[str, Callable[[], Any]] = {}
    for key, runner in sessions.items():
        for b in steps:
            _, present = runner.step(ids[:b, :past], mask[:b, :past], pos[:b, :past], runner.empty_past(b))
            if b == batch:
                cache[key] = OrtRunner.cache_nbytes(present)
            steps[b][key] = functools.partial(runner.step, ids[:b, past:], mask[:b], pos[:b, past:], present)
        prefill[key] = functools.partial(runner.step, ids[:1, :past], mask[:1, :past], pos[:1, :past],
                                         runner.empty_past(1))
    timed = side_by_side(steps[batch], runs=runs)
    single = side_by_side(steps[1], runs=runs)
    pre = side_by_side(prefill, runs=max(3, runs // 4), warmup=1)
    o, n = timed["original"]["median_ms"], timed["optimized"]["median_ms"]
    size = _sizes(original, optimized)
    return {
        "target": target.name, "runtime": target.runtime,
        "decode_step_ms": {k: round(v["median_ms"], 3) for k, v in timed.items()},
        "decode_step_ms_spread": _spread(timed),
        "latency_ratio": round(n / o, 4) if o > 0 else None,
        "decode_tokens_per_s_batch1": {k: round(1e3 / v["median_ms"], 2) for k, v in single.items()},
        "decode_step_ms_batch1_spread": _spread(single),
        "prefill_ms": {k: round(v["median_ms"], 3) for k, v in pre.items()}, "prefill_ms_spread": _spread(pre),
        "prefill_tokens": past,
        "cache_bytes": cache, "cache_ratio": round(cache["optimized"] / cache["original"], 4) if cache["original"] else None,
        "bytes": size, "past_length": past, "batch": batch, "threads": threads, "runs": runs,
        "statistic": "median (and min / max) of one decode step, round robin in one process", "cpu": cpu(),
    }


def bench_outdir(outdir: str | os.PathLike, *, runs: int = DEFAULT_RUNS, threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    """``surgeon bench OUTDIR``: measure an OUTDIR written by ``surgeon optimize`` again, on this machine
    (a serving host is not the machine that optimized): the file of its target against
    ``bench/original.*`` on ``bench/inputs.pt``, exactly as the report's ``speed`` was measured."""
    import json

    import torch

    from .errors import SurgeonError

    out = Path(outdir)
    report_path = out / "report.json"
    if not report_path.is_file():
        raise SurgeonError(f"'{out}' is not an OUTDIR written by surgeon optimize: no report.json")
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SurgeonError(f"cannot read '{report_path}': {exc}") from None
    files = (report.get("speed") or {}).get("files")
    if not files:
        raise SurgeonError(f"'{out}' has no timing files (bench/): it was written with --no-speed or by an older "
                           "surgeon; run surgeon optimize again")
    missing = [f for f in files.values() if not (out / f).is_file()]
    if missing:
        raise SurgeonError(f"'{out}' lacks {', '.join(missing)}: copy the whole OUTDIR")
    from . import targets  # type: ignore[attr-defined]

    target = targets.get_target(report["speed"]["target"])
    if target.model_kind == "decoder":  # one decode step, timed after each file's own prefill
        sp = report["speed"]
        figures = measure_decode_step(target, out / files["optimized"], out / files["original"], vocab=sp["vocab"],
                                      past=sp["past_length"], batch=sp["batch"], runs=runs, threads=threads)
        figures.update(files=files, vocab=sp["vocab"], optimized_on=sp.get("cpu"),
                       reported={k: sp.get(k) for k in ("latency_ratio", "cache_ratio", "decode_step_ms")})
        return figures
    inputs = torch.load(out / files["inputs"], weights_only=True)  # tensors only: never unpickle code
    figures = measure(target, out / files["optimized"], out / files["original"], inputs, runs=runs, threads=threads)
    figures["files"] = files
    figures["optimized_on"] = report["speed"].get("cpu")
    figures["reported"] = {k: report["speed"].get(k) for k in ("latency_ratio", "size_ratio", "latency_ms")}
    return figures
