"""The sans-IO line framer: pure, so tested exhaustively with hypothesis."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from echosvc.framing import LineFramer, LineTooLong

NO_NEWLINE = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))


def feed_all(framer: LineFramer, chunks: list[bytes]) -> list[bytes]:
    batches = []
    for chunk in chunks:
        batches.append(bytes(framer.feed(chunk)))
        if framer.too_long:
            break
    return batches


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def test_complete_lines_of_one_chunk_come_back_as_one_batch() -> None:
    framer = LineFramer(100)
    assert framer.feed(b"one\ntwo\nthr") == b"one\ntwo\n"
    assert framer.pending == 3
    assert framer.feed(b"ee\n") == b"three\n"
    assert framer.pending == 0


def test_a_chunk_without_newline_returns_nothing_and_waits() -> None:
    framer = LineFramer(100)
    assert framer.feed(b"abc") == b""
    assert framer.feed(b"def") == b""
    assert framer.flush() == b"abcdef"
    assert framer.flush() == b""


def test_bytes_are_never_interpreted() -> None:
    framer = LineFramer(100)
    data = b"\x00\xff\xfe\r\n\xc3\x28\n"
    assert framer.feed(data) == data


def test_a_line_of_exactly_the_limit_passes_and_one_more_byte_does_not() -> None:
    framer = LineFramer(4)
    assert framer.feed(b"abc\n") == b"abc\n"
    assert framer.feed(b"abcd\n") == b""
    assert framer.too_long


def test_lines_before_the_oversize_one_are_returned_and_none_of_it() -> None:
    framer = LineFramer(4)
    assert framer.feed(b"ok\nfine\ntoolong\nlater\n") == b"ok\n"
    assert framer.too_long
    assert framer.pending == 0


@pytest.mark.parametrize("after", [b"ok\n", b"x", b"\n", b""])
def test_once_a_line_was_refused_the_framer_refuses_everything_after_it(after: bytes) -> None:
    """Sticky, as h11's ERROR: bytes after an oversize line have no agreed
    line boundary, so they must never come back out as lines."""
    framer = LineFramer(4)
    assert framer.feed(b"toolong\n") == b""
    assert framer.too_long
    with pytest.raises(LineTooLong):
        framer.feed(after)
    with pytest.raises(LineTooLong):
        framer.flush()
    assert framer.too_long


def test_an_unterminated_line_over_the_limit_is_refused_before_its_newline() -> None:
    framer = LineFramer(4)
    assert framer.feed(b"abcd") == b""  # may still end at EOF: within the limit
    assert not framer.too_long
    assert framer.feed(b"e") == b""
    assert framer.too_long


def test_a_trickled_line_counts_its_earlier_bytes_against_the_limit() -> None:
    framer = LineFramer(4)
    for byte in b"abc":
        assert framer.feed(bytes([byte])) == b""
    assert framer.feed(b"d\nxy\n") == b""
    assert framer.too_long


def test_a_tail_over_the_limit_after_good_lines_returns_the_good_lines() -> None:
    framer = LineFramer(4)
    assert framer.feed(b"ab\nabcdefgh") == b"ab\n"
    assert framer.too_long


def test_a_batch_that_ends_on_a_newline_is_not_copied() -> None:
    framer = LineFramer(100)
    data = b"a\nb\n"
    assert framer.feed(data) is data


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_line_bytes"):
        LineFramer(0)


@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_any_bytes_cut_anywhere_come_out_identical(data: bytes, cuts: list[int]) -> None:
    framer = LineFramer(len(data) + 1)  # large enough that nothing is too long
    batches = feed_all(framer, chunked(data, cuts))
    assert not framer.too_long
    assert b"".join(batches) + framer.flush() == data
    for batch in batches:
        assert batch == b"" or batch.endswith(b"\n")


@given(
    lines=st.lists(
        st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"") + b"\n"), max_size=30
    ),
    tail=st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    limit=st.integers(min_value=1, max_value=45),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_the_limit_matches_a_line_by_line_model(
    lines: list[bytes], tail: bytes, limit: int, cuts: list[int]
) -> None:
    data = b"".join(lines) + tail
    framer = LineFramer(limit)
    echoed = b"".join(feed_all(framer, chunked(data, cuts)))

    # The model: lines pass in order until the first one over the limit.
    expected = b""
    overflow = False
    for line in lines:
        if len(line) > limit:
            overflow = True
            break
        expected += line
    if not overflow and len(tail) > limit:
        overflow = True

    assert framer.too_long == overflow
    assert echoed == expected
    if not overflow:
        assert framer.flush() == tail
