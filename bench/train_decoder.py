"""Train the tiny Llama decoder the KV-cache benchmark and tests use, on the Python standard library.

Run: ``.venv/bin/python bench/train_decoder.py`` (1200 steps: 944 s with a test run sharing the 2
cores; 480 steps took 139 s on idle ones). Writes:

* ``bench/data/tiny-decoder/``: a Hugging Face directory (``config.json``, ``model.safetensors``,
  ``generation_config.json``, tokenizer files) plus ``training_files.txt`` / ``calib_files.txt`` /
  ``heldout_files.txt`` (which stdlib files went where) and ``training.json`` (settings, loss curve,
  held-out perplexity);
* ``bench/data/decoder_calib.txt``: 64 calibration prompts, one a line, from the calibration files
  only: each 1500 characters of one file (~550 tokens), its newlines written as spaces (a prompt
  is a line of the ``--calib`` file);
* ``bench/data/decoder_calib_lines.txt``: 64 prompts that are single source lines (~20 tokens):
  the benchmark shows what calibrating on such short prompts does to an 8-bit cache;
* ``bench/data/decoder_heldout.txt``: text of held-out files, never trained on.

Why the standard library: it is the one sizeable text corpus every machine with Python has, so the
model is regenerated from nothing but this script (no hub, no download). The split is by *file*
(a hash of its path), so held-out perplexity is measured on code the model has not seen. The
selection depends on the Python version's stdlib: ``training.json`` records the version it was
trained on; other versions give another (equally valid) model.

Deterministic: fixed seeds, a fixed step count (not a time budget, which would depend on the
machine's load), two torch threads. A rerun gives the same split, tokenizer, data files, loss curve
and held-out perplexity (to the 4 decimals recorded); the weights agree to ~2e-4 (a 480-step rerun), not bit for bit
(torch's threaded CPU kernels do not promise bitwise-equal reductions).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data"
OUT = DATA / "tiny-decoder"
CALIB = DATA / "decoder_calib.txt"
CALIB_LINES = DATA / "decoder_calib_lines.txt"
HELDOUT = DATA / "decoder_heldout.txt"

SEED = 0
VOCAB = 1024
# Header of each file in the held-out text: lets tests check its provenance against heldout_files.txt.
HEADER = "# ---- stdlib file: {} ----\n"
# Directories left out: test suites carry deliberately odd text (encodings, huge literals),
# idlelib/lib2to3/turtledemo are applications, not library code, and encodings/ (1.7 MB of
# generated charmap tables) and pydoc_data/ (one 740 kB string) are data: with them a fifth of the
# training text was tables, and a held-out codec table is so predictable that it made the held-out
# perplexity (12 with them) a measure of tables rather than of code.
SKIP_TOP = {"test", "idlelib", "lib2to3", "turtledemo", "site-packages", "__pycache__", "encodings", "pydoc_data"}
HELDOUT_BYTES = 160_000     # enough for ~50k tokens of perplexity; small enough to commit
CALIB_PROMPTS = 64
# Long enough to reach past the benchmark's 512-token perplexity windows: RoPE turns a key's
# channels by an angle that grows with its position, so key ranges calibrated on the first ~20
# positions miss those of later ones (bench/decoder_kv.py measures both calibrations).
CALIB_CHARS = 1500

MODEL = dict(
    vocab_size=VOCAB, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2,     # GQA 4:2, head_dim 32
    max_position_embeddings=2048,                     # the benchmark decodes at past length 1024
    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, attention_dropout=0.0,
)
TRAIN = dict(seq_len=512, batch=8, steps=1200, lr=3e-3, warmup=50, weight_decay=0.1)


def split_of(rel: str) -> str:
    """'heldout' / 'calib' / 'train' from a hash of the path: stable across runs and orderings."""
    b = hashlib.sha256(rel.encode()).digest()[0]
    return "heldout" if b < 16 else "calib" if b < 32 else "train"


def stdlib_files() -> list[tuple[str, str]]:
    """(relative path, text) of the stdlib's .py files, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        parts = rel.split("/")
        if parts[0] in SKIP_TOP or any(x in ("test", "tests", "__pycache__") for x in parts[:-1]):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            out.append((rel, text))
    return out


def calib_long(files: list[tuple[str, str]], n: int, chars: int = CALIB_CHARS) -> list[str]:
    """``n`` prompts of ``chars`` characters, each a stretch of one calibration file with its
    newlines as spaces, taken in a round robin over the files (every third stretch of each)."""
    flat = [" ".join(text.replace("\r", "").split("\n")) for _, text in files]
    stretches = [[f[s:s + chars] for s in range(0, len(f) - chars + 1, 3 * chars)] for f in flat]
    prompts: list[str] = []
    for i in range(max(map(len, stretches))):
        prompts += [st[i] for st in stretches if i < len(st) and st[i].strip()]
    return [p.strip() for p in prompts[:n]]


def calib_lines(files: list[tuple[str, str]], n: int) -> list[str]:
    """``n`` prompts, one line each: source lines of 50–200 characters (indentation kept), taken in
    a round robin over the calibration files so that no single file dominates."""
    per_file = [[ln.rstrip() for ln in text.splitlines() if 50 <= len(ln.rstrip()) <= 200] for _, text in files]
    prompts: list[str] = []
    seen: set[str] = set()
    i = 0
    while len(prompts) < n and any(per_file):
        for lines in per_file:
            if i < len(lines) and lines[i] not in seen and len(prompts) < n:
                seen.add(lines[i])
                prompts.append(lines[i])
        i += 7  # every 7th line: spread over each file instead of its first lines (imports)
        if all(i >= len(x) for x in per_file):
            break
    return prompts


