"""Benchmarks (not tests): fastai vs the exported model, side by side, from image bytes to label.

Entry point: ``kimchi-edge bench --compare RUN_DIR [BUNDLE] --images DIR --out docs/`` (the command line is
:mod:`kimchi_edge.runtime.bench_cli`, the run :mod:`kimchi_edge.bench.compare`).  Imports nothing heavy: each
measurement runs in its own process (:mod:`kimchi_edge.bench.worker`).
"""

#: The kimchi-edge extra that installs what a comparison needs beyond the runtime: fastai and torch (the
#: baseline paths, the matmul peak), onnx (FLOPs, re-quantizing), matplotlib (the chart).
EXTRA = "convert"
