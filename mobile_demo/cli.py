"""Start the Streamlit camera demo for a bundle: phone snapshot, live webcam, upload.

Runs ``streamlit run mobile_demo/app.py`` with the bundle, backend and WebRTC ICE servers passed in
the environment.  Phones open the camera only over HTTPS (or on localhost): give ``--ssl-cert`` and
``--ssl-key`` and ``--host 0.0.0.0`` to use it from a phone on the same network (docs/DEMO.md).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

from kimchi_edge.runtime.errors import MissingDependencyError, UsageError

APP = Path(__file__).resolve().with_name("app.py")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "bundle", nargs="?", default=None,
        help="bundle folder (default: runs/quickstart/bundle, made by `make quickstart`; without one the page says how to make it)",
    )
    parser.add_argument("--port", type=int, default=8501, help="port to listen on (default: 8501)")
    parser.add_argument(
        "--host", default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 to reach it from a phone on the LAN)",
    )
    parser.add_argument(
        "--https", action="store_true",
        help="HTTPS for phones in one flag: a self-signed certificate for this machine's LAN addresses (made once, kept in "
             "~/.config/kimchi-edge/https), listens on 0.0.0.0 unless --host, prints the https://LAN-IP address and a QR code",
    )
    parser.add_argument("--ssl-cert", type=Path, help="PEM certificate: serve HTTPS (needed for the camera on a phone)")
    parser.add_argument("--ssl-key", type=Path, help="PEM private key of --ssl-cert")
    parser.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"), default="auto", help="inference backend (default: auto)")
    parser.add_argument(
        "--ice-servers", default="none", metavar="SPEC",
        help="WebRTC STUN/TURN for Live: 'none' (default: host candidates only, right on one LAN without internet), "
             "'auto' (streamlit-webrtc's default: Google's public STUN), comma-separated stun:/turn: URLs, "
             "or JSON / a JSON file: [{\"urls\": \"turn:HOST:3478\", \"username\": \"U\", \"credential\": \"P\"}]",
    )
    parser.add_argument(
        "--allow-ungated", action="store_true",
        help="also run an artifact the accuracy gate did not pass (failed, skipped, never gated); the page says so. "
             "By default only what passed runs",
    )
    parser.add_argument("--print-command", action="store_true", help="print the streamlit command and environment, do not start it")


def build_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The ``streamlit run`` command line and the environment additions for ``args``.

    Raises:
        UsageError: half an SSL pair, a missing certificate file, a bad port or bad ICE servers.
    """
    from .core import DEFAULT_BUNDLE, ENV_ALLOW_UNGATED, ENV_BACKEND, ENV_BUNDLE, ENV_ICE_SERVERS, parse_ice_servers

    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a TCP port (1-65535)")
    if getattr(args, "https", False):
        if args.ssl_cert or args.ssl_key:
            raise UsageError("--https makes its own certificate; give either --https or --ssl-cert/--ssl-key")
        from kimchi_edge.runtime.https import lan_certificate

        args.ssl_cert, args.ssl_key, args._cert_made = lan_certificate()
        if args.host == "127.0.0.1":  # the point of --https is a phone on the LAN
            args.host = "0.0.0.0"
    if bool(args.ssl_cert) != bool(args.ssl_key):
        raise UsageError("--ssl-cert and --ssl-key go together (a certificate and its private key); see docs/DEMO.md")
    for flag, path in (("--ssl-cert", args.ssl_cert), ("--ssl-key", args.ssl_key)):
        if path is not None and not path.is_file():
            raise UsageError(f"{flag} {path}: no such file (make a self-signed pair with the openssl command in docs/DEMO.md)")
    parse_ice_servers(args.ice_servers)  # refuse a bad value here, not later in the page

    bundle = Path(args.bundle) if args.bundle else DEFAULT_BUNDLE
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.port", str(args.port),
        "--server.address", args.host,
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal",
        "--server.maxUploadSize", "50",
    ]
    if args.ssl_cert:
        cmd += ["--server.sslCertFile", str(args.ssl_cert.resolve()), "--server.sslKeyFile", str(args.ssl_key.resolve())]
    env = {
        ENV_BUNDLE: str(bundle.resolve()),
        ENV_BACKEND: args.backend,
        ENV_ICE_SERVERS: args.ice_servers,
        ENV_ALLOW_UNGATED: "1" if args.allow_ungated else "0",
    }
    return cmd, env


def lan_address() -> str | None:
    """This machine's address on the LAN (the one a phone would use), without sending anything."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # UDP connect: picks the outgoing interface, sends nothing
            addr = s.getsockname()[0]
        return None if addr.startswith("127.") else addr
    except OSError:
        return None


def urls(args: argparse.Namespace) -> list[str]:
    scheme = "https" if args.ssl_cert else "http"
    if args.host in ("0.0.0.0", "::", ""):
        hosts = ["localhost"] + ([lan] if (lan := lan_address()) else [])
    else:
        hosts = [args.host]
    return [f"{scheme}://{h}:{args.port}" for h in hosts]


def run(args: argparse.Namespace) -> int:
    cmd, env_add = build_command(args)
    if args.print_command:
        for key, value in env_add.items():
            print(f"{key}={value}")
        print(" ".join(cmd))
        return 0
    try:
        import streamlit  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(f"the demo needs streamlit ({exc}); install it with: pip install 'kimchi-edge[demo]'") from exc
    bundle = Path(env_add["KIMCHI_EDGE_BUNDLE"])
    if not (bundle / "manifest.json").is_file():
        print(f"kimchi-edge demo: no bundle at {bundle} yet; the page explains how to make one (make quickstart).", file=sys.stderr)
    for url in urls(args):
        print(f"kimchi-edge demo: open {url}", file=sys.stderr)
    if getattr(args, "https", False):
        from kimchi_edge.runtime.https import print_phone_address

        print_phone_address(args.port, args.ssl_cert, getattr(args, "_cert_made", False), file=sys.stderr)
    if not args.ssl_cert and args.host not in ("127.0.0.1", "localhost", "::1"):
        print("kimchi-edge demo: without --ssl-cert/--ssl-key a phone will refuse the camera (HTTPS needed); see docs/DEMO.md",
              file=sys.stderr)
    env = {**os.environ, **env_add}
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        # Become the Streamlit server: Ctrl-C, SIGTERM (systemd, docker stop) reach it directly and
        # no orphaned server is left behind.
        os.execve(sys.executable, cmd, env)
    proc = subprocess.Popen(cmd, env=env)  # pragma: no cover - Windows
    try:  # pragma: no cover - Windows
        return proc.wait()
    except KeyboardInterrupt:  # pragma: no cover - Windows
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()
        raise
