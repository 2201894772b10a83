"""The Streamlit page: three ways in (Snapshot, Upload, Live), one way to show a result.

Layout only; the work is in :mod:`kimchi_edge.mobile_demo.core`.  Every bad input ends as a message on the page
(``st.error``), never as a stopped app.  Korean labels are shown as page text (the browser's fonts
render Hangul), never drawn into video frames.

Streamlit 1.60 and later work (1.65 is the last release for Python 3.10, e.g. a Jetson on JetPack 6).  What later
releases add is detected once (:data:`FEATURES`) and replaced, saying so, where it is missing.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import streamlit as st

from kimchi_edge.runtime import Classifier
from kimchi_edge.runtime.errors import KimchiEdgeError

from .core import (
    MAKE_BUNDLE_HELP,
    MAX_UPLOAD_MB,
    DemoConfig,
    ImageResult,
    LivePredictor,
    bundle_facts,
    bundle_present,
    bundle_stamp,
    classify_image,
    describe_mode,
    format_timings,
    warm_up,
)

log = logging.getLogger(__name__)

TABS = ("Snapshot", "Upload", "Live")
LIVE_CONSTRAINTS = {"video": {"width": {"ideal": 640}, "height": {"ideal": 480}, "frameRate": {"ideal": 24, "max": 30}}, "audio": False}
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


def _accepts(func: Any, name: str) -> bool:
    """Whether ``func`` takes a keyword argument ``name`` (how a newer Streamlit feature is detected)."""
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class StreamlitFeatures:
    """What the installed Streamlit offers beyond the oldest release the demo supports (1.60).

    Attributes:
        version: ``streamlit.__version__``.
        bound_tabs: ``st.tabs(key=, bind="query-params")`` with ``TabContainer.open`` (Streamlit >= 1.65): the
            tabs follow ``?mode=`` and only the open one runs.  Without it the modes are a selector that does the
            same (:func:`mode_selector`), and the sidebar says so.
    """

    version: str
    bound_tabs: bool

    @classmethod
    def detect(cls) -> "StreamlitFeatures":
        return cls(version=st.__version__, bound_tabs=_accepts(st.tabs, "bind"))


FEATURES = StreamlitFeatures.detect()


def script_args() -> list[str]:
    """Arguments after ``--`` of ``streamlit run mobile_demo/app.py -- --bundle B`` (none under AppTest)."""
    return sys.argv[1:] if sys.argv and Path(sys.argv[0]).name == "app.py" else []


@st.cache_resource(show_spinner="Loading the model bundle…", max_entries=4)
def load_classifier(bundle: str, backend: str, allow_ungated: bool, stamp: float) -> Classifier:
    """One classifier per (bundle, backend, gating, manifest mtime) for the whole server; failures are not cached.

    It is warmed up here (one throw-away photo through decode, preprocess and inference), so the first
    photo a user sends shows the same latency as the next ones.
    """
    del stamp  # only part of the cache key: a re-converted bundle is reloaded
    clf = Classifier.from_bundle(bundle, backend=backend, allow_ungated=allow_ungated)
    warm_up(clf)
    return clf


def md_escape(text: str) -> str:
    """Escape Markdown so a label like ``*special*`` shows as typed."""
    out = []
    for ch in str(text):
        out.append("\\" + ch if ch in "\\`*_[]<>#|~$" else ch)
    return "".join(out)


# --------------------------------------------------------------------------- pieces


def show_no_bundle(cfg: DemoConfig) -> None:
    where = "" if cfg.bundle_given else " (the default, made by `make quickstart`)"
    st.info(f"No model bundle at `{cfg.bundle}`{where}.")
    st.markdown("\n".join(f"{line}  " for line in MAKE_BUNDLE_HELP))


def show_model_sidebar(facts: dict[str, Any]) -> None:
    sb = st.sidebar
    sb.header("Model")
    labels = facts["labels"]
    sb.markdown(f"**Labels ({len(labels)})**  \n" + "\n".join(f"- {md_escape(lab)}" for lab in labels))
    sb.markdown(f"**Input size** {facts['input_size']}  \n**Architecture** {md_escape(facts['architecture'] or '?')}")
    sb.markdown(f"**Backend** {md_escape(facts['backend'])}")
    for note in facts["notes"]:
        sb.caption(note)
    sb.caption(f"bundle: {facts['bundle']}")
    sb.header("Accuracy gate")
    rows = facts["gate_rows"]
    if not rows:  # never ran: the headline says so and how to run it
        sb.markdown(facts["gate_headline"])
    else:  # a sentence on the run, then one line per artifact
        sb.markdown(md_escape(rows[0]) + "".join(f"\n- {md_escape(line)}" for line in rows[1:]))
    if facts.get("gate_in_use"):
        sb.markdown(f"**In use** {md_escape(facts['gate_in_use'])}")


def insecure_camera_warning() -> None:
    """Phones only open the camera on HTTPS or localhost; say so when the page is plain HTTP elsewhere."""
    url = getattr(st.context, "url", None)
    if not url:
        return
    parsed = urlparse(url)
    if parsed.scheme == "http" and (parsed.hostname or "") not in LOCAL_HOSTS:
        st.warning(
            f"This page is served over plain HTTP at {parsed.hostname}: browsers allow the camera only on "
            "HTTPS or localhost. Restart with `kimchi-edge demo --host 0.0.0.0 --ssl-cert cert.pem --ssl-key key.pem` "
            "(docs/DEMO.md), or use the Upload tab."
        )


def show_result(result: ImageResult, facts: dict[str, Any], *, preview: bool = True) -> None:
    """One image's outcome: the error, or label, probability, top-k chart, stage timings, backend."""
    if not result.ok:
        st.error(result.error)
        return
    pred = result.prediction
    if preview and result.preview is not None:
        left, right = st.columns([1, 2])
        left.image(result.preview, caption=result.name, width="stretch")
    else:
        right = st.container()
    with right:
        st.markdown(f"### {md_escape(pred.label)}")
        st.markdown(f"**Prediction:** {md_escape(pred.label)} · **{pred.probability:.1%}**")
        top_chart(pred.top)
        st.caption(f"latency: {format_timings(pred.timings_ms)}")
        st.caption(f"backend: {md_escape(facts['backend'])}")
        if result.source_mode and result.source_mode != "RGB":
            st.caption(f"converted from {describe_mode(result.source_mode)} to RGB")


