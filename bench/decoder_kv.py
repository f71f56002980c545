"""Decoder KV cache (issue 17): what ``surgeon optimize --target onnx-decoder`` writes, fp32 vs INT8 vs FP8 cache.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/decoder_kv.py`` (``make bench``; a few minutes).
Writes ``bench/results/decoder_kv.json`` and ``bench/results/decoder_kv.md``.

Model: the tiny Llama of ``bench/train_decoder.py`` (``bench/data/tiny-decoder``, 4 layers, GQA 4:2,
trained on the Python standard library), calibrated on ``bench/data/decoder_calib.txt`` (64 prompts
of ~550 tokens) and, in two more rows, on ``bench/data/decoder_calib_lines.txt`` (64 one-line
prompts of ~20 tokens), measured on ``bench/data/decoder_heldout.txt`` (files it was never trained or
calibrated on).

Each file is written by the CLI as a user runs it (``surgeon optimize LM_DIR -o OUT --target
onnx-decoder --passes 'kv-cache-quant{…}' --calib …``; the fp32 cache ``surgeon export LM_DIR -o OUT
--target onnx-decoder``; one subprocess each) and then read only through its file
contract — Hugging Face Optimum's decoder-with-past convention: inputs ``input_ids``,
``attention_mask`` (past + new), ``position_ids``, ``past_key_values.<i>.key|value``
([batch, kv_heads, past, head_dim], the cache dtype read from the graph inputs); outputs
``logits``, ``present.<i>.key|value``. Nothing of surgeon's Python is used to run them except
``session_config`` (the ORT settings surgeon tells a server to use: FTZ/DAZ, the FP8 Q/DQ option).

Measured side by side in one process, ORT CPU sessions with 2 intra-op threads, spinning off:

* cache bytes per token: per sequence, all layers, from the shapes and dtypes of the ``present``
  outputs of a real run (so scales or extra cache outputs would count), and the ratio to fp32;
* held-out perplexity: teacher-forced over the same 512-token windows as ``train_decoder.py``
  (each from an empty cache), fed in chunks of 128 tokens through the cache loop, so every chunk
  after the first attends to a cache the file wrote; plus torch's fp32 figure on the same windows;
* greedy agreement with the fp32 file: 8 held-out prompts of 128 tokens, 64 new tokens each,
  batch 8; the share of positions with the same token, and the share before the first divergence;
* decode-step latency: one new token at past length 1024, batch 4 (a real 1024-token prefill of
  held-out text supplies the cache), round robin, median, ratio to fp32.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data"
MODEL_DIR = DATA / "tiny-decoder"
CALIB = DATA / "decoder_calib.txt"              # 64 prompts of ~550 tokens (train_decoder.py)
CALIB_LINES = DATA / "decoder_calib_lines.txt"  # 64 prompts of one source line (~20 tokens)
HELDOUT = DATA / "decoder_heldout.txt"
THREADS = 2

TARGET = "onnx-decoder"
# The fp32-cache file: no pass, which the CLI spells `surgeon export LM -o OUT --target onnx-decoder`
# (docs/decoder.md); None in VARIANTS means that command.
PASSES_OFF = None
GRANULARITY = "head"
_INT8 = "kv-cache-quant{{dtype=int8,granularity={g}}}"
_FP8 = "kv-cache-quant{{dtype=fp8,granularity={g}}}"
VARIANTS: dict[str, tuple[str | None, Path]] = {  # row name → (--passes, --calib)
    "fp32": (PASSES_OFF, CALIB),
    "int8": (_INT8, CALIB),
    "fp8": (_FP8, CALIB),
    # The same passes calibrated on one-line prompts: the cache's scales and key offsets then come
    # from positions < ~40 only, and RoPE'd keys at later positions leave that range.
    "int8, 1-line calib": (_INT8, CALIB_LINES),
    "fp8, 1-line calib": (_FP8, CALIB_LINES),
}
# Bounds no 8-bit cache breaks: writes the pass's own format whatever it measures.
LOOSE_TOLERANCE = "ppl_increase=100,agreement=0"
TARGETS = {"cache_ratio_max": 0.27, "ppl_change_max_pct": 1.0, "greedy_agreement_min": 0.95}

WINDOW, CHUNK = 512, 128            # perplexity: windows as train_decoder.py, fed 128 tokens at a time
PROMPTS, PROMPT_LEN, NEW_TOKENS = 8, 128, 64
PAST, BATCH = 1024, 4               # decode-step latency

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
# Bytes of one element of each ONNX element type a cache can have.
_ITEMSIZE = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(bfloat16)": 2, "tensor(int8)": 1, "tensor(uint8)": 1,
             "tensor(float8e4m3fn)": 1, "tensor(float8e4m3fnuz)": 1, "tensor(float8e5m2)": 1,
             "tensor(float8e5m2fnuz)": 1, "tensor(int4)": 0.5, "tensor(uint4)": 0.5}


def optimize(model_dir: Path, out: Path, passes: str | None, calib: Path, tolerance: str | None = None) -> dict[str, Any]:
    """``surgeon optimize`` (``surgeon export`` for no pass) as a user runs it; returns its
    report.json (plus the wall time)."""
    if passes is None:
        cmd = [sys.executable, "-m", "surgeon", "export", str(model_dir), "-o", str(out), "--target", TARGET, "--force"]
    else:
        cmd = [sys.executable, "-m", "surgeon", "optimize", str(model_dir), "-o", str(out), "--target", TARGET,
               "--passes", passes, "--calib", str(calib), "--force", *(["--tolerance", tolerance] if tolerance else [])]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t
    # Exit 3 is "written, but some pass rolled back" (docs/cli.md): still a file to measure.
    if proc.returncode not in (0, 3) or not (out / "model.onnx").is_file():
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    shown = " ".join(cmd[1:]).replace(str(ROOT) + os.sep, "")  # repository-relative, as the docs show it
    return {"command": shown, "exit": proc.returncode, "wall_s": round(wall, 1), "report": report}


class Decoder:
    """One ``model.onnx`` of the decoder contract, driven through its cache with ORT OrtValues (so an
    FP8 cache, which numpy cannot hold, goes from one step's outputs to the next step's inputs as is)."""

    def __init__(self, path: Path, lm_config: dict[str, Any], threads: int = THREADS) -> None:
        import onnx
        import onnxruntime as ort

        from surgeon.targets.onnx import FP8_DISABLED_OPTIMIZERS, FP8_SESSION_OPTION, session_config

        self.ort = ort
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        config = session_config(path)
        config.setdefault("session.set_denormal_as_zero", "1")
        for k, v in config.items():
            so.add_session_config_entry(k, v)
        fp8 = config.get(FP8_SESSION_OPTION[0]) == FP8_SESSION_OPTION[1]
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                         disabled_optimizers=list(FP8_DISABLED_OPTIMIZERS) if fp8 else None)
        self.session_config = config
        graph = onnx.load(str(path), load_external_data=False).graph
        elem = {v.name: v.type.tensor_type.elem_type for v in graph.input}
        ins = {i.name: i for i in self.sess.get_inputs()}
        outs = {o.name: o for o in self.sess.get_outputs()}
        past = sorted((int(m[1]), m[2] == "value", n) for n in ins if (m := _PAST.match(n)))
        self.past_names = [n for _, _, n in past]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        missing = [n for n in ["input_ids", "attention_mask", "logits", *self.present_names] if n not in {**ins, **outs}]
        if missing or not self.past_names:
            raise SystemExit(f"{path}: not a decoder-with-past file (missing {missing or 'past_key_values.*'})")
        self.extra_outputs = [n for n in outs if n.startswith("present") and n not in self.present_names]
        self.input_names = set(ins)
        self.past_type = ins[self.past_names[0]].type              # e.g. tensor(int8)
        self.past_elem = elem[self.past_names[0]]                  # the ONNX enum, for empty OrtValues
        self.present_type = outs[self.present_names[0]].type
        shape = ins[self.past_names[0]].shape                      # [batch, kv_heads, past, head_dim]
        heads = lm_config.get("num_key_value_heads") or lm_config["num_attention_heads"]
        dim = lm_config.get("head_dim") or lm_config["hidden_size"] // lm_config["num_attention_heads"]
        self.kv_heads = shape[1] if isinstance(shape[1], int) else heads
        self.head_dim = shape[3] if isinstance(shape[3], int) else dim
        self.outputs = ["logits", *self.present_names, *self.extra_outputs]

    def empty_past(self, batch: int) -> list[Any]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        ov = self.ort.OrtValue
        if self.past_type.startswith("tensor(float8"):
            return [ov.ortvalue_from_numpy_with_onnx_type(np.zeros(shape, np.uint8), self.past_elem)
                    for _ in self.past_names]
        np_type = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
                   "tensor(uint8)": np.uint8}[self.past_type]
        return [ov.ortvalue_from_numpy(np.zeros(shape, np_type)) for _ in self.past_names]

    def feeds(self, ids: np.ndarray, past: list[Any], past_len: int) -> dict[str, Any]:
        ov = self.ort.OrtValue.ortvalue_from_numpy
        b, t = ids.shape
        feeds = {"input_ids": ov(np.ascontiguousarray(ids, dtype=np.int64)),
                 "attention_mask": ov(np.ones((b, past_len + t), np.int64))}
        if "position_ids" in self.input_names:
            feeds["position_ids"] = ov(np.ascontiguousarray(np.broadcast_to(np.arange(past_len, past_len + t), (b, t))))
        feeds.update(zip(self.past_names, past))
        return feeds

    def step(self, ids: np.ndarray, past: list[Any] | None, past_len: int) -> tuple[np.ndarray, list[Any]]:
        """(logits as float32 numpy, the present OrtValues to feed next)."""
        if past is None:
            past = self.empty_past(ids.shape[0])
        out = self.sess.run_with_ort_values(self.outputs, self.feeds(ids, past, past_len))
        self.last = out  # every output of the latest step, extra cache outputs included (for the bytes)
        return out[0].numpy(), out[1:1 + len(self.present_names)]

    def cache_bytes_per_token(self, batch: int, seq: int) -> float:
        """Bytes of every present output of the latest step (all layers, keys and values, and any
        extra ``present*`` output) per sequence and token, from its shapes and the graph's dtypes."""
        outs = {o.name: o.type for o in self.sess.get_outputs()}
        total = 0.0
        for name, value in zip(self.outputs[1:], self.last[1:]):
            total += math.prod(value.shape()) * _ITEMSIZE[outs[name]]
        return total / (batch * seq)


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m[..., 0] + np.log(np.exp(x - m).sum(-1)))
    return float((lse - np.take_along_axis(x, targets[..., None], -1)[..., 0]).sum())


