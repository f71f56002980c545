"""Encoder-decoder models (BART, T5, Marian ``…ForConditionalGeneration``) as the files inference servers
run (``Target.model_kind == "encoder-decoder"``, the ``onnx-seq2seq`` target; docs/seq2seq.md). One
module per job:

* ``load``: the directory checked from its config (refusals before any weight is read), then loaded;
* ``parts``: the encoder, first-step decoder and with-past decoder modules that are exported;
* ``export``: their capture and ONNX export (Optimum's file and tensor names);
* ``runner``: the three files in onnxruntime and greedy decoding over them (numpy + onnxruntime only);
* ``check``: the files against torch, greedy tokens against transformers' ``generate``;
* ``pipeline``: load → prompts → export → verify → OUTDIR; ``readme``: OUTDIR/README.md;
* ``cli``: ``surgeon optimize / export / generate`` for this kind.
"""