def top_chart_spec() -> dict[str, Any]:
    """Vega-Lite spec of the top-k chart: horizontal bars, best on top, on a fixed 0-100 % axis.

    The axis never stops at the top probability, so a 64 % winner leaves the runner-ups looking as small as they are.
    """
    return {
        "height": {"step": 26},  # a fixed height per bar (Streamlit squeezes a fixed chart height into a few pixels)
        "layer": [
            {"mark": {"type": "bar", "cornerRadiusEnd": 3}},
            {"mark": {"type": "text", "align": "left", "dx": 4, "baseline": "middle"},
             "encoding": {"text": {"field": "probability", "type": "quantitative", "format": ".1%"}}},
        ],
        "encoding": {
            "y": {"field": "label", "type": "nominal", "sort": None, "title": None, "axis": {"labelLimit": 240}},
            "x": {"field": "probability", "type": "quantitative", "title": "probability",
                  "scale": {"domain": [0, 1], "clamp": True}, "axis": {"format": ".0%", "tickCount": 5}},
            "tooltip": [{"field": "label", "type": "nominal"},
                        {"field": "probability", "type": "quantitative", "format": ".1%"}],
        },
    }


def top_chart(top: list[tuple[str, float]]) -> None:
    """Horizontal bar chart of the top-k probabilities (``top`` is best first)."""
    import pandas as pd  # Streamlit's own dependency

    df = pd.DataFrame({"label": [lab for lab, _ in top], "probability": [float(p) for _, p in top]})
    st.vega_lite_chart(df, top_chart_spec())


