"""The subjects of ``bench/llm.py``, each driven by its own runtime as its users drive it:

* a surgeon OUTDIR through ``surgeon generate``'s path (``load_outdir``: onnxruntime with the session
  config the OUTDIR's report states, surgeon's tokenizer-free ``OrtRunner``) and surgeon's generation loop
  (``surgeon.decoder.generate.generate``) and scorer (``score``);
* an onnxruntime-genai builder output through ``og.Generator`` (decode, prefill), scored in plain
  onnxruntime through the same ``score`` (its inputs are ``input_ids``, ``attention_mask`` and
  ``past_key_values.*``; ``og`` hands out the last position's logits only);
* the GGUF in llama.cpp through llama-cpp-python's ``Llama`` (``generate`` for decode, ``eval`` for
  prefill and, with ``logits_all=True``, for scoring).

Every subject answers the same four questions: ``decode(prompts, new)`` (seconds of the decode phase:
from the first new token to the last, so ``new − 1`` model steps per row), ``prefill(ids)`` (seconds of
one forward of the prompt from an empty cache), ``nll(windows)`` (summed NLL, scored tokens) and
``cache_bytes_per_token``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from _llm_text import nll_of_logits

__all__ = ["GenaiSubject", "LlamaCppSubject", "SurgeonSubject", "file_bytes"]


def file_bytes(path: Path) -> int:
    """Bytes of a model file with its external data (every ``model.onnx*`` of an OUTDIR), or of one file."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("model.onnx*") if p.is_file())


class _Stamped:
    """A surgeon ``Runner`` that notes when each step returned: the decode phase is measured inside
    surgeon's own loop, its per-step numpy work included, without changing the loop."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.layers = runner.layers
        self.max_positions = runner.max_positions
        self.stamps: list[float] = []

    def empty_past(self, batch: int) -> list[Any]:
        return list(self.runner.empty_past(batch))

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        out = self.runner.step(input_ids, attention_mask, position_ids, past)
        self.stamps.append(time.perf_counter())
        return out

    def cache_nbytes(self, present: Sequence[Any]) -> int:
        return int(self.runner.cache_nbytes(present))


class SurgeonSubject:
    """A surgeon onnx-decoder OUTDIR, as ``surgeon generate OUTDIR`` opens and runs it."""

    runtime = "onnxruntime via surgeon generate's path (load_outdir, OrtRunner, surgeon.decoder.generate)"

    def __init__(self, outdir: Path, threads: int) -> None:
        from surgeon.decoder.generate import pad_and_eos
        from surgeon.decoder.generate_cli import load_outdir

        self.path = outdir
        self.runner, tokenizer = load_outdir(outdir, threads=threads)
        self.pad_id, _ = pad_and_eos(tokenizer)
        self.cache_bytes_per_token: float | None = None

    def decode(self, prompts: list[list[int]], new: int) -> float:
        from surgeon.decoder.generate import generate

        stamped = _Stamped(self.runner)
        # eos_id=None: no early stop, every row makes `new` tokens
        gen = generate(stamped, prompts, new, pad_id=self.pad_id, eos_id=None)
        self.cache_bytes_per_token = gen.cache_bytes / (len(prompts) * gen.cache_tokens)
        return stamped.stamps[-1] - stamped.stamps[0]

    def prefill(self, ids: list[int]) -> float:
        x = np.asarray([ids], dtype=np.int64)
        past = self.runner.empty_past(1)
        t = time.perf_counter()
        self.runner.step(x, np.ones_like(x), np.arange(len(ids), dtype=np.int64)[None], past)
        return time.perf_counter() - t

    def nll(self, wins: list[list[int]]) -> tuple[float, int]:
        from surgeon.decoder.generate import score

        s = score(self.runner, wins, pad_id=self.pad_id, batch_size=1)
        return s.nll, s.tokens


class _PlainOrtRunner:
    """A GenAI builder file in plain onnxruntime, shaped as surgeon's ``Runner`` so that the same
    ``score`` reads it: no ``position_ids`` input (its GroupQueryAttention derives positions from the
    attention mask), the cache [batch, kv_heads, past, head_dim] in the file's dtype."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ins = self.session.get_inputs()
        self.past = [i for i in ins if i.name.startswith("past_key_values.")]
        self.names = [i.name for i in ins]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.layers = len(self.past) // 2
        self.max_positions = None
        self.present_bytes_per_token: float | None = None

    def empty_past(self, batch: int) -> list[np.ndarray]:
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}[self.past[0].type]
        return [np.zeros((batch, i.shape[1], 0, 64 if isinstance(i.shape[3], str) else i.shape[3]), dtype)
                for i in self.past]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, **dict(zip((i.name for i in self.past), past))}
        if "position_ids" in self.names:
            feeds["position_ids"] = position_ids
        out = self.session.run(self.outputs, feeds)
        present = out[1:]
        self.present_bytes_per_token = sum(p.nbytes for p in present) / (present[0].shape[0] * present[0].shape[2])
        return out[0], present

    @staticmethod
    def cache_nbytes(present: Sequence[Any]) -> int:
        return int(sum(p.nbytes for p in present))


