"""kimchi-edge convert: a trained fastai learner -> a model bundle, and the accuracy gate that proves it.

Entry points (all importable without side effects; torch/fastai are imported inside the functions
that need them, so :mod:`kimchi_edge.convert.gate` and :mod:`kimchi_edge.convert.tensorrt` work on a runtime-only install):

* :func:`kimchi_edge.convert.bundle.bundle_from_run` — run folder -> bundle (TorchScript, ONNX, INT8 ONNX,
  optional TensorRT engines, ``reference.json``, ``manifest.json``) and the gate;
* :func:`kimchi_edge.convert.gate.run_gate` — the accuracy gate on an existing bundle (no torch/fastai needed);
* :func:`kimchi_edge.convert.onnx_export.onnx_from_learner`, :func:`kimchi_edge.convert.int8.int8_from_onnx`,
  :func:`kimchi_edge.convert.torchscript.torchscript_from_learner`, :func:`kimchi_edge.convert.tensorrt.engine_from_onnx`.

``learner.pkl`` is a pickle: loading it runs code. Convert only learners you trust.
"""