# --------------------------------------------------------------------------- tabs


def snapshot_tab(clf: Classifier, facts: dict[str, Any], top_k: int) -> None:
    insecure_camera_warning()
    photo = st.camera_input("Take a photo", key="snapshot")
    if photo is None:
        st.caption("Point the camera at the dish and take a photo; it is classified right away.")
        return
    show_result(classify_image(clf, photo.getvalue(), "photo", top_k), facts)


def upload_tab(clf: Classifier, facts: dict[str, Any], top_k: int) -> None:
    files = st.file_uploader(
        # No `type=` filter: Streamlit would reject other extensions with its own exception; every file
        # is checked by content instead and a non-image gets a one-line message like any bad image.
        "Images (one or several)", accept_multiple_files=True, key="upload",
        max_upload_size=MAX_UPLOAD_MB,
    )
    if not files:
        st.caption(f"JPEG, PNG, WebP, BMP, GIF or TIFF, up to {MAX_UPLOAD_MB} MB each.")
        return
    results = [classify_image(clf, f.getvalue(), f.name, top_k) for f in files]
    if len(results) > 1:
        ok = sum(r.ok for r in results)
        st.markdown(f"**{ok} of {len(results)} images classified**")
        st.dataframe(
            [{"file": r.name, "label": r.prediction.label if r.ok else "—",
              "probability": round(r.prediction.probability, 4) if r.ok else None,
              "total ms": round(r.prediction.timings_ms.get("total", 0.0), 1) if r.ok else None,
              "error": r.error or ""} for r in results],
            hide_index=True,
        )
    for r in results:
        with st.container(border=True):
            show_result(r, facts)


def _live_predictor(clf: Classifier, top_k: int, max_rate: float) -> LivePredictor:
    """The session's predictor, rebuilt when the classifier changes; settings refreshed every run."""
    key = "_kimchi_edge_live"
    held = st.session_state.get(key)
    if held is None or held[0] is not clf:
        if held is not None:
            held[1].close()
        held = (clf, LivePredictor(lambda rgb: clf.predict(rgb, top_k=3), max_rate=max_rate))
        st.session_state[key] = held
    predictor = held[1]
    predictor.classify = lambda rgb, _k=top_k: clf.predict(rgb, top_k=_k)
    predictor.max_rate = max_rate
    return predictor


def live_panel(predictor: LivePredictor, playing: bool) -> None:
    """Label, probability, FPS and timings next to the video (refreshed by a fragment while playing)."""
    s = predictor.status()
    if s.prediction is not None:
        pred = s.prediction
        st.markdown(f"### {md_escape(pred.label)}")
        st.markdown(f"**Live:** {md_escape(pred.label)} · **{pred.probability:.1%}**")
        top_chart(pred.top)
        st.caption(f"latency: {format_timings(pred.timings_ms)}")
    elif playing:
        st.info("Waiting for the first frame…")
    else:
        st.info("Press START and allow the camera.")
    c1, c2 = st.columns(2)
    c1.metric("Video", f"{s.video_fps:.0f} fps")
    c2.metric("Predictions", f"{s.predictions_per_s:.1f} /s")
    if s.error:
        st.error(s.error)


