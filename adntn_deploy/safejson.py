"""JSON from untrusted files with a bound on nesting depth, refused with a one-line error.

Why: TVM's JSON reader (tuning databases, the IR inside them, the native runner's manifest) recurses once
per nesting level, so 100,000 ``[`` overflow its stack and kill the process; Python's json raises
RecursionError deep inside instead. The depth is therefore measured before parsing, without recursion
and at C speed (bytes methods and a numpy running sum), and anything deeper than ``max_depth`` never
reaches a parser.
"""

from __future__ import annotations

import json
from typing import Any

from adntn_deploy.errors import AdntnError

#: deep enough for every file we write (tuning records nest 7 levels, manifests 4), far below any stack limit
DEFAULT_MAX_DEPTH = 64

_OPEN = (0x5B, 0x7B)  # [ {
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_CHUNK = 1 << 20  # brackets per numpy step: bounds the temporary arrays to a few MiB whatever the input


class JsonLimitError(AdntnError):
    """A JSON text is invalid or nested deeper than the reader accepts."""


def _prefix_depth(brackets: bytes) -> int:
    """The deepest nesting a recursive parser reaches on ``brackets`` (only ``[]{}``): max running sum.

    Mismatched or unbalanced brackets count as written (an unclosed ``[`` still makes a parser recurse).
    """
    import numpy as np

    view = np.frombuffer(brackets, np.uint8)
    depth = peak = 0
    for start in range(0, view.size, _CHUNK):
        chunk = view[start:start + _CHUNK]
        steps = np.where((chunk == _OPEN[0]) | (chunk == _OPEN[1]), 1, -1).astype(np.int64)
        running = np.cumsum(steps) + depth
        peak = max(peak, int(running.max()))
        depth = int(running[-1])
    return peak


def _split_strings(data: bytes) -> list[bytes]:
    """``data`` cut at its string quotes: even items lie outside strings, odd items are string contents.

    Escapes live only inside strings; without them quotes pair up simply. Backslash pairs go first
    (leftmost, non-overlapping: how a run of backslashes reads), then the escaped quotes.
    """
    return data.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')


def nesting_depth(text: str | bytes, strings: bool = False) -> int:
    """How deep arrays and objects nest in ``text`` (``[1, [2]]`` is 2), counting brackets outside strings.

    With ``strings=True`` the result is the larger of that and the nesting of brackets inside any single
    string: for texts whose strings hold JSON again that some other reader parses (TVM's tuning records).
    Invalid JSON gets a number too (what a recursive parser would reach before failing). O(len(text)).
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if not any(b in data for b in (b"[", b"{")):
        return 0
    parts = _split_strings(data)
    depth = _prefix_depth(b"".join(parts[::2]).translate(None, _NOT_BRACKET))
    # a string can only nest deeper than ``depth`` if it holds more brackets than that: counting them all
    # at once first keeps the common case (no brackets in strings) free of a Python loop over strings
    if strings and len(b"".join(parts[1::2]).translate(None, _NOT_BRACKET)) > depth:
        for content in parts[1::2]:
            brackets = content.translate(None, _NOT_BRACKET)
            if len(brackets) > depth:
                depth = max(depth, _prefix_depth(brackets))
    return depth


def check_depth(text: str | bytes, max_depth: int = DEFAULT_MAX_DEPTH, what: str = "JSON text",
                strings: bool = False) -> None:
    """Refuse ``text`` when :func:`nesting_depth` (with ``strings``) exceeds ``max_depth``.

    Raises:
        JsonLimitError: too deep; the message names ``what`` and the limit.
    """
    if nesting_depth(text, strings) > max_depth:
        raise JsonLimitError(f"{what} nests arrays/objects deeper than {max_depth} levels, the most this reader accepts")


def loads_bounded(text: str | bytes, max_depth: int = DEFAULT_MAX_DEPTH, what: str = "JSON text") -> Any:
    """``json.loads(text)`` refusing texts nested deeper than ``max_depth`` levels (arrays and objects).

    ``what`` names the source in the message (a file path, "request body"...). NaN and Infinity, which
    Python's json accepts, are accepted here too: callers that need strict JSON check values themselves.

    Raises:
        JsonLimitError: ``text`` is nested deeper than ``max_depth``, is not valid JSON, or is not UTF-8.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonLimitError(f"{what} is not UTF-8 text (byte {exc.start}); it must be JSON") from None
    check_depth(text, max_depth, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JsonLimitError(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:  # an integer over Python's 4,300-digit conversion limit
        raise JsonLimitError(f"{what} holds a number Python refuses to convert ({str(exc).split(';')[0]}); it must be plain JSON") from None
    except RecursionError:  # cannot happen below the depth check; kept so that no traceback ever escapes
        raise JsonLimitError(f"{what} nests arrays/objects deeper than {max_depth} levels, the most this reader accepts") from None


def loads_object(text: str | bytes, max_depth: int = DEFAULT_MAX_DEPTH, what: str = "JSON") -> dict:
    """:func:`loads_bounded` for a document that must be a JSON object.

    Raises:
        JsonLimitError: as :func:`loads_bounded`, or the document is not an object.
    """
    value = loads_bounded(text, max_depth=max_depth, what=what)
    if not isinstance(value, dict):
        raise JsonLimitError(f"{what} is not a JSON object")
    return value
