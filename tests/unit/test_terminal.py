"""Guest bytes on a terminal: control sequences shown, never obeyed; everything else unchanged;
pipes and files get the bytes as they are."""
import os

from vmiso.cli import terminal


def show(*chunks):
    s = terminal.Sanitizer()
    return b"".join(s.feed(c) for c in chunks) + s.close()


def test_plain_text_newlines_tabs_and_utf8_pass():
    assert show(b"hello\tworld\r\n", "ü€\n".encode()) == "hello\tworld\r\nü€\n".encode()


def test_escape_sequences_are_made_visible():
    assert show(b"\x1b]0;pwned\x07title") == b"^[]0;pwned^Gtitle"        # window title (OSC)
    assert show(b"\x1b]52;c;ZXZpbA==\x07") == b"^[]52;c;ZXZpbA==^G"      # clipboard write
    assert show(b"a\x08\x7fb\x00") == b"a^H^?b^@"
    assert show("\u009b31m".encode()) == b"\\u009b31m"                   # C1 CSI


def test_a_character_split_across_chunks_is_kept_whole():
    data = "ü\x1b".encode()
    assert show(data[:1], data[1:2], data[2:]) == "ü^[".encode()


def test_invalid_utf8_becomes_replacement_characters():
    assert show(b"a\xffb\x9b") == "a\ufffdb\ufffd".encode()


def test_filter_only_for_terminals(tmp_path):
    with open(tmp_path / "f", "wb") as f:
        assert terminal.filter_for(f).feed(b"\x1b[2J") == b"\x1b[2J"
    primary, secondary = os.openpty()
    with os.fdopen(secondary, "wb") as tty:
        assert terminal.filter_for(tty).feed(b"\x1b[2J") == b"^[[2J"
        assert terminal.filter_for(tty, raw=True).feed(b"\x1b[2J") == b"\x1b[2J"
    os.close(primary)