def live_tab(clf: Classifier, facts: dict[str, Any], top_k: int, max_rate: float, cfg: DemoConfig) -> None:
    insecure_camera_warning()
    if cfg.ice_error:
        st.warning(f"{cfg.ice_error} — using host candidates only (same LAN).")
    try:
        from streamlit_webrtc import WebRtcMode, webrtc_streamer
    except ImportError as exc:
        st.warning(f"Live video needs streamlit-webrtc ({exc}): pip install 'kimchi-edge[demo]'. Snapshot and Upload still work.")
        return
    predictor = _live_predictor(clf, top_k, max_rate)
    video_col, info_col = st.columns([3, 2])
    with video_col:
        try:
            ctx = webrtc_streamer(
                key="live",
                mode=WebRtcMode.SENDRECV,
                rtc_configuration=cfg.rtc_configuration,
                media_stream_constraints=LIVE_CONSTRAINTS,
                video_frame_callback=predictor.on_frame,
                async_processing=True,
            )
            playing = bool(ctx.state.playing)
        except Exception as exc:  # noqa: BLE001 - the rest of the page must keep working
            log.warning("live video failed", exc_info=True)
            st.error(f"Live video could not start: {type(exc).__name__}: {exc}")
            return
        st.caption(f"at most {max_rate:g} predictions/s; the last result is shown between them · backend: {md_escape(facts['backend'])}")
    with info_col:
        if playing:
            st.fragment(run_every=0.5)(live_panel)(predictor, True)
        else:
            live_panel(predictor, False)


def mode_selector() -> str:
    """The modes as a horizontal selector kept in ``?mode=`` (Streamlit without tabs bound to query parameters)."""
    wanted = st.query_params.get("mode")
    mode = st.radio("Mode", TABS, index=TABS.index(wanted) if wanted in TABS else 0, horizontal=True,
                    key="mode", label_visibility="collapsed")
    if wanted != mode:
        st.query_params["mode"] = mode
    return mode


# --------------------------------------------------------------------------- page


def main() -> None:
    """Render the page (called on every rerun by ``mobile_demo/app.py``)."""
    st.set_page_config(page_title="kimchi-edge demo", page_icon="📷", layout="centered")
    st.title("kimchi-edge camera demo")
    cfg = DemoConfig.load(script_args(), os.environ)
    if not bundle_present(cfg.bundle):
        show_no_bundle(cfg)
        return
    try:
        clf = load_classifier(str(cfg.bundle), cfg.backend, cfg.allow_ungated, bundle_stamp(cfg.bundle))
    except KimchiEdgeError as exc:
        st.error(f"Could not load the bundle at `{cfg.bundle}`: {exc}")
        st.markdown("\n".join(f"{line}  " for line in MAKE_BUNDLE_HELP))
        return
    except Exception as exc:  # noqa: BLE001 - an unexpected load failure is shown, not a dead page
        log.warning("bundle load failed", exc_info=True)
        st.error(f"Could not load the bundle at `{cfg.bundle}`: {type(exc).__name__}: {exc}")
        return
    facts = bundle_facts(clf)
    if not clf.info.get("gated", True):
        ungated = [n.removeprefix("UNGATED: ") for n in facts["notes"] if n.startswith("UNGATED:")]
        st.warning("Not verified: " + "; ".join(md_escape(n) for n in ungated or ["the accuracy gate did not pass this model"]))
    st.caption(
        f"{md_escape(facts['architecture'] or 'model')} · {len(facts['labels'])} labels · {facts['input_size']} · "
        f"{md_escape(facts['backend'])} · {facts['gate_short']}"
    )
    show_model_sidebar(facts)
    n = len(facts["labels"])
    st.sidebar.header("Settings")
    top_k = st.sidebar.slider("Top-k labels", 1, min(10, n), min(3, n), key="top_k")
    max_rate = st.sidebar.slider("Live: predictions per second", 1, 15, 5, key="live_rate")

    modes = {
        "Snapshot": lambda: snapshot_tab(clf, facts, top_k),
        "Upload": lambda: upload_tab(clf, facts, top_k),
        "Live": lambda: live_tab(clf, facts, top_k, float(max_rate), cfg),
    }
    if FEATURES.bound_tabs:
        for tab, render in zip(st.tabs(list(TABS), key="mode", bind="query-params"), modes.values()):
            with tab:
                if tab.open:  # only the open tab runs: no camera or WebRTC session behind a hidden tab
                    render()
    else:
        st.sidebar.caption(f"Streamlit {FEATURES.version}: the modes are a selector here "
                           "(tabs that follow the address need Streamlit 1.65 or later).")
        modes[mode_selector()]()
