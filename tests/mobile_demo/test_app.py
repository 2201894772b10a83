"""The Streamlit page, headless, through ``streamlit.testing.v1.AppTest`` (same process, no browser).

``AppTest`` drives ``st.file_uploader`` directly, and ``st.camera_input`` from Streamlit 1.66 (under Python 3.10,
whose last Streamlit is 1.65, the photo itself is taken in ``test_browser.py``); the Live tab's WebRTC component
needs a real browser and server, so it is covered there too.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the demo needs streamlit (pip install 'kimchi-edge[demo]')")
from streamlit.testing.v1 import AppTest  # noqa: E402

from kimchi_edge.mobile_demo import page  # noqa: E402
from kimchi_edge.mobile_demo.core import ENV_ALLOW_UNGATED, ENV_BACKEND, ENV_BUNDLE, ENV_ICE_SERVERS  # noqa: E402

from . import images  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "mobile_demo" / "app.py"
APPTEST_CAMERA = hasattr(AppTest, "camera_input")  # Streamlit >= 1.66 (Python >= 3.11)
needs_apptest_camera = pytest.mark.skipif(
    not APPTEST_CAMERA,
    reason=f"AppTest can take a camera photo from Streamlit 1.66 (installed: {page.FEATURES.version}); "
           "test_browser.py takes one with Chromium's fake camera",
)


@pytest.fixture
def app(monkeypatch, color_bundle):
    """A factory: ``app(bundle=..., mode=..., **env)`` returns an AppTest that has run once."""

    def make(bundle: Path | None = color_bundle, mode: str | None = None, **env: str) -> AppTest:
        for var in (ENV_BUNDLE, ENV_BACKEND, ENV_ICE_SERVERS, ENV_ALLOW_UNGATED):
            monkeypatch.delenv(var, raising=False)
        if bundle is not None:
            monkeypatch.setenv(ENV_BUNDLE, str(bundle))
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        at = AppTest.from_file(str(APP), default_timeout=60)
        if mode:
            at.query_params["mode"] = mode
        at.run()
        assert not at.exception, at.exception
        return at

    return make


def texts(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "info", "warning", "error", "title") for e in getattr(at, kind)]
    return "\n".join(map(str, parts))


def modes(at: AppTest) -> list[str]:
    """The page's modes: its tabs, or the selector that replaces them on Streamlit < 1.65."""
    return [t.label for t in at.tabs] if page.FEATURES.bound_tabs else [o for r in at.radio for o in r.options]


def test_snapshot_tab_opens_first_with_the_camera(app):
    at = app()
    assert modes(at) == ["Snapshot", "Upload", "Live"]
    assert len(at.get("camera_input")) == 1  # Snapshot is the first tab: the phone path
    assert not at.get("file_uploader")  # only the open tab runs
    assert "Point the camera at the dish" in texts(at)


@needs_apptest_camera
def test_snapshot_photo_shows_prediction(app):
    at = app()
    assert len(at.camera_input) == 1
    at.camera_input[0].upload("photo.jpg", images.jpeg(images.RED))
    at.run()
    assert not at.exception
    page = texts(at)
    assert "**Prediction:** 빨강 red · **" in page
    assert "latency: decode" in page and "inference" in page
    assert "backend: onnxruntime (CPUExecutionProvider)" in page
    assert not at.error


def test_upload_several_images_and_modes(app):
    at = app(mode="Upload")
    assert len(at.file_uploader) == 1 and at.file_uploader[0].accept_multiple_files
    up = at.file_uploader[0]
    up.upload("green.jpg", images.jpeg(images.GREEN), "image/jpeg")
    up.upload("blue_rgba.png", images.png_rgba((0, 0, 255, 255)), "image/png")
    up.upload("red_cmyk.jpg", images.jpeg_cmyk((0, 255, 255, 0)), "image/jpeg")
    up.upload("grey16.png", images.png_16bit_grey(), "image/png")
    at.run()
    assert not at.exception and not at.error
    page = texts(at)
    assert "**4 of 4 images classified**" in page
    for label in ("초록 green", "파랑 blue", "빨강 red"):
        assert f"**Prediction:** {label}" in page
    assert "converted from CMYK to RGB" in page
    assert "converted from RGBA (transparency composited on white) to RGB" in page
    assert "converted from 16-bit greyscale to RGB" in page
    assert len(at.dataframe) == 1  # summary table for several files


