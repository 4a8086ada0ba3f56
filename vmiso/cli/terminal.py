"""Guest bytes on an operator's terminal: passed through unchanged to a pipe or a file, made
harmless on a TTY.

A task (hostile by assumption) can write escape sequences that a terminal obeys: retitle the
window, rewrite what was printed before, write to the clipboard (OSC 52), answer back as typed
input on some terminals. On a TTY, ``vmiso run`` and ``vmiso logs`` therefore show every control
character except newline, tab and carriage return in caret notation (ESC as ``^[``, as
``cat -v`` does) and the C1 controls (U+0080-U+009F) as ``\\u009b``; bytes that are not UTF-8
become U+FFFD. ``--raw`` passes the bytes unchanged, as they are to a pipe or a file.
"""
import codecs
import os
import re

# C0 controls but \t \n \r, DEL, and the C1 controls (a terminal acts on U+009B as on ESC [).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x80-\x9f]")


def _visible(match):
    char = match.group()
    code = ord(char)
    if code < 0x20:
        return "^" + chr(code + 0x40)
    if code == 0x7F:
        return "^?"
    return f"\\u{code:04x}"


class Sanitizer:
    """Turns one stream's chunks into text safe for a terminal; a UTF-8 character split across
    chunks is kept until its last byte arrives."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data):
        return _CONTROL.sub(_visible, self._decoder.decode(data)).encode("utf-8")

    def close(self):
        return _CONTROL.sub(_visible, self._decoder.decode(b"", final=True)).encode("utf-8")


class _Passthrough:
    @staticmethod
    def feed(data):
        return data

    @staticmethod
    def close():
        return b""


def filter_for(stream, raw=False):
    """What to pass ``stream``'s bytes through: a Sanitizer when it is a terminal (and not
    ``raw``), else nothing changes them."""
    try:
        tty = os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):
        tty = False
    return Sanitizer() if tty and not raw else _Passthrough()


def add_raw_flag(parser):
    parser.add_argument("--raw", action="store_true",
                        help="write the guest's bytes to a terminal unchanged (by default its control "
                             "characters are shown as ^[ and the like; pipes and files always get raw bytes)")
