"""JSON encoding and decoding in bounded pieces, byte-identical to `json.dumps`/`json.loads`.

`json.dumps` and `json.loads` run in C and hold the GIL for their whole call: moving them to
a worker thread does not help the event loop, which waits for the GIL just the same (a
2-million-int list holds it ~0.25 s each way). Here a large list or dict is encoded a
thousand items at a time, and a large document decoded ~64 KB at a time, so the interpreter
can hand the GIL to the loop between pieces. The text is exactly what one `json.dumps` call
would give, so content hashes do not depend on which path wrote a value.
"""

from __future__ import annotations

import json
import json.encoder
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

from flowcore.materializers._estimate import SMALL_BYTES, roughly_small

__all__ = ["dumps_pieces", "dumps_text", "loads_text"]

_ITEMS = 1_000  # items per encoded piece of a large list or dict
_FAILED_CUTS = 8  # cut points tried in a row before the rest is decoded in one call

# The container document of BuiltInContainerMaterializer: {"kind": ..., "value": <container>}.
_ENVELOPE = re.compile(r'\{"kind": "(?:list|dict|tuple|set|frozenset)", "value": ')


# One encoder per set of options: `json.dumps` with any non-default keyword builds a new
# JSONEncoder on every call (a microsecond of a small value's two). Encoding is reentrant:
# an encoder keeps no state between calls.
_ENCODERS: dict[tuple[bool, bool, tuple[str, str]], Callable[[Any], str]] = {}


def _encoder(ensure_ascii: bool, sort_keys: bool,
             separators: tuple[str, str]) -> Callable[[Any], str]:
    key = (ensure_ascii, sort_keys, separators)
    found = _ENCODERS.get(key)
    if found is None:
        found = _ENCODERS[key] = json.JSONEncoder(
            ensure_ascii=ensure_ascii, sort_keys=sort_keys, separators=separators).encode
    return found


def dumps_text(
    value: Any,
    *,
    ensure_ascii: bool = True,
    sort_keys: bool = False,
    separators: tuple[str, str] = (", ", ": "),
) -> str:
    """`json.dumps(value, ...)` with these options, in one piece (for a value known small);
    the scalars most outputs are written directly, as json's C encoder writes them."""
    kind = type(value)
    if kind is int:
        return int.__repr__(value)
    if kind is str:
        return _escape_ascii(value) if ensure_ascii else _escape(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    return _encoder(ensure_ascii, sort_keys, separators)(value)


_escape_ascii = json.encoder.encode_basestring_ascii
_escape = json.encoder.encode_basestring


def dumps_pieces(
    value: Any,
    *,
    ensure_ascii: bool = True,
    sort_keys: bool = False,
    separators: tuple[str, str] = (", ", ": "),
) -> Iterator[str]:
    """Yield pieces whose concatenation is `json.dumps(value, ...)` with these options.

    Small values come as one piece; a large list, tuple or dict as bounded pieces (nested
    large containers are split too).
    """
    yield from _pieces(value, _encoder(ensure_ascii, sort_keys, separators), separators,
                       sort_keys)


def _pieces(value: Any, dumps: Callable[[Any], str], separators: tuple[str, str],
            sort_keys: bool) -> Iterator[str]:
    kind = type(value)
    if (kind is list or kind is tuple or kind is dict) and roughly_small(value):
        yield dumps(value)
    elif kind is list or kind is tuple:
        yield "["
        yield from _list_body(value, dumps, separators, sort_keys)
        yield "]"
    elif kind is dict:
        items = list(value.items())
        if sort_keys:  # the order json.dumps(sort_keys=True) gives (keys are unique)
            items.sort(key=lambda kv: kv[0])
        yield "{"
        yield from _dict_body(items, dumps, separators, sort_keys)
        yield "}"
    else:
        yield dumps(value)


def _spans(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _list_body(items: Any, dumps: Callable[[Any], str], separators: tuple[str, str],
               sort_keys: bool) -> Iterator[str]:
    """The items of a JSON array, in pieces: runs of items that are small together in one
    `dumps` call, a run that is not split ten ways, a single large item encoded in pieces."""
    if len(items) == 1:
        yield from _pieces(items[0], dumps, separators, sort_keys)
        return
    step = _ITEMS if len(items) > _ITEMS else max(1, len(items) // 10)
    for start, end in _spans(len(items), step):
        if start:
            yield separators[0]
        run = list(items[start:end])
        if roughly_small(run):
            yield dumps(run)[1:-1]
        else:
            yield from _list_body(run, dumps, separators, sort_keys)


def _dict_body(items: list[tuple[Any, Any]], dumps: Callable[[Any], str],
               separators: tuple[str, str], sort_keys: bool) -> Iterator[str]:
    """The members of a JSON object, in pieces (as `_list_body` does for arrays)."""
    if len(items) == 1:
        key, item = items[0]
        # The key as json.dumps writes it (ints, floats, bools, None become strings).
        text = dumps({key: 0})
        yield text[1:text.rindex(separators[1])] + separators[1]
        yield from _pieces(item, dumps, separators, sort_keys)
        return
    step = _ITEMS if len(items) > _ITEMS else max(1, len(items) // 10)
    for start, end in _spans(len(items), step):
        if start:
            yield separators[0]
        part = dict(items[start:end])
        if roughly_small(part):
            yield dumps(part)[1:-1]
        else:
            yield from _dict_body(items[start:end], dumps, separators, sort_keys)


def loads_text(text: str) -> Any:
    """`json.loads(text)` for documents `dumps_pieces` wrote (with the default separators),
    decoding a large one ~64 KB at a time; any other document is decoded in one call."""
    if len(text) <= SMALL_BYTES:
        return json.loads(text)
    envelope = _ENVELOPE.match(text)
    if envelope is not None and text.endswith("}"):
        doc = json.loads(text[:envelope.end()] + "null}")
        doc["value"] = _loads_container(text, envelope.end(), len(text) - 1)
        return doc
    return _loads_container(text, 0, len(text))


def _loads_container(text: str, start: int, end: int) -> Any:
    """Decode `text[start:end]`, a JSON array or object, in pieces cut between its items."""
    opening, closing = text[start:start + 1], text[end - 1:end]
    if (opening, closing) not in (("[", "]"), ("{", "}")):
        return json.loads(text[start:end])
    result: Any = [] if opening == "[" else {}
    add = result.extend if opening == "[" else result.update
    pos, inner_end = start + 1, end - 1
    while pos < inner_end:
        cut = text.find(", ", pos + SMALL_BYTES, inner_end)
        failed = 0
        while True:
            if cut < 0 or failed >= _FAILED_CUTS:
                cut = inner_end
            # A piece that starts between two items parses only if it also ends between two
            # items: a cut inside a string leaves it unterminated, a cut inside a nested
            # container leaves a bracket open. So a failed parse just means "cut further".
            try:
                part = json.loads(opening + text[pos:cut] + closing)
            except json.JSONDecodeError:
                if cut == inner_end:
                    raise
                failed += 1
                cut = text.find(", ", cut + 2, inner_end)
                continue
            break
        add(part)
        pos = cut + 2
    return result
