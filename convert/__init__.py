"""kimchi-edge convert: a trained fastai learner -> a model bundle, and the accuracy gate that proves it.

Entry points (all importable without side effects; torch/fastai are imported inside the functions
that need them, so :mod:`convert.gate` and :mod:`convert.tensorrt` work on a runtime-only install):

* :func:`convert.bundle.bundle_from_run` — run folder -> bundle (TorchScript, ONNX, INT8 ONNX,
  optional TensorRT engines, ``reference.json``, ``manifest.json``) and the gate;
* :func:`convert.gate.run_gate` — the accuracy gate on an existing bundle (no torch/fastai needed);
* :func:`convert.onnx_export.onnx_from_learner`, :func:`convert.int8.int8_from_onnx`,
  :func:`convert.torchscript.torchscript_from_learner`, :func:`convert.tensorrt.engine_from_onnx`.

``learner.pkl`` is a pickle: loading it runs code. Convert only learners you trust.
"""