def heldout_text(files: list[tuple[str, str]], limit: int) -> tuple[str, list[str]]:
    parts, used, size = [], [], 0
    for rel, text in files:
        if size >= limit:
            break
        parts.append(HEADER.format(rel) + text.rstrip() + "\n\n")
        used.append(rel)
        size += len(parts[-1])
    return "".join(parts), used


def write_data(prompts: list[str], prompt_lines: list[str], held: str) -> None:
    CALIB.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    CALIB_LINES.write_text("".join(p + "\n" for p in prompt_lines), encoding="utf-8")
    HELDOUT.write_text(held, encoding="utf-8")


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=MODEL["max_position_embeddings"])


def encode_files(tok, texts: list[str]):
    """One long token stream: each file as ``<s> file </s>``."""
    import torch

    ids: list[int] = []
    # The backend tokenizer directly: the wrapper would warn that a file is longer than the model's
    # context, which is true and harmless here (the stream is cut into windows).
    for enc in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.append(tok.bos_token_id)
        ids.extend(enc.ids)
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def perplexity(model, ids, seq_len: int) -> float:
    """exp(mean NLL) over consecutive, non-overlapping windows of ``seq_len`` tokens (each window
    starts from an empty context: the same windows the ONNX benchmark feeds through its cache)."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, seq_len):
            x = ids[s:s + seq_len + 1]
            if len(x) < 2:
                break
            logits = model(input_ids=x[None, :-1]).logits[0]
            nll += torch.nn.functional.cross_entropy(logits.float(), x[1:], reduction="sum").item()
            count += len(x) - 1
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=TRAIN["steps"])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-only", action="store_true",
                    help="only (re)write the calibration and held-out files from the split (no training)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one order of work: the same merges every run
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    files = stdlib_files()
    split: dict[str, list[tuple[str, str]]] = {"train": [], "calib": [], "heldout": []}
    for rel, text in files:
        split[split_of(rel)].append((rel, text))
    held, held_used = heldout_text(split["heldout"], HELDOUT_BYTES)
    prompts = calib_long(split["calib"], CALIB_PROMPTS)
    prompt_lines = calib_lines(split["calib"], CALIB_PROMPTS)
    write_data(prompts, prompt_lines, held)
    if args.data_only:
        print(f"wrote {CALIB}, {CALIB_LINES}, {HELDOUT} (no training)", flush=True)
        return 0
    train_texts = [t for _, t in split["train"]]
    print(f"stdlib {sysconfig.get_paths()['stdlib']}: {len(files)} files → train {len(split['train'])} "
          f"({sum(map(len, train_texts)) / 1e6:.1f} MB), calib {len(split['calib'])} ({len(prompts)} prompts), "
          f"held-out {len(split['heldout'])} ({len(held_used)} used, {len(held) / 1e3:.0f} kB)", flush=True)

    tok = train_tokenizer(train_texts)
    data = encode_files(tok, train_texts)
    held_ids = encode_files(tok, [held])[1:-1]  # the held-out text as one stream, as the benchmark reads it
    print(f"tokenizer: vocab {len(tok)}, train stream {len(data)} tokens "
          f"({sum(map(len, train_texts)) / len(data):.2f} chars/token), held-out {len(held_ids)} tokens "
          f"[{time.perf_counter() - t0:.0f} s]", flush=True)

    cfg = LlamaConfig(**MODEL, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=TRAIN["lr"], betas=(0.9, 0.95))
    steps, L, B = args.steps, TRAIN["seq_len"], TRAIN["batch"]

    def lr_at(step: int) -> float:
        if step < TRAIN["warmup"]:
            return TRAIN["lr"] * (step + 1) / TRAIN["warmup"]
        frac = (step - TRAIN["warmup"]) / max(1, steps - TRAIN["warmup"])
        return TRAIN["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(SEED)
    curve = []
    print(f"model: {n_params / 1e6:.2f} M parameters; {steps} steps × {B} × {L} tokens", flush=True)
    t1 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(data) - L - 1, (B,), generator=gen)
        batch = torch.stack([data[s:s + L + 1] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            curve.append((step, round(loss.item(), 4)))
            el = time.perf_counter() - t1
            print(f"step {step:4d}/{steps}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  "
                  f"{el:.0f} s (eta {el / (step + 1) * (steps - step - 1):.0f} s)", flush=True)
    model.eval()
    ppl = perplexity(model, held_ids, L)
    print(f"held-out perplexity (torch fp32, {L}-token windows): {ppl:.3f}  (uniform over the vocab: {VOCAB})",
          flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for name, key in (("training_files.txt", "train"), ("calib_files.txt", "calib")):
        (out / name).write_text("".join(f"{rel}\n" for rel, _ in split[key]), encoding="utf-8")
    (out / "heldout_files.txt").write_text("".join(f"{rel}\n" for rel in held_used), encoding="utf-8")
    (out / "training.json").write_text(json.dumps({
        "python": sys.version.split()[0], "torch": torch.__version__, "stdlib": "sysconfig.get_paths()['stdlib']",
        "seed": SEED, "model": MODEL, "train": {**TRAIN, "steps": steps}, "parameters": n_params,
        "train_tokens": int(len(data)), "heldout_tokens": int(len(held_ids)),
        "heldout_perplexity": round(ppl, 4), "heldout_window": L, "loss_curve": curve,
        "wall_s": round(time.perf_counter() - t0, 1), "threads": args.threads,
    }, indent=1) + "\n", encoding="utf-8")

    prompt = "def read_config(path):\n"
    x = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        y = model.generate(**x, max_new_tokens=60, do_sample=False)
    print("sample (greedy):\n" + tok.decode(y[0], skip_special_tokens=True), flush=True)
    print(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.2f} MB), {CALIB}, {HELDOUT} "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
