"""The demo process never imports torch or fastai (they are in the train extra; a phone demo on a
Jetson must start without them)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("streamlit", reason="the demo needs streamlit (pip install 'kimchi-edge[demo]')")

from .server import REPO, guarded_env  # noqa: E402

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from streamlit.testing.v1 import AppTest
    from tests.mobile_demo import images
    import kimchi_edge.mobile_demo.cli, kimchi_edge.mobile_demo.core, kimchi_edge.mobile_demo.page  # everything the demo command loads

    at = AppTest.from_file(sys.argv[1], default_timeout=60).run()  # the Snapshot tab, with its camera widget
    snapshot = None  # AppTest takes a camera photo from Streamlit 1.66; test_browser.py takes one on any version
    if hasattr(at, "camera_input"):
        at.camera_input[0].upload("p.jpg", images.jpeg(images.RED)); at.run()
        snapshot = [m.value for m in at.markdown if m.value.startswith("**Prediction:**")]
    at = AppTest.from_file(sys.argv[1], default_timeout=60)
    at.query_params["mode"] = "Upload"; at.run()
    at.file_uploader[0].upload("b.png", images.png_rgba((0, 0, 255, 255)), "image/png"); at.run()
    upload = [m.value for m in at.markdown if m.value.startswith("**Prediction:**")]
    at = AppTest.from_file(sys.argv[1], default_timeout=60)
    at.query_params["mode"] = "Live"; at.run()  # imports streamlit_webrtc, aiortc, av
    heavy = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "fastai", "torchvision", "timm"))
    print(json.dumps({"snapshot": snapshot, "upload": upload, "webrtc": "streamlit_webrtc" in sys.modules,
                      "heavy": heavy}, ensure_ascii=False))
    """
)


def test_app_process_imports_no_torch_or_fastai(color_bundle, tmp_path):
    log = tmp_path / "imports.log"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(REPO / "mobile_demo" / "app.py")],
        cwd=REPO, env=guarded_env(log, KIMCHI_EDGE_BUNDLE=str(color_bundle)),
        capture_output=True, text=True, encoding="utf-8", timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["snapshot"] is not None:  # None: this Streamlit's AppTest has no camera_input (the page still ran)
        assert out["snapshot"] and "빨강 red" in out["snapshot"][0]  # the paths really ran
    assert out["upload"] and "파랑 blue" in out["upload"][0]
    assert out["webrtc"]  # the Live tab's imports were exercised too
    assert out["heavy"] == []
    attempts = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    assert attempts == [], f"the demo tried to import: {attempts}"


def test_guard_really_blocks(tmp_path):
    """The guard itself works (a test that cannot fail is a defect)."""
    log = tmp_path / "imports.log"
    proc = subprocess.run(
        [sys.executable, "-c", "import torch"], env=guarded_env(log), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0 and "blocked in the kimchi-edge demo process" in proc.stderr
    assert log.read_text(encoding="utf-8").split()[1] == "torch"
