"""Weight-only accuracy of linear-quant{dtype=int4|int8w}'s grids and fits (docs/passes/linear-quant.md) on
the trained tiny decoder (bench/data/tiny-decoder): held-out perplexity with every Linear (q/k/v/o,
gate/up/down; the tied LM head stays fp32) quantized, per format and fit, then each layer's relative
output error on held-out activations.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/int4_accuracy.py
"""

import math
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgeon.passes._quant_weight import WeightOnlyLinear

torch.manual_seed(0)
torch.set_num_threads(1)
D = "bench/data/tiny-decoder"
tok = AutoTokenizer.from_pretrained(D)
base = AutoModelForCausalLM.from_pretrained(D).eval()


def ids(path, n):
    t = tok(open(path).read(), return_tensors="pt").input_ids[0]
    return t[:n]


held = ids("bench/data/decoder_heldout.txt", 4096).reshape(8, 512)
calib = ids("bench/data/decoder_calib.txt", 2048).reshape(8, 256)


def ppl(model):
    with torch.no_grad():
        out = model(held, labels=held)
        return math.exp(out.loss.item())


def quantized(rung, symmetric, gptq):
    import copy

    m = copy.deepcopy(base)
    subs = []
    for _name, mod in list(m.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and cname != "lm_head":
                w = WeightOnlyLinear("linear", child.weight, child.bias, (rung,), symmetric)
                setattr(mod, cname, w)
                subs.append(w)
    if gptq:  # moments of each layer's input with the quantized model running (as linear-quant's fit)
        stats = {id(s): [0, 0] for s in subs}

        def hook(s, a):
            x = a[0].reshape(-1, a[0].shape[-1]).double()
            st = stats[id(s)]
            st[0] = st[0] + x.t() @ x
            st[1] += x.shape[0]

        hs = [s.register_forward_pre_hook(hook) for s in subs]
        with torch.no_grad():
            m(calib)
        for h in hs:
            h.remove()
        for s in subs:
            s.gptq(stats[id(s)][0] / stats[id(s)][1], 0.1)
    return m


print(f"fp32 perplexity {ppl(base):.4f} on {held.numel()} held-out tokens")
for rung in ["int4-b32", "int4-b64", "int4-b128", "int8w"]:
    for sym in [False, True] if rung != "int8w" else [False]:
        for g in [False, True]:
            t = time.time()
            p = ppl(quantized(rung, sym, g))
            grid = "sym int4" if sym else "asym uint4" if rung != "int8w" else "sym int8"
            print(f"{rung:10s} {grid:10s} {'gptq' if g else 'nearest':8s} ppl {p:.4f}  ({time.time() - t:.1f}s)")
# layer-level: relative output error ||X(Ŵ−W)||² / ||XW||² on held-out inputs, mean over the 28 layers
acts = {}
lin = [(n, mm) for n, mm in base.named_modules() if isinstance(mm, torch.nn.Linear) and not n.endswith("lm_head")]
hs = [mm.register_forward_pre_hook(lambda s, a, n=n: acts.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]))) for n, mm in lin]
with torch.no_grad():
    base(held[:2])
for h in hs:
    h.remove()
cacts = {}
hs = [mm.register_forward_pre_hook(lambda s, a, n=n: cacts.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).double())) for n, mm in lin]
with torch.no_grad():
    base(calib)
for h in hs:
    h.remove()
for rung in ["int4-b32", "int4-b128", "int8w"]:
    for sym in [False, True] if rung != "int8w" else [False]:
        for g in [False, True]:
            errs = []
            for n, mm in lin:
                w = WeightOnlyLinear("linear", mm.weight, None, (rung,), sym)
                if g:
                    x = cacts[n]
                    w.gptq(x.t() @ x / x.shape[0], 0.1)
                X = acts[n]
                ref = X @ mm.weight.t()
                errs.append((((X @ w.dequantized_weight()) - ref).pow(2).sum() / ref.pow(2).sum()).item())
            fit = "gptq" if g else "nearest"
            print(f"layer-level {rung:10s} {'sym' if sym else 'asym'} {fit:8s} rel. output MSE {sum(errs) / len(errs):.3e}")
