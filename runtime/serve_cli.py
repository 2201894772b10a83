"""Serve a bundle over HTTP: ``POST /predict`` (raw image body or multipart file), ``GET /health``
(``/health/live``, ``/health/ready``), ``GET /metadata``, ``GET /metrics``; OpenAPI docs at ``/docs``.
Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client).

Example::

    kimchi-edge serve runs/food10/bundle --port 8000
    curl -F file=@kimchi.jpg http://127.0.0.1:8000/predict
"""

from __future__ import annotations

import argparse
import os
import sys

#: The environment variable read for ``--api-key`` (keeps the key out of ``ps`` and shell history).
API_KEY_ENV = "KIMCHI_EDGE_API_KEY"


def add_args(parser: argparse.ArgumentParser) -> None:
    """Declare the ``serve`` options."""
    from .cliutil import add_model_args

    parser.add_argument("bundle", metavar="BUNDLE", help="bundle folder (with manifest.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 for the LAN)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one and prints it)")
    add_model_args(parser)
    g = parser.add_argument_group("limits")
    g.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MB, 413 above (default: %(default)s)")
    g.add_argument("--max-pixels", type=float, default=80.0, help="largest image in megapixels, 422 above, checked before decoding (default: %(default)s)")
    g.add_argument("--timeout", type=float, default=10.0, help="seconds to classify a received image, 504 above (default: %(default)s)")
    g.add_argument("--body-timeout", type=float, default=30.0, help="seconds to receive a request body, 408 above (default: %(default)s)")
    g.add_argument("--max-pending", type=int, default=32,
                   help="/predict requests in flight (receiving, queued, classifying) before 503 at once, body unread (default: %(default)s)")
    g.add_argument("--max-inflight-body-mb", type=float, default=64.0,
                   help="request bodies in flight together, in MB (a chunked body counts as --max-body-mb); 503 at once above "
                        "(default: %(default)s)")
    g.add_argument("--max-decode-mb", type=float, default=320.0,
                   help="memory one image may take to decode (pixels x bytes per pixel of its mode + RGB conversion), 422 above, "
                        "checked before decoding (default: %(default)s)")
    g.add_argument("--max-connections", type=int, default=128,
                   help="open connections and tasks before uvicorn itself answers 503 (its limit_concurrency; default: %(default)s)")
    g.add_argument("--workers", type=int, default=2, help="inference threads (default: %(default)s)")
    b = parser.add_argument_group("micro-batching (off by default: measured gains on a 2-core CPU were within noise; docs/RUNTIME.md)")
    b.add_argument("--batching", action="store_true", help="run concurrent requests as one inference batch")
    b.add_argument("--max-batch", type=int, default=16, help="largest micro-batch (default: %(default)s)")
    b.add_argument("--batch-wait-ms", type=float, default=0.0, help="wait this long for more requests once one arrived (default: %(default)s)")
    t = parser.add_argument_group("HTTPS (phones open the camera only over HTTPS)")
    t.add_argument("--https", action="store_true",
                   help="serve HTTPS with a self-signed certificate for this machine's LAN addresses (made once, kept in "
                        "~/.config/kimchi-edge/https); prints the https://LAN-IP address and a QR code")
    t.add_argument("--ssl-cert", metavar="PEM", help="serve HTTPS with this certificate (and --ssl-key)")
    t.add_argument("--ssl-key", metavar="PEM", help="private key of --ssl-cert")
    a = parser.add_argument_group("access (for a LAN)")
    a.add_argument("--api-key", default=None,
                   help=f"require this key on /predict ('Authorization: Bearer KEY' or 'X-API-Key: KEY'), 401 otherwise; "
                        f"default: ${API_KEY_ENV} when set, else none")
    a.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow a browser page from ORIGIN (e.g. https://app.example:8443) to call the server; repeatable")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="uvicorn log level")


def _tls(args: argparse.Namespace):
    """(cert, key, made) for HTTPS, or (None, None, False): ``--https`` makes/reuses one, ``--ssl-cert/--ssl-key`` are used as given."""
    from pathlib import Path

    from .errors import UsageError

    if args.https and (args.ssl_cert or args.ssl_key):
        raise UsageError("--https makes its own certificate; give either --https or --ssl-cert/--ssl-key")
    if bool(args.ssl_cert) != bool(args.ssl_key):
        raise UsageError("--ssl-cert and --ssl-key go together (a certificate and its private key)")
    if args.ssl_cert:
        for flag, path in (("--ssl-cert", args.ssl_cert), ("--ssl-key", args.ssl_key)):
            if not Path(path).is_file():
                raise UsageError(f"{flag} {path}: no such file (or use --https for a self-signed one)")
        return Path(args.ssl_cert), Path(args.ssl_key), False
    if args.https:
        from .https import lan_certificate

        return lan_certificate()
    return None, None, False


def run(args: argparse.Namespace) -> int:
    """Load the bundle, bind the socket, print where it listens and serve until interrupted."""
    import socket

    from .cliutil import classifier_from_args
    from .errors import UsageError, require
    from .server import ServerConfig, create_app

    uvicorn = require("uvicorn", extra="serve", purpose="kimchi-edge serve")
    require("fastapi", extra="serve", purpose="kimchi-edge serve")
    positive = {"--max-body-mb": args.max_body_mb, "--max-pixels": args.max_pixels, "--timeout": args.timeout,
                "--body-timeout": args.body_timeout, "--max-pending": args.max_pending, "--workers": args.workers,
                "--max-batch": args.max_batch, "--max-inflight-body-mb": args.max_inflight_body_mb,
                "--max-decode-mb": args.max_decode_mb, "--max-connections": args.max_connections}
    for name, value in positive.items():
        if value <= 0:
            raise UsageError(f"{name} must be positive, got {value}")
    if args.max_inflight_body_mb < args.max_body_mb:
        raise UsageError(f"--max-inflight-body-mb ({args.max_inflight_body_mb:g}) must be at least --max-body-mb "
                         f"({args.max_body_mb:g}): otherwise no upload of that size could ever be admitted")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    config = ServerConfig(
        max_body_bytes=int(args.max_body_mb * 1024 * 1024), timeout_s=args.timeout, body_timeout_s=args.body_timeout,
        workers=args.workers, max_pending=args.max_pending, batching=args.batching, max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms, max_inflight_body_bytes=int(args.max_inflight_body_mb * 1024 * 1024),
        api_key=api_key, cors_origins=tuple(args.cors_origin),
    )
    clf = classifier_from_args(args, max_pixels=int(args.max_pixels * 1e6), max_decode_bytes=int(args.max_decode_mb * 1e6))
    cert, key, made = _tls(args)
    app = create_app(clf, config)
    try:
        sock = socket.create_server((args.host, args.port), family=socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; choose another --port") from None
    port = sock.getsockname()[1]
    info = clf.info
    host = f"[{args.host}]" if ":" in args.host else args.host
    scheme = "https" if cert else "http"
    print(f"kimchi-edge serve: {args.bundle} ({info['backend']}, {info['artifact']}, {len(clf.labels)} labels) "
          f"on {scheme}://{host}:{port}  (docs: {scheme}://{host}:{port}/docs)", flush=True)
    if args.https:
        from .https import print_phone_address

        print_phone_address(port, cert, made, path="/docs")
    for note in clf.notes:
        print(f"  note: {note}", file=sys.stderr, flush=True)
    if not api_key and not _is_loopback(args.host):
        print(f"  warning: serving on {args.host} without an API key: anyone on the network can use /predict; "
              f"set --api-key or ${API_KEY_ENV}", file=sys.stderr, flush=True)
    tls = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)} if cert else {}
    server = _draining_server(uvicorn, app)(uvicorn.Config(
        app, log_level=args.log_level, timeout_keep_alive=5, access_log=args.log_level == "debug",
        limit_concurrency=args.max_connections, timeout_graceful_shutdown=args.timeout + args.body_timeout, **tls))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        clf.close()
    return 0


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _draining_server(uvicorn, app):
    """``uvicorn.Server`` that marks the app as draining (``/health/ready`` 503, new ``/predict`` 503) on SIGINT/SIGTERM.

    uvicorn then stops accepting connections and lets the requests in flight finish (up to
    ``timeout_graceful_shutdown``) before it runs the app's shutdown.
    """

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.server.draining = True
            super().handle_exit(sig, frame)

    return DrainingServer
