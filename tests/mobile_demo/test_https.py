"""``kimchi-edge demo --ssl-cert --ssl-key`` really serves HTTPS with the self-signed pair that the
one-line openssl command in docs/DEMO.md makes (phones open the camera only in a secure context)."""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess

import pytest

from .server import demo_server, fetch

pytest.importorskip("streamlit", reason="the demo needs streamlit (pip install 'kimchi-edge[demo]')")
pytestmark = pytest.mark.skipif(os.name != "posix", reason="the server is managed by process group (POSIX only)")

# The command documented in docs/DEMO.md, with this machine's LAN address replaced by 127.0.0.1.
OPENSSL = (
    'openssl req -x509 -newkey rsa:2048 -nodes -days 365 -keyout key.pem -out cert.pem '
    '-subj "/CN=kimchi-edge demo" -addext "subjectAltName=IP:127.0.0.1,DNS:localhost"'
)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line tool")
def test_https_with_documented_self_signed_certificate(color_bundle, tmp_path):
    subprocess.run(OPENSSL, shell=True, cwd=tmp_path, check=True, capture_output=True, timeout=60)
    args = [str(color_bundle), "--ssl-cert", str(tmp_path / "cert.pem"), "--ssl-key", str(tmp_path / "key.pem")]
    with demo_server(args, dict(os.environ), tmp_path / "server.log", scheme="https") as url:
        assert url.startswith("https://")
        assert "<title>" in fetch(url + "/")
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP is not served on that port
            fetch(url.replace("https://", "http://") + "/_stcore/health", timeout=3)
