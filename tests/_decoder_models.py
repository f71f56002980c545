"""Tiny decoder LMs saved as Hugging Face directories (random weights, 2 layers) with a byte-level BPE
tokenizer trained offline on a few lines, so tests go through the directory path a user takes."""

from __future__ import annotations

from pathlib import Path

import torch

LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "A decoder writes one token at a time and keeps its keys and values.",
    "Servers keep the cache in eight bits to fit more sequences in memory.",
    "Surgeon checks every change on text it did not calibrate on.",
    "Lighter parts, same answers.",
    "The cache grows by one row per layer for every token generated.",
    "Perplexity measures how surprised a model is by held-out text.",
    "Greedy decoding picks the most likely next token at each step.",
]
# The decoder guard's built-in text before it became surgeon/data/decoder_text.txt (8 sentences): the
# tests' figures (tests/test_decoder.py: FP8 +2.1 % perplexity on the tiny Llama) were measured on it,
# and a tiny model's guard runs in a moment on it; passed as --calib.
SHORT_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A decoder writes one token at a time and keeps the keys and values of every earlier token.",
    "Inference servers keep that cache in eight bits so that more sequences fit in memory.",
    "Perplexity measures how surprised a language model is by text it has not seen.",
    "Greedy decoding picks the most likely next token at each step of generation.",
    "The river was wide and slow, and the boats on it moved as if they had nowhere to be.",
    "She opened the window, and the smell of rain came into the quiet room.",
    "Numbers in a computer are stored with a limited number of bits, which limits their precision.",
]
VOCAB = 300
POSITIONS = 128


def tokenizer(eos: str = "<|endoftext|>"):
    """A byte-level BPE (``tokenizers``) wrapped as ``PreTrainedTokenizerFast``; EOS doubles as pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(LINES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)
    fast.model_max_length = POSITIONS
    return fast


def _config(kind: str, vocab: int, eos_id: int):
    import transformers

    # initializer_range 0.2 (HF's default 0.02 gives near-uniform logits and a model that repeats one token)
    common = {"initializer_range": 0.2, "vocab_size": vocab, "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    if kind == "gpt2":
        return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=POSITIONS, **common)
    if kind == "llama":  # GQA (4 query heads, 2 kv heads) and RoPE
        return transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64,
                                        max_position_embeddings=POSITIONS, **common)
    if kind == "qwen2":
        return transformers.Qwen2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64,
                                        max_position_embeddings=POSITIONS, **common)
    if kind == "mistral-sliding":  # a cache of sliding-window layers: not the standard one
        return transformers.MistralConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, sliding_window=8,
                                          max_position_embeddings=POSITIONS, **common)
    if kind == "t5":
        return transformers.T5Config(num_layers=1, num_decoder_layers=1, d_model=16, d_ff=32, num_heads=2,
                                     d_kv=8, vocab_size=vocab, decoder_start_token_id=eos_id, pad_token_id=eos_id,
                                     eos_token_id=eos_id)
    raise ValueError(kind)


def _train(model, tok, steps: int) -> None:
    """A few Adam steps on ``LINES``: a random LM's next-token distribution is nearly uniform (ties
    everywhere), a slightly trained one is peaked like a real LM's, so greedy agreement means something."""
    if steps <= 0:
        return
    batch = tok(LINES, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def save_lm(kind: str, path: Path, seed: int = 0, steps: int = 30) -> Path:
    """Write a tiny ``kind`` LM (gpt2, llama, qwen2, mistral-sliding, t5; random, then ``steps`` Adam steps on
    ``LINES``) and the tokenizer to ``path``."""
    import transformers

    tok = tokenizer()
    config = _config(kind, len(tok), tok.eos_token_id)
    torch.manual_seed(seed)
    if kind == "t5":
        model = transformers.T5ForConditionalGeneration(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
        _train(model, tok, steps)
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path
