"""Classify image files with a bundle and print the top labels (a table, or UTF-8 JSON with ``--json``).

Example::

    kimchi-edge predict runs/food10/bundle kimchi.jpg bibimbap.png --top-k 3
    kimchi-edge predict runs/food10/bundle photos/ --json > predictions.json

An IMAGE that is a folder stands for the image files directly inside it.  An image that cannot be read is
reported (on stderr, or as an ``error`` entry in JSON) and the others are still classified; the exit
status is then 1.
"""

from __future__ import annotations

import argparse
import sys
import unicodedata
from pathlib import Path
from typing import Any, Sequence

from .sysinfo import IMAGE_SUFFIXES  # file name endings treated as images when a folder is given


def add_args(parser: argparse.ArgumentParser) -> None:
    """Declare the ``predict`` options."""
    from .cliutil import add_model_args, add_output_args

    parser.add_argument("bundle", metavar="BUNDLE", help="bundle folder (with manifest.json)")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files, or folders of images")
    parser.add_argument("--top-k", type=int, default=3, metavar="K", help="labels per image (default: %(default)s)")
    add_model_args(parser)
    add_output_args(parser, json_help="every image's top labels, timings and the backend in use")


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes: East Asian wide/full-width characters (Hangul, CJK) count 2."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def pad(text: str, width: int, align: str = "<") -> str:
    """Pad ``text`` with spaces to ``width`` terminal columns (``align`` ``<`` or ``>``)."""
    fill = " " * max(0, width - display_width(text))
    return text + fill if align == "<" else fill + text


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str], align: str) -> str:
    """Rows of strings -> aligned text; ``align`` has one ``<``/``>`` per column."""
    widths = [max(display_width(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(pad(str(c), w, a) for c, w, a in zip(r, widths, align)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def expand_images(items: Sequence[str]) -> list[str]:
    """Files as given; folders replaced by the image files directly inside them (sorted)."""
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            out.extend(found or [item])  # an empty folder is reported as an unreadable input
        else:
            out.append(item)
    return out


def run(args: argparse.Namespace) -> int:
    """Classify each image; print a table or JSON; return 1 when any image could not be classified."""
    from .cliutil import classifier_from_args, emit
    from .errors import InvalidInputError, UsageError

    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    images = expand_images(args.images)
    results: list[dict[str, Any]] = []
    with classifier_from_args(args) as clf:
        info = clf.info
        for image in images:
            try:
                pred = clf.predict(Path(image), top_k=args.top_k)
            except InvalidInputError as exc:
                results.append({"image": image, "error": str(exc)})
                if not args.json:
                    print(f"kimchi-edge predict: {image}: {exc}", file=sys.stderr)
                continue
            results.append({"image": image, **pred.to_dict()})
    ok = [r for r in results if "error" not in r]
    doc = {
        "bundle": str(args.bundle),
        "backend": {k: info[k] for k in ("backend", "providers", "artifact", "precision") if k in info},
        "notes": info["notes"],
        "results": results,
    }
    rows = []
    for r in ok:
        for rank, t in enumerate(r["top"], 1):
            rows.append([r["image"] if rank == 1 else "", str(rank), t["label"], f"{t['probability'] * 100:.2f}%"])
    emit(args, doc, format_table(rows, ["image", "#", "label", "probability"], "<><>") if rows else "")
    if not args.json and not args.quiet:
        ms = sum(r["timings_ms"]["total"] for r in ok) / max(1, len(ok))
        providers = ",".join(info.get("providers", [])) or "-"
        print(f"{info['backend']} ({providers}), artifact {info['artifact']} ({info['precision']}): "
              f"{len(ok)}/{len(results)} images, {ms:.1f} ms/image", file=sys.stderr)
        for note in info["notes"]:
            print(f"note: {note}", file=sys.stderr)
    return 0 if len(ok) == len(results) else 1