def test_corrupt_and_non_image_uploads_show_errors_and_page_keeps_working(app):
    at = app(mode="Upload")
    up = at.file_uploader[0]
    up.upload("notes.txt", b"shopping list: kimchi", "text/plain")
    up.upload("broken.jpg", images.truncated_jpeg(), "image/jpeg")
    up.upload("bomb.png", images.huge_png_header(), "image/png")
    up.upload("empty.jpg", b"", "image/jpeg")
    up.upload("ok.jpg", images.jpeg(images.BLUE), "image/jpeg")
    at.run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 4
    assert errors[0].startswith("notes.txt") and "is not an image" in errors[0]
    assert errors[1].startswith("broken.jpg") and "damaged or truncated" in errors[1]
    assert errors[2].startswith("bomb.png") and "20000x20000" in errors[2]
    assert errors[3].startswith("empty.jpg: the file is empty")
    assert "**1 of 5 images classified**" in texts(at)
    assert "**Prediction:** 파랑 blue" in texts(at)
    # and the next interaction still works
    at.file_uploader[0].clear()
    at.run()
    assert not at.exception and not at.error


def test_no_bundle_explains_how_to_make_one(app, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no runs/quickstart/bundle here
    at = app(bundle=None)
    page = texts(at)
    assert f"No model bundle at `{tmp_path / 'runs' / 'quickstart' / 'bundle'}`" in page
    assert "`make quickstart`" in page and "`kimchi-edge convert RUN_DIR`" in page
    assert not modes(at) and not at.get("camera_input") and not at.file_uploader


def test_named_bundle_missing(app, tmp_path):
    at = app(bundle=tmp_path / "nowhere")
    assert f"No model bundle at `{tmp_path / 'nowhere'}`." in texts(at)


def test_bundle_that_fails_to_load_is_reported(app, color_bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(color_bundle, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    at = app(bundle=broken)
    (msg,) = [e.value for e in at.error]
    assert msg.startswith(f"Could not load the bundle at `{broken}`") and "model.onnx has been modified" in msg
    assert "`make quickstart`" in texts(at)

    (broken / "manifest.json").write_text("{ this is not json", encoding="utf-8")
    at = app(bundle=broken)
    assert "is not valid UTF-8 JSON" in at.error[0].value


def test_ungated_bundle_is_refused_unless_allowed_and_then_says_so(app, ungated_color_bundle):
    at = app(bundle=ungated_color_bundle)
    (msg,) = [e.value for e in at.error]
    assert "accuracy gate has never run on this bundle" in msg and "--allow-ungated" in msg  # names the demo's option
    assert not modes(at)
    at = app(bundle=ungated_color_bundle, mode="Upload", **{ENV_ALLOW_UNGATED: "1"})  # kimchi-edge demo --allow-ungated
    assert not at.error
    (warning,) = [w.value for w in at.warning]
    assert warning.startswith("Not verified: the accuracy gate has never run on this bundle") and "--allow-ungated" in warning
    at.file_uploader[0].upload("g.jpg", images.jpeg(images.GREEN), "image/jpeg")
    at.run()
    assert "**Prediction:** 초록 green" in texts(at)


def test_sidebar_shows_bundle_facts(app):
    at = app()
    side = "\n".join(m.value for m in at.sidebar.markdown)
    assert "**Labels (3)**" in side and "- 빨강 red\n- 초록 green\n- 파랑 blue" in side
    assert "**Input size** 32×32" in side
    assert "**Backend** onnxruntime (CPUExecutionProvider) · onnx-fp32 (fp32)" in side
    assert "Accuracy gate passed on 9 validation images" in side  # the shared bundle is gated for real
    assert "Accuracy gate" in [h.value for h in at.sidebar.header]


def chart_rows(at: AppTest) -> list[dict]:
    """The data behind every chart on the page (Arrow IPC inside the Vega-Lite proto)."""
    import pyarrow as pa  # Streamlit's own dependency

    out = []
    for chart in at.get("vega_lite_chart"):
        tables = [chart.proto.data.data] if chart.proto.data.data else []
        tables += [ds.data.data for ds in chart.proto.datasets]
        out += [pa.ipc.open_stream(t).read_all().to_pydict() for t in tables]
    return out


def chart_specs(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("vega_lite_chart")]


def test_top_k_chart(app):
    at = app(mode="Upload")
    at.file_uploader[0].upload("r.jpg", images.jpeg(images.RED), "image/jpeg")
    at.run()
    (rows,) = chart_rows(at)
    assert rows["label"] == ["빨강 red", "초록 green", "파랑 blue"]
    assert rows["probability"][0] > 0.99 and abs(sum(rows["probability"]) - 1) < 1e-5
    at.sidebar.slider(key="top_k").set_value(1)
    at.run()
    assert not at.exception
    (rows,) = chart_rows(at)
    assert rows["label"] == ["빨강 red"]


def test_top_k_axis_is_fixed_from_0_to_100_percent(app):
    """A 64 % winner must not fill the chart: the probability axis always ends at 1, not at the top bar."""
    at = app(mode="Upload")
    at.file_uploader[0].upload("reddish.jpg", images.jpeg((150, 110, 90)), "image/jpeg")  # a muddy colour: no sure winner
    at.run()
    (rows,) = chart_rows(at)
    assert 0.4 < rows["probability"][0] < 0.9, rows  # the case the fixed axis is for
    (spec,) = chart_specs(at)
    x = spec["encoding"]["x"]
    assert x["field"] == "probability" and x["scale"]["domain"] == [0, 1]
    assert spec["encoding"]["y"]["sort"] is None  # rows are best first, and stay in that order


def test_older_streamlit_without_bound_tabs_gets_a_mode_selector(app, monkeypatch):
    """Streamlit 1.60-1.64 (no ``st.tabs(bind=...)``): the same modes, one at a time, in the same ``?mode=``."""
    monkeypatch.setattr(page, "FEATURES", dataclasses.replace(page.FEATURES, version="1.60.0", bound_tabs=False))
    at = app(mode="Upload")
    assert not at.tabs
    (selector,) = at.radio
    assert list(selector.options) == ["Snapshot", "Upload", "Live"] and selector.value == "Upload"
    assert not at.get("camera_input")  # only the chosen mode runs
    assert "Streamlit 1.60.0: the modes are a selector here" in "\n".join(c.value for c in at.sidebar.caption)
    at.file_uploader[0].upload("b.png", images.png_rgba((0, 0, 255, 255)), "image/png")
    at.run()
    assert "**Prediction:** 파랑 blue" in texts(at)
    at.radio[0].set_value("Snapshot").run()
    assert not at.exception and at.query_params["mode"] == "Snapshot"  # kept in the address, like the tabs
    assert len(at.get("camera_input")) == 1 and not at.file_uploader


def test_classifier_is_warmed_up_once_when_loaded(app, color_bundle, tmp_path, monkeypatch):
    fresh = tmp_path / "fresh"  # a new path: not in the server-wide classifier cache yet
    shutil.copytree(color_bundle, fresh)
    calls = []
    monkeypatch.setattr(page, "warm_up", lambda clf: calls.append(clf.info["bundle"]))
    at = app(bundle=fresh, mode="Upload")
    at.file_uploader[0].upload("r.jpg", images.jpeg(images.RED), "image/jpeg")
    at.run()
    assert "**Prediction:** 빨강 red" in texts(at)
    assert len(calls) == 1 and Path(calls[0]).resolve() == fresh.resolve()  # at load, not again per photo


def test_live_tab_without_streamlit_webrtc_names_the_fix(app, monkeypatch):
    monkeypatch.setitem(sys.modules, "streamlit_webrtc", None)  # import fails as if not installed
    at = app(mode="Live")
    assert any("pip install 'kimchi-edge[demo]'" in w.value for w in at.warning)


class _FakeContext:
    def __init__(self, url):
        self.url = url


@pytest.mark.parametrize("url, warned", [
    ("http://192.168.1.20:8501/", True),  # a phone on the LAN over plain HTTP: no camera
    ("https://192.168.1.20:8501/", False),
    ("http://localhost:8501/", False),  # localhost is a secure context
])
def test_plain_http_from_another_device_warns_about_the_camera(app, monkeypatch, url, warned):
    import streamlit

    monkeypatch.setattr(streamlit, "context", _FakeContext(url))
    at = app()
    warnings = [w.value for w in at.warning]
    assert any("browsers allow the camera only on HTTPS or localhost" in w for w in warnings) == warned
    if warned:
        assert "--ssl-cert" in warnings[0] and "192.168.1.20" in warnings[0]


def test_gate_summary_and_artifact_in_use(app, color_bundle, tmp_path):
    from .bundles import gated_copy

    at = app(bundle=gated_copy(color_bundle, tmp_path / "gated"))
    side = "\n".join(m.value for m in at.sidebar.markdown)
    assert "Accuracy gate passed on 120 validation images.\n- onnx-fp32: passed" in side, side
    assert ("**In use** onnx-fp32 passed: 91.2% right, 0.25 points below the fastai learner, same answer on 98.7% of images"
            in side), side
    gate_part = side.split("Accuracy gate passed")[1]
    assert "reference_top1" not in side and "`" not in gate_part  # words, not raw keys or code
    assert "gate passed" in at.caption[0].value
