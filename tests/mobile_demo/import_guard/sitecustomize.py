"""Put this folder on ``PYTHONPATH`` of a process under test: torch/fastai imports then fail, and
every attempt is appended to ``$KIMCHI_EDGE_IMPORT_LOG`` (so even an import swallowed by a
``try/except ImportError`` somewhere is caught).  Used by the demo tests on the app process.
"""

import importlib.abc
import os
import sys

_BLOCKED = {"torch", "torchvision", "fastai", "timm", "tensorflow"}
_LOG = os.environ.get("KIMCHI_EDGE_IMPORT_LOG")


class _HeavyImportGuard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in _BLOCKED:
            return None
        if _LOG:
            with open(_LOG, "a", encoding="utf-8") as f:
                f.write(f"{os.getpid()} {name}\n")
        raise ImportError(f"{name} is blocked in the kimchi-edge demo process (test guard)")


sys.meta_path.insert(0, _HeavyImportGuard())
