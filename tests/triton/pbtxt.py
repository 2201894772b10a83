"""A small protobuf text-format reader for ``config.pbtxt``, written apart from the exporter's writer.

Every field maps to a *list* of its values (text format repeats a field by writing it again or with ``[ ... ]``);
messages are dicts, enum values :class:`Word`, strings ``str``, numbers ``int``/``float``.  Enough of the format
for Triton model configs; anything else raises ``ValueError`` with the position.
"""

from __future__ import annotations

import re
from typing import Any

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|(-?\d+\.\d*(?:[eE][-+]?\d+)?|-?\d+)|([A-Za-z_][A-Za-z0-9_]*)|([{}\[\]:,;<>]))')


class Word(str):
    """A bare identifier value: an enum (``TYPE_UINT8``) or ``true``/``false``."""


def _tokens(text: str) -> list[tuple[str, Any, int]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"unexpected text at {pos}: {text[pos:pos + 20]!r}")
        pos = m.end()
        comment, string, number, word, punct = m.groups()
        if comment:
            continue
        if string is not None:
            out.append(("str", bytes(string[1:-1], "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8"), m.start(2)))
        elif number is not None:
            out.append(("num", float(number) if "." in number else int(number), m.start(3)))
        elif word is not None:
            out.append(("word", Word(word), m.start(4)))
        else:
            out.append(("p", punct, m.start(5)))
    return out


def parse(text: str) -> dict[str, list[Any]]:
    """``config.pbtxt`` text -> ``{field: [values]}`` (nested messages the same)."""
    toks = _tokens(text)
    msg, i = _message(toks, 0, None)
    if i != len(toks):
        raise ValueError(f"trailing tokens from position {toks[i][2]}")
    return msg


def _message(toks: list, i: int, close: str | None) -> tuple[dict[str, list[Any]], int]:
    msg: dict[str, list[Any]] = {}
    while i < len(toks):
        kind, value, pos = toks[i]
        if kind == "p" and value == close:
            return msg, i + 1
        if kind != "word":
            raise ValueError(f"expected a field name at {pos}, got {value!r}")
        name, i = str(value), i + 1
        if i < len(toks) and toks[i][:2] == ("p", ":"):
            i += 1
        values, i = _value(toks, i)
        msg.setdefault(name, []).extend(values)
        if i < len(toks) and toks[i][0] == "p" and toks[i][1] in ",;":
            i += 1
    if close is not None:
        raise ValueError(f"missing {close!r} at the end")
    return msg, i


def _value(toks: list, i: int) -> tuple[list[Any], int]:
    kind, value, pos = toks[i]
    if kind == "p" and value in "{<":
        sub, i = _message(toks, i + 1, "}" if value == "{" else ">")
        return [sub], i
    if kind == "p" and value == "[":
        items, i = [], i + 1
        while toks[i][:2] != ("p", "]"):
            got, i = _value(toks, i)
            items += got
            if toks[i][:2] == ("p", ","):
                i += 1
        return items, i + 1
    if kind in ("str", "num", "word"):
        return [value], i + 1
    raise ValueError(f"expected a value at {pos}, got {value!r}")


def one(msg: dict[str, list[Any]], name: str, default: Any = None) -> Any:
    """The single value of a non-repeated field (``default`` when absent)."""
    values = msg.get(name, [])
    if len(values) > 1:
        raise ValueError(f"field {name!r} appears {len(values)} times; expected once")
    return values[0] if values else default
