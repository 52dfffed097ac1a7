"""TextStream: UTF-8 deltas from token pieces, and stop strings."""

from __future__ import annotations

from llamafleet.worker.textstream import TextStream


def feed(ts: TextStream, *pieces: bytes | str) -> list[str]:
    """Push each piece; return the deltas released."""
    return [ts.push(p.encode() if isinstance(p, str) else p) for p in pieces]


def test_plain_text_passes_through() -> None:
    ts = TextStream()
    assert feed(ts, "hel", "lo") == ["hel", "lo"]
    assert ts.finish() == "" and ts.text == "hello" and ts.stopped is None


def test_utf8_split_across_pieces() -> None:
    ts = TextStream()
    e_acute, snowman = "é".encode(), "☃".encode()
    assert feed(ts, b"a" + e_acute[:1], e_acute[1:], snowman[:1], snowman[1:2]) == \
        ["a", "é", "", ""]
    assert ts.push(snowman[2:] + b"!") == "☃!"
    assert ts.text == "aé☃!"


def test_incomplete_utf8_at_finish_is_replaced() -> None:
    ts = TextStream()
    assert ts.push(b"ok\xe2\x98") == "ok"
    assert ts.finish() == "\ufffd" and ts.text == "ok\ufffd"
    ts2 = TextStream()
    assert ts2.push(b"\xff") == "\ufffd"  # invalid bytes never stall the stream


def test_stop_string_within_one_piece() -> None:
    ts = TextStream(["END"])
    assert ts.push(b"abcENDdef") == "abc"
    assert ts.stopped == "END" and ts.text == "abc"


def test_stop_string_spanning_pieces() -> None:
    ts = TextStream(["END"])
    assert feed(ts, "abE", "N", "D", "more") == ["ab", "", "", ""]
    assert ts.stopped == "END" and ts.text == "ab"


def test_stop_string_spanning_a_split_character() -> None:
    ts = TextStream(["é!"])
    e_acute = "é".encode()
    assert feed(ts, b"x" + e_acute[:1], e_acute[1:], b"!") == ["x", "", ""]
    assert ts.stopped == "é!" and ts.text == "x"


def test_partial_match_is_held_then_released() -> None:
    ts = TextStream(["END"])
    assert ts.push(b"xEN") == "x"       # could be the start of END: held
    assert ts.push(b"Dy") == ""         # it was
    ts = TextStream(["END"])
    assert ts.push(b"xEN") == "x"
    assert ts.push(b"o") == "ENo"       # it was not: released with what follows
    ts = TextStream(["END"])
    assert ts.push(b"xEN") == "x"
    assert ts.finish() == "EN"          # the generation ended first: released at finish
    assert ts.text == "xEN" and ts.stopped is None


def test_overlapping_partial_matches() -> None:
    ts = TextStream(["aab"])
    assert ts.push(b"aa") == ""
    assert ts.push(b"ab") == "a"
    assert ts.stopped == "aab" and ts.text == "a"


def test_earliest_of_several_stop_strings_wins() -> None:
    ts = TextStream(["world", "lo"])   # "lo" starts first, though listed second
    assert ts.push(b"hello world") == "hel"
    assert ts.stopped == "lo"
    ts = TextStream(["c", "abc"])
    assert feed(ts, "xa", "b", "c") == ["x", "", ""]
    assert ts.stopped == "abc" and ts.text == "x"


def test_hold_back_is_the_longest_partial_match() -> None:
    ts = TextStream(["xy", "abcd"])
    assert ts.push(b"--abc") == "--"   # "abc" might become "abcd"
    assert ts.push(b"x") == "abc"      # it cannot now, but "x" might become "xy"
    assert ts.finish() == "x" and ts.text == "--abcx"


def test_nothing_after_a_stop() -> None:
    ts = TextStream(["\n"])
    assert ts.push(b"line one\nline two") == "line one"
    assert feed(ts, "more", "\n") == ["", ""]
    assert ts.finish() == ""
    assert ts.text == "line one" and ts.stopped == "\n"


def test_empty_stop_strings_are_ignored() -> None:
    ts = TextStream(["", "Z"])
    assert ts.push(b"abc") == "abc" and ts.stopped is None


def test_text_accumulates_every_delta() -> None:
    ts = TextStream(["STOP"])
    deltas = feed(ts, *("word " for _ in range(200)), "S", "T", "O", "P")
    assert ts.text == "".join(deltas) == "word " * 200
