"""Serve a bundle over HTTP: ``POST /predict`` (raw image body or multipart file), ``GET /health``,
``GET /metadata``; OpenAPI docs at ``/docs``.  Needs the ``serve`` extra (FastAPI, uvicorn).

Example::

    kimchi-edge serve runs/food10/bundle --port 8000
    curl -F file=@kimchi.jpg http://127.0.0.1:8000/predict
"""

from __future__ import annotations

import argparse
import sys


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
    g.add_argument("--max-pending", type=int, default=64, help="requests in flight before 503 (default: %(default)s)")
    g.add_argument("--workers", type=int, default=2, help="inference threads (default: %(default)s)")
    b = parser.add_argument_group("micro-batching (off by default: measured gains on a 2-core CPU were within noise; docs/RUNTIME.md)")
    b.add_argument("--batching", action="store_true", help="run concurrent requests as one inference batch")
    b.add_argument("--max-batch", type=int, default=16, help="largest micro-batch (default: %(default)s)")
    b.add_argument("--batch-wait-ms", type=float, default=0.0, help="wait this long for more requests once one arrived (default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="uvicorn log level")


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
                "--max-batch": args.max_batch}
    for name, value in positive.items():
        if value <= 0:
            raise UsageError(f"{name} must be positive, got {value}")
    clf = classifier_from_args(args, max_pixels=int(args.max_pixels * 1e6))
    config = ServerConfig(
        max_body_bytes=int(args.max_body_mb * 1024 * 1024), timeout_s=args.timeout, body_timeout_s=args.body_timeout,
        workers=args.workers, max_pending=args.max_pending, batching=args.batching, max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
    )
    app = create_app(clf, config)
    try:
        sock = socket.create_server((args.host, args.port), family=socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; choose another --port") from None
    port = sock.getsockname()[1]
    info = clf.info
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"kimchi-edge serve: {args.bundle} ({info['backend']}, {info['artifact']}, {len(clf.labels)} labels) "
          f"on http://{host}:{port}  (docs: http://{host}:{port}/docs)", flush=True)
    for note in clf.notes:
        print(f"  note: {note}", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_keep_alive=5, access_log=args.log_level == "debug"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        clf.close()
    return 0