class GenaiSubject:
    """An onnxruntime-genai builder output directory (``genai_config.json`` + ``model.onnx``)."""

    runtime = "onnxruntime-genai og.Generator (decode, prefill); plain onnxruntime for the scores"

    def __init__(self, outdir: Path, threads: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.path = outdir
        config = og.Config(str(outdir))
        config.clear_providers()  # the CPU execution provider
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.threads = threads
        self._scorer: _PlainOrtRunner | None = None
        gc = json.loads((outdir / "genai_config.json").read_text(encoding="utf-8"))
        self.pad_id = int(gc["model"].get("pad_token_id", gc["model"]["eos_token_id"]))
        self.cache_bytes_per_token: float | None = None

    def _generator(self, batch: int, length: int, min_length: int) -> Any:
        params = self.og.GeneratorParams(self.model)
        # min_length = max_length: EOS is never picked, so no row stops early (greedy otherwise)
        params.set_search_options(do_sample=False, max_length=length, min_length=min_length, batch_size=batch)
        return self.og.Generator(self.model, params)

    def decode(self, prompts: list[list[int]], new: int) -> float:
        total = len(prompts[0]) + new
        gen = self._generator(len(prompts), total, total)
        gen.append_tokens(np.asarray(prompts, dtype=np.int32))  # the prefill
        stamps = []
        for _ in range(new):
            gen.generate_next_token()
            stamps.append(time.perf_counter())
        return stamps[-1] - stamps[0]

    def prefill(self, ids: list[int]) -> float:
        gen = self._generator(1, len(ids) + 1, 0)
        t = time.perf_counter()
        gen.append_tokens(np.asarray([ids], dtype=np.int32))
        return time.perf_counter() - t

    def nll(self, wins: list[list[int]]) -> tuple[float, int]:
        from surgeon.decoder.generate import score

        if self._scorer is None:
            self._scorer = _PlainOrtRunner(self.path / "model.onnx", self.threads)
        s = score(self._scorer, wins, pad_id=self.pad_id, batch_size=1)
        self.cache_bytes_per_token = self._scorer.present_bytes_per_token
        self._scorer = None  # a second copy of the weights in memory: only while scoring
        return s.nll, s.tokens


class LlamaCppSubject:
    """The GGUF file in llama.cpp (llama-cpp-python), greedy through ``Llama.generate``."""

    runtime = "llama.cpp via llama-cpp-python Llama (generate, eval)"

    def __init__(self, gguf: Path, threads: int, ctx: int) -> None:
        from llama_cpp import Llama

        self.path = gguf
        self.kw = dict(model_path=str(gguf), n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                       n_batch=ctx, n_ubatch=ctx, verbose=False)
        self.llm = Llama(**self.kw)
        meta = self.llm.metadata
        arch = meta.get("general.architecture", "llama")
        layers = int(meta[f"{arch}.block_count"])
        heads = int(meta[f"{arch}.attention.head_count"])
        kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
        dim = int(meta[f"{arch}.embedding_length"]) // heads
        # keys and values of every layer in llama.cpp's default cache type, f16 (2 bytes)
        self.cache_bytes_per_token: float | None = float(layers * 2 * kv_heads * dim * 2)

    def decode(self, prompts: list[list[int]], new: int) -> float:
        if len(prompts) != 1:
            return self._decode_batched(prompts, new)
        stamps = []
        for _tok in self.llm.generate(prompts[0], top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                     reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == new:
                break
        return stamps[-1] - stamps[0]

    def _decode_batched(self, prompts: list[list[int]], new: int) -> float:
        """Several sequences in one context, greedy: ``Llama`` runs one sequence, so this is llama.cpp's
        own C API for parallel decoding (as its ``batched`` example and ``llama-server`` use it) through
        llama-cpp-python's bindings: one ``llama_decode`` of every prompt (a sequence id each), then one
        per step with a token of every sequence."""
        import llama_cpp as lc

        n, length = len(prompts), len(prompts[0])
        params = lc.llama_context_default_params()
        params.n_ctx = n * (length + new + 1)  # split evenly among the sequences
        params.n_batch = params.n_ubatch = n * length
        params.n_seq_max = n
        params.n_threads = params.n_threads_batch = self.kw["n_threads"]
        ctx = lc.llama_init_from_model(self.llm.model, params)
        batch = lc.llama_batch_init(n * length, 0, n)
        vocab = self.llm.n_vocab()

        def put(j: int, token: int, pos: int, seq: int, logits: bool) -> None:
            batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, pos, 1
            batch.seq_id[j][0], batch.logits[j] = seq, logits

        def run() -> np.ndarray:
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            return np.stack([np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, j), shape=(vocab,)).argmax()
                             for j in rows])

        try:
            rows = [r * length + length - 1 for r in range(n)]  # each prompt's last position
            for r, p in enumerate(prompts):
                for i, t in enumerate(p):
                    put(r * length + i, t, i, r, i == length - 1)
            batch.n_tokens = n * length
            nxt = run()
            stamps = [time.perf_counter()]
            rows = list(range(n))
            for k in range(new - 1):
                for r in range(n):
                    put(r, int(nxt[r]), length + k, r, True)
                batch.n_tokens = n
                nxt = run()
                stamps.append(time.perf_counter())
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)
        return stamps[-1] - stamps[0]

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t

    def nll(self, wins: list[list[int]]) -> tuple[float, int]:
        from llama_cpp import Llama

        scorer = Llama(**self.kw, logits_all=True)
        nll, count = 0.0, 0
        for w in wins:
            scorer.reset()
            scorer.eval(w[:-1])
            nll += nll_of_logits(np.asarray(scorer.scores[:len(w) - 1]), w)
            count += len(w) - 1
        del scorer
        return nll, count
