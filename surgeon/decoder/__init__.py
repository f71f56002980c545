"""Decoder language models with their key/value cache (``Target.model_kind == "decoder"``, the
``onnx-decoder`` target; docs/decoder.md). One module per job:

* ``step``: the step module that is exported (the cache as explicit tensors), cache formats and
  their calibration statistics;
* ``generate``: the one generation loop over a step runner (ORT or torch), teacher-forced scoring;
* ``generate_cli``: ``surgeon generate OUTDIR``;
* ``reference``: Hugging Face's own model, cache and ``generate``, the torch references;
* ``check``: the decoder tolerance, its figures for the ladder guard, the file's verification;
* ``pipeline``: the pipeline's decoder variant (load → texts → statistics → guard → lower → verify →
  OUTDIR), chosen by the target's model kind;
* ``speed``: one decode step of the written file against the fp32-cache file.
"""
