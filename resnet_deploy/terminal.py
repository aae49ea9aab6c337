"""Strings that came from a file, made safe to print on a terminal.

Class names and other manifest fields, file names and messages quoting them are data someone else
wrote. Printed raw, an ESC sequence in one clears the screen, sets the window title or recolours
what follows, a carriage return or newline forges a line ("FAKE: accuracy 100%"), a bidi override
reverses what is shown, and a file name with undecodable bytes stops ``print`` with
``UnicodeEncodeError``. ``safe`` shows each such character as a visible escape instead:

    >>> safe("cat\\x1b[2J\\nFAKE: accuracy 100%")
    'cat\\\\x1b[2J\\\\nFAKE: accuracy 100%'

Only control and invisible format characters are touched (C0, DEL, C1, zero-width characters, the
Unicode line/paragraph separators, bidi embeddings, overrides and isolates, and the byte escapes Python
uses for undecodable names), so an ordinary name comes back unchanged and ``safe(safe(s)) == safe(s)``. JSON output needs none of this:
``json.dumps`` escapes control characters (and everything outside ASCII) itself, and keeps the exact text.

Use it wherever text from a file reaches a terminal: ``safe(name)`` for one value, ``safe_lines(text)``
for a message of several lines (the newlines we put there stay; every other control character is escaped).
"""

from __future__ import annotations

import os
import re

# C0 controls (tab, CR, LF, ESC...), DEL and C1 controls (0x9b is a one-byte CSI on some terminals), the
# soft hyphen, zero-width characters and joiners, line/paragraph separators, bidi embeddings/overrides/
# isolates and marks, invisible operators, the byte-order mark, and lone surrogates (``os.fsdecode``'s
# escapes of bytes that are not UTF-8).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\xad\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"
                     "\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match) -> str:
    ch = m.group()
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte os.fsdecode could not decode: show the byte itself
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def safe(text: object) -> str:
    """``str(text)`` with every control character shown as an escape (``\\x1b``, ``\\n``, ``\\u202e``)."""
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    return _UNSAFE.sub(_escape, str(text))


def safe_lines(text: object) -> str:
    """``safe`` applied to each line of ``text``; the line breaks themselves are kept."""
    return "\n".join(safe(line) for line in str(text).split("\n"))


__all__ = ["safe", "safe_lines"]