def windows(ids: np.ndarray, size: int) -> list[np.ndarray]:
    """Consecutive non-overlapping windows of ``size`` inputs (+1 target), as train_decoder.perplexity."""
    out = []
    for s in range(0, len(ids) - 1, size):
        x = ids[s:s + size + 1]
        if len(x) >= 2:
            out.append(x)
    return out


def perplexity_onnx(dec: Decoder, wins: list[np.ndarray], chunk: int, batch: int = 8) -> tuple[float, np.ndarray]:
    """(perplexity, the argmax at every position, in a fixed order: for teacher-forced agreement)."""
    nll, count, top = 0.0, 0, []
    groups: dict[int, list[np.ndarray]] = {}
    for w in wins:
        groups.setdefault(len(w), []).append(w)
    for _, ws in sorted(groups.items()):
        for i in range(0, len(ws), batch):
            x = np.stack(ws[i:i + batch])
            inp, tgt = x[:, :-1], x[:, 1:]
            past, pos = None, 0
            while pos < inp.shape[1]:
                logits, past = dec.step(inp[:, pos:pos + chunk], past, pos)
                nll += log_softmax_nll(logits, tgt[:, pos:pos + chunk])
                top.append(logits.argmax(-1).ravel())
                pos += logits.shape[1]
            count += tgt.size
    return math.exp(nll / count), np.concatenate(top)


