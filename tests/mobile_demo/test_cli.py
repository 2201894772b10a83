"""``kimchi-edge demo``: the streamlit command it builds, and the errors it refuses with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kimchi_edge.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_demo_is_listed_in_the_cli(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.strip().startswith("demo ")]
    assert "Streamlit camera demo" in line and "unavailable" not in line


def test_print_command_defaults(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--print-command"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"KIMCHI_EDGE_BUNDLE={tmp_path / 'runs' / 'quickstart' / 'bundle'}" in lines
    assert "KIMCHI_EDGE_BACKEND=auto" in lines and "KIMCHI_EDGE_DEMO_ICE_SERVERS=none" in lines
    assert "KIMCHI_EDGE_ALLOW_UNGATED=0" in lines  # only what the accuracy gate passed runs
    cmd = lines[-1]
    assert cmd.startswith(f"{sys.executable} -m streamlit run {REPO / 'mobile_demo' / 'app.py'}")
    assert "--server.port 8501" in cmd and "--server.address 127.0.0.1" in cmd and "--server.headless true" in cmd
    assert "sslCertFile" not in cmd


def test_print_command_with_https_and_options(capsys, tmp_path, color_bundle):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n", encoding="utf-8")
    key.write_text("-----BEGIN PRIVATE KEY-----\n", encoding="utf-8")
    rc = main(["demo", str(color_bundle), "--host", "0.0.0.0", "--port", "8443", "--ssl-cert", str(cert), "--ssl-key", str(key),
               "--backend", "onnxruntime", "--ice-servers", "stun:10.0.0.2:3478", "--allow-ungated", "--print-command"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"KIMCHI_EDGE_BUNDLE={color_bundle}" in lines
    assert "KIMCHI_EDGE_BACKEND=onnxruntime" in lines and "KIMCHI_EDGE_DEMO_ICE_SERVERS=stun:10.0.0.2:3478" in lines
    assert "KIMCHI_EDGE_ALLOW_UNGATED=1" in lines
    cmd = lines[-1]
    assert "--server.port 8443" in cmd and "--server.address 0.0.0.0" in cmd
    assert f"--server.sslCertFile {cert}" in cmd and f"--server.sslKeyFile {key}" in cmd


@pytest.mark.parametrize("argv, message", [
    (["--ssl-cert", "cert.pem"], "--ssl-cert and --ssl-key go together"),
    (["--ssl-cert", "nope.pem", "--ssl-key", "nope.key"], "--ssl-cert nope.pem: no such file"),
    (["--ice-servers", "http://stun.example"], "not a stun:/turn: URL"),
    (["--port", "70000"], "--port 70000 is not a TCP port"),
], ids=["half-ssl-pair", "missing-cert", "bad-ice", "bad-port"])
def test_bad_arguments_exit_2_with_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", *argv, "--print-command"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kimchi-edge demo: error: ") and message in err and "\n" not in err


def test_unknown_backend_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--backend", "cuda"])
    assert exc.value.code == 2
