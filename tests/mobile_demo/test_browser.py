"""The demo in a real headless Chromium, against ``kimchi-edge demo`` served on 127.0.0.1.

Chromium's fake camera (``--use-fake-device-for-media-stream``: a green test pattern) stands in for a
phone's: Snapshot takes a real ``st.camera_input`` photo, Live streams it over WebRTC to the server
(host ICE candidates only, as on a LAN without internet) where the colour bundle says "초록 green".
Screenshots go to ``test-artifacts/``.  The server runs with a guard that logs any torch/fastai import.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium chromium-driver``)
and selenium (dev extra); skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from . import images
from .server import REPO, demo_server, guarded_env

pytestmark = pytest.mark.browser

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = REPO / "test-artifacts"

if os.name != "posix":
    pytest.skip("the browser tests manage the server by process group (POSIX only)", allow_module_level=True)
if not CHROMIUM or not CHROMEDRIVER:
    pytest.skip("needs Chromium and its driver: apt-get install -y chromium chromium-driver", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install 'kimchi-edge[dev]'")
pytest.importorskip("streamlit_webrtc", reason="the demo needs streamlit-webrtc: pip install 'kimchi-edge[demo]'")

from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 90  # a shared 2-core CI machine can be slow; the waits end as soon as the text shows


@pytest.fixture(scope="module")
def import_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo_imports") / "imports.log"


@pytest.fixture(scope="module")
def server(color_bundle, import_log, tmp_path_factory):
    """The demo on the colour bundle, with a gate run recorded (the sidebar shows it in words)."""
    from .bundles import GATE, gated_copy

    bundle = gated_copy(color_bundle, tmp_path_factory.mktemp("demo_bundle") / "gated",
                        gate={**GATE, "reference_top1": 0.9145})
    log = tmp_path_factory.mktemp("demo_server") / "server.log"
    with demo_server([str(bundle)], guarded_env(import_log), log) as url:
        yield url


def make_browser(tmp_path_factory, *extra_flags: str):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--window-size=1280,1300",
        "--use-fake-device-for-media-stream",  # a synthetic camera (green test pattern)
        "--use-fake-ui-for-media-stream",  # grant the camera without a prompt
        *extra_flags,
    ):
        opts.add_argument(flag)
    # An explicit driver path keeps Selenium Manager from trying to download one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    return driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = make_browser(tmp_path_factory)
    yield driver
    driver.quit()


def body(driver) -> str:
    """The visible text of the page (Streamlit re-renders constantly: retry a stale read)."""
    for _ in range(5):
        try:
            return driver.find_element(By.TAG_NAME, "body").text
        except StaleElementReferenceException:
            time.sleep(0.2)
    return driver.find_element(By.TAG_NAME, "body").text


def wait_text(driver, *needles: str, timeout: float = WAIT_S) -> str:
    try:
        WebDriverWait(driver, timeout, poll_frequency=0.3).until(lambda d: all(n in body(d) for n in needles))
    except TimeoutException:
        pytest.fail(f"page never showed {needles!r}; it shows:\n{body(driver)[-2000:]}")
    return body(driver)


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    return path


def open_tab(driver, server: str, mode: str) -> None:
    driver.get(f"{server}/?mode={mode}")
    wait_text(driver, "kimchi-edge camera demo", "Snapshot", "Upload", "Live")


def upload(driver, *paths: Path) -> None:
    field = WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type=file]"))
    field.send_keys("\n".join(str(p) for p in paths))


def click_component_button(driver, label: str, timeout: float = WAIT_S) -> None:
    """Click a button inside the streamlit-webrtc component's iframe (it re-renders: retry stale reads)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            driver.switch_to.default_content()
            driver.switch_to.frame(driver.find_element(By.CSS_SELECTOR, "iframe"))
            for b in driver.find_elements(By.TAG_NAME, "button"):
                if b.text.strip().upper() == label and b.is_enabled():
                    b.click()
                    return
        except (StaleElementReferenceException, NoSuchElementException):
            pass
        finally:
            driver.switch_to.default_content()
        if time.monotonic() > deadline:
            pytest.fail(f"no {label} button in the live video component")
        time.sleep(0.3)