def perplexity_torch(model_dir: Path, wins: list[np.ndarray]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            x = torch.from_numpy(w.astype(np.int64))
            logits = model(input_ids=x[None, :-1]).logits[0].float()
            nll += torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum").item()
            count += len(w) - 1
    return math.exp(nll / count)


def greedy(dec: Decoder, prompts: np.ndarray, new: int, forced: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(``new`` greedy tokens, the top-1 − top-2 logit margin at each). With ``forced`` the file is
    fed those tokens instead of its own (teacher forcing along another file's greedy path)."""
    logits, past = dec.step(prompts, None, 0)
    last = [logits[:, -1]]
    pos = prompts.shape[1]
    for i in range(new - 1):
        feed = last[-1].argmax(-1) if forced is None else forced[:, i]
        logits, past = dec.step(feed[:, None], past, pos)
        pos += 1
        last.append(logits[:, -1])
    x = np.stack(last, 1)
    top2 = np.sort(x, -1)[..., -2:]
    return x.argmax(-1), top2[..., 1] - top2[..., 0]


def agreement(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    same = ref == got
    # Before the first divergence: after it the two continuations condition on different text, and
    # position-wise equality there is partly chance.
    prefix = np.where(same.all(1), same.shape[1], same.argmin(1))
    return {"positionwise": float(same.mean()), "before_first_divergence": float(prefix.mean() / same.shape[1]),
            "identical_sequences": int(same.all(1).sum())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODEL_DIR))
    ap.add_argument("--granularity", default=GRANULARITY, choices=["tensor", "head"])
    ap.add_argument("--outdirs", nargs="*", metavar="NAME=DIR",
                    help="measure these OUTDIRs (already written) instead of running surgeon optimize")
    ap.add_argument("--work", help="where to write the OUTDIRs (default: a temporary directory, removed)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--heldout-tokens", type=int, default=0, help="use only the first N held-out tokens (0: all)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/decoder_kv.json"))
    args = ap.parse_args(argv)
    import onnxruntime as ort
    import torch
    from transformers import AutoTokenizer

    from surgeon.speed import cpu, side_by_side

    torch.set_num_threads(THREADS)
    model_dir = Path(args.model)
    lm_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    text = HELDOUT.read_text(encoding="utf-8")
    ids = np.asarray(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64)
    if args.heldout_tokens:
        ids = ids[:args.heldout_tokens]
    if len(ids) < max(PROMPTS * (PROMPT_LEN + NEW_TOKENS), BATCH * PAST + 1):
        raise SystemExit(f"{HELDOUT}: {len(ids)} tokens is too little held-out text")

    t0 = time.perf_counter()
    written: dict[str, dict[str, Any]] = {}
    tmp = None
    if args.outdirs:
        dirs = dict(item.split("=", 1) for item in args.outdirs)
        dirs = {k: Path(v) for k, v in dirs.items()}
    else:
        work = Path(args.work) if args.work else Path(tmp := tempfile.mkdtemp(prefix="decoder_kv."))
        dirs = {}
        for name, (passes, calib) in VARIANTS.items():
            passes = passes.format(g=args.granularity) if passes is not None else None
            dirs[name] = work / re.sub(r"\W+", "-", name)
            print(f"{name}: surgeon {'export' if passes is None else 'optimize'} … {passes or ''}", flush=True)
            written[name] = optimize(model_dir, dirs[name], passes, calib)
            print(f"  exit {written[name]['exit']}, {written[name]['wall_s']} s", flush=True)
            chosen = (written[name]["report"].get("guard") or {}).get("chosen")
            if passes is not None and chosen != f"{name.split(',')[0]}-{args.granularity}":
                # The guard rolled the format back (to the next rung of the ladder, or the fp32
                # cache): measure the format anyway, written with the guard's bounds opened, in a
                # row of its own.
                forced = f"{name} (guard opened)"
                dirs[forced] = work / (dirs[name].name + "-forced")
                written[forced] = optimize(model_dir, dirs[forced], passes, calib, LOOSE_TOLERANCE)
                print(f"  rolled back to {chosen}; {forced}: exit {written[forced]['exit']}", flush=True)
    if "fp32" not in dirs:
        raise SystemExit("need an fp32 row (fp32=DIR) to compare against")
    try:
        decs = {name: Decoder(d / "model.onnx", lm_config) for name, d in dirs.items()}
        rows: dict[str, dict[str, Any]] = {}
        for name, dec in decs.items():
            rows[name] = {"cache_dtype": dec.past_type.removeprefix("tensor(").rstrip(")"),
                          "present_dtype": dec.present_type.removeprefix("tensor(").rstrip(")"),
                          "extra_cache_outputs": dec.extra_outputs, "kv_heads": dec.kv_heads, "head_dim": dec.head_dim,
                          "layers": len(dec.past_names) // 2, "session_config": dec.session_config,
                          "file_bytes": (dirs[name] / "model.onnx").stat().st_size}
            if name in written:
                rep = written[name]["report"]
                rows[name]["surgeon"] = {k: written[name][k] for k in ("command", "exit", "wall_s")}
                # What the CLI says it chose (the guard may roll a format back to the next rung).
                rows[name]["surgeon"].update({k: rep.get(k) for k in ("passes", "guard", "verdict", "warnings")})

        # Cache bytes: a real 4 × 1024 prefill, which also supplies the cache for the latency rows.
        starts = np.linspace(0, len(ids) - PAST - 1, BATCH).astype(int)
        prefill = np.stack([ids[s:s + PAST] for s in starts])
        nxt = np.stack([ids[s + PAST:s + PAST + 1] for s in starts])
        caches = {}
        for name, dec in decs.items():
            _, presents = dec.step(prefill, None, 0)
            caches[name] = presents
            rows[name]["cache_bytes_per_token"] = dec.cache_bytes_per_token(BATCH, PAST)
        base = rows["fp32"]["cache_bytes_per_token"]
        for row in rows.values():
            row["cache_ratio"] = row["cache_bytes_per_token"] / base
        print("cache bytes/token: " + ", ".join(f"{k} {r['cache_bytes_per_token']:.0f}" for k, r in rows.items()),
              flush=True)

        wins = windows(ids, WINDOW)
        top: dict[str, np.ndarray] = {}
        ppl_torch = perplexity_torch(model_dir, wins)
        for name, dec in decs.items():
            rows[name]["heldout_ppl"], top[name] = perplexity_onnx(dec, wins, CHUNK)
            print(f"{name}: held-out perplexity {rows[name]['heldout_ppl']:.4f} (torch fp32 {ppl_torch:.4f})", flush=True)
        for row in rows.values():
            row["ppl_change_pct"] = 100 * (row["heldout_ppl"] / rows["fp32"]["heldout_ppl"] - 1)

        pstarts = np.linspace(0, len(ids) - PROMPT_LEN - 1, PROMPTS).astype(int)
        prompts = np.stack([ids[s:s + PROMPT_LEN] for s in pstarts])
        # Teacher-forced next-token agreement over all held-out positions (what the CLI's guard
        # measures, in torch, on its own held-out calibration lines).
        for name in decs:
            rows[name]["next_token_agreement_heldout"] = float((top[name] == top["fp32"]).mean())
        gen = {name: greedy(dec, prompts, NEW_TOKENS)[0] for name, dec in decs.items()}
        ref_path, ref_margin = greedy(decs["fp32"], prompts, NEW_TOKENS, forced=gen["fp32"])
        for name, dec in decs.items():
            rows[name]["greedy"] = agreement(gen["fp32"], gen[name])
            # Along the fp32 file's own greedy path: does this file pick the same next token at each
            # of the 64 steps? (Free-running text diverges for good at the first flip.)
            forced, _ = greedy(dec, prompts, NEW_TOKENS, forced=gen["fp32"])
            flips = forced != gen["fp32"]
            rows[name]["greedy"]["along_fp32_path"] = float(1 - flips.mean())
            rows[name]["greedy"]["fp32_margin_at_flips"] = [round(float(m), 4) for m in ref_margin[flips]]
        rows["fp32"]["greedy"]["fp32_margin_median"] = float(np.median(ref_margin))
        assert (ref_path == gen["fp32"]).all()  # the fp32 file reproduces its own path when forced
        print("greedy agreement: " + ", ".join(f"{k} {r['greedy']['before_first_divergence']:.3f}" for k, r in rows.items()),
              flush=True)
        sample = {name: tok.decode(g[0].tolist()) for name, g in gen.items()}

        feeds = {name: dec.feeds(nxt, caches[name], PAST) for name, dec in decs.items()}
        runners = {name: (lambda d=dec, f=feeds[name]: d.sess.run_with_ort_values(d.outputs, f))
                   for name, dec in decs.items()}
        timed = side_by_side(runners, runs=args.runs, warmup=5)
        for name, t in timed.items():
            rows[name]["decode_ms"] = t
            rows[name]["decode_ratio"] = t["median_ms"] / timed["fp32"]["median_ms"]
        print("decode step ms: " + ", ".join(f"{k} {t['median_ms']:.3f}" for k, t in timed.items()), flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    info = cpu()
    result = {
        "issue": 17, "command": "HF_HUB_OFFLINE=1 .venv/bin/python bench/" + Path(__file__).name
        + (f" --granularity {args.granularity}" if args.granularity != GRANULARITY else ""),
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "model": str(model_dir.relative_to(ROOT))
        if model_dir.is_relative_to(ROOT) else str(model_dir),
        "onnxruntime": ort.__version__, "torch": torch.__version__, "threads": THREADS, "cpu": info,
        "load_average": os.getloadavg(), "granularity": args.granularity,
        "heldout_tokens": int(len(ids)), "ppl_window": WINDOW, "ppl_chunk": CHUNK, "torch_fp32_ppl": ppl_torch,
        "greedy": {"prompts": PROMPTS, "prompt_tokens": PROMPT_LEN, "new_tokens": NEW_TOKENS},
        "decode": {"batch": BATCH, "past": PAST, "runs": args.runs, "statistic": "median, round robin"},
        "targets": TARGETS, "rows": rows, "sample_first_prompt": sample, "wall_s": round(time.perf_counter() - t0, 1),
    }
    for name, row in rows.items():
        if name != "fp32":
            row["meets"] = {"cache_ratio": row["cache_ratio"] <= TARGETS["cache_ratio_max"],
                            "ppl_change": row["ppl_change_pct"] <= TARGETS["ppl_change_max_pct"],
                            "greedy_free_running": row["greedy"]["before_first_divergence"] >= TARGETS["greedy_agreement_min"],
                            "greedy_along_fp32_path": row["greedy"]["along_fp32_path"] >= TARGETS["greedy_agreement_min"],
                            "next_token_heldout": row["next_token_agreement_heldout"] >= TARGETS["greedy_agreement_min"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_json = out.with_name(f".{out.name}.tmp")  # atomic: a killed run never leaves half a file
    tmp_json.write_text(json.dumps(result, indent=1, default=float) + "\n", encoding="utf-8")
    tmp_json.replace(out)
    md = markdown(result)
    out.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)
    return 0


def markdown(r: dict[str, Any]) -> str:
    lines = ["| cache | cache B/token | × fp32 | held-out ppl | Δ vs fp32 | next token = fp32's, held-out (teacher-forced) "
             "| 64 greedy steps: along fp32's path | free-running, before 1st divergence | free-running, position-wise "
             "| decode ms (median) | × fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in r["rows"].items():
        g = row["greedy"]
        lines.append(f"| {name} ({row['cache_dtype']}) | {row['cache_bytes_per_token']:.0f} | {row['cache_ratio']:.3f} "
                     f"| {row['heldout_ppl']:.4f} | {row['ppl_change_pct']:+.2f} % "
                     f"| {100 * row['next_token_agreement_heldout']:.2f} % | {100 * g['along_fp32_path']:.1f} % "
                     f"| {100 * g['before_first_divergence']:.1f} % | {100 * g['positionwise']:.1f} % "
                     f"| {row['decode_ms']['median_ms']:.3f} | {row['decode_ratio']:.2f} |")
    c = r["cpu"]
    lines += ["", f"Held-out: {r['heldout_tokens']} tokens in {r['ppl_window']}-token windows, chunks of {r['ppl_chunk']} "
              f"through the cache; torch fp32 on the same windows {r['torch_fp32_ppl']:.4f}. Greedy: "
              f"{r['greedy']['prompts']} prompts × {r['greedy']['prompt_tokens']} tokens, {r['greedy']['new_tokens']} new. "
              f"Decode: one token at past {r['decode']['past']}, batch {r['decode']['batch']}, {r['decode']['runs']} "
              f"round-robin runs, {r['threads']} threads. Granularity {r['granularity']}.",
              f"CPU: {c['model']} ({c['class']}), {c['cores']} cores, flags {' '.join(c['flags'])}; onnxruntime "
              f"{r['onnxruntime']}; load average {r['load_average'][0]:.1f}.", "", f"Command: `{r['command']}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
