"""Benchmarks (not tests): fastai vs the exported model, side by side, from image bytes to label.

Entry point: ``python -m bench.compare RUN_DIR [BUNDLE] --images DIR --out docs/`` (see
:mod:`kimchi_edge.bench.compare`).  Imports nothing heavy: each measurement runs in its own process
(:mod:`kimchi_edge.bench.worker`).
"""