def test_page_loads_and_upload_shows_prediction(server, browser, tmp_path):
    open_tab(browser, server, "Upload")
    page = wait_text(browser, "Labels (3)", "빨강 red", "Input size 32×32", "onnxruntime",
                     "Accuracy gate passed on 120 validation images, the fastai learner got 91.5% of them right.",
                     "In use onnx-fp32 passed: 91.2% right, 0.25 points below the fastai learner")
    assert "Traceback" not in page
    red, blue, muddy = tmp_path / "red.jpg", tmp_path / "blue rgba.png", tmp_path / "muddy.jpg"
    red.write_bytes(images.jpeg(images.RED, size=(640, 480)))
    blue.write_bytes(images.png_rgba((0, 0, 255, 255)))
    muddy.write_bytes(images.jpeg((150, 110, 90), size=(640, 480)))  # no sure winner: the chart's 0-100 % axis shows it
    upload(browser, muddy, red, blue)  # the uncertain one first: in the screenshot
    wait_text(browser, "Prediction: 빨강 red", "Prediction: 파랑 blue", "3 of 3 images classified",
              "latency: decode", "converted from RGBA")
    time.sleep(1.0)  # let the bar charts finish drawing before the picture
    shot = screenshot(browser, "demo_upload.png")
    print(f"screenshot: {shot}")


def test_corrupt_upload_shows_error_and_page_survives(server, browser, tmp_path):
    open_tab(browser, server, "Upload")
    bad, text = tmp_path / "broken.jpg", tmp_path / "notes.txt"
    bad.write_bytes(images.truncated_jpeg())
    text.write_text("not a photo", encoding="utf-8")
    upload(browser, bad, text)
    page = wait_text(browser, "broken.jpg", "damaged or truncated", "notes.txt", "is not an image")
    assert "0 of 2 images classified" in page and "Traceback" not in page
    screenshot(browser, "demo_upload_errors.png")


def test_snapshot_with_camera(server, browser):
    open_tab(browser, server, "Snapshot")
    button = WebDriverWait(browser, WAIT_S).until(
        lambda d: next((b for b in d.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Take Photo" and b.is_enabled()), None)
    )
    time.sleep(1.0)  # the fake camera needs a moment to deliver frames
    button.click()
    wait_text(browser, "Prediction: 초록 green", "latency: decode", "backend: onnxruntime")
    screenshot(browser, "demo_snapshot.png")


def test_live_video_predicts_beside_the_stream(server, browser):
    open_tab(browser, server, "Live")
    click_component_button(browser, "START")
    wait_text(browser, "Live: 초록 green")

    def fps(driver) -> float:
        lines = body(driver).splitlines()
        value = lines[lines.index("Video") + 1] if "Video" in lines else "0 fps"
        return float(value.split()[0])

    try:
        WebDriverWait(browser, WAIT_S, poll_frequency=0.5).until(lambda d: fps(d) > 0)
    except TimeoutException:
        pytest.fail(f"no video frame rate shown:\n{body(browser)[-1500:]}")
    screenshot(browser, "demo_live.png")
    click_component_button(browser, "STOP")  # releases the camera and the server's WebRTC worker


def test_server_process_imported_no_torch_or_fastai(server, browser, import_log):
    """Runs after the tests above exercised every path in the real server process."""
    attempts = import_log.read_text(encoding="utf-8").splitlines() if import_log.exists() else []
    assert attempts == [], f"the demo server tried to import: {attempts}"


def test_snapshot_over_https_in_one_flag(color_bundle, tmp_path_factory):
    """``kimchi-edge demo --https``: the self-signed LAN certificate, accepted by Chromium (by its key, as a phone
    user does once), a secure context, and a fake-camera snapshot classified over it."""
    import base64
    import hashlib

    pytest.importorskip("cryptography", reason="--https needs cryptography (the demo extra)")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    home = tmp_path_factory.mktemp("https-home")
    env = {**os.environ, "KIMCHI_EDGE_HTTPS_DIR": str(home)}
    log = tmp_path_factory.mktemp("demo_https") / "server.log"
    with demo_server([str(color_bundle), "--https", "--host", "127.0.0.1"], env, log, scheme="https") as url:
        cert = x509.load_pem_x509_certificate((home / "kimchi-edge-lan.pem").read_bytes())
        spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
        driver = make_browser(tmp_path_factory, f"--ignore-certificate-errors-spki-list={pin}")
        try:
            open_tab(driver, url, "Snapshot")
            assert driver.execute_script("return window.isSecureContext") is True
            button = WebDriverWait(driver, WAIT_S).until(
                lambda d: next((b for b in d.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Take Photo" and b.is_enabled()), None)
            )
            time.sleep(1.0)
            button.click()
            wait_text(driver, "Prediction: 초록 green")
            screenshot(driver, "demo_snapshot_https.png")
        finally:
            driver.quit()
    printed = log.read_text(encoding="utf-8", errors="replace")
    assert "on your phone (same Wi-Fi): https://" in printed and "█" in printed  # the address and its QR code
