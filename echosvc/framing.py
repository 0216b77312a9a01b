"""Line framing, sans-IO: bytes in, batches of complete lines out.

`LineFramer` is fed whatever a ``receive_some`` returned and hands back every
complete line that is now available as *one* ``bytes`` batch, ready for one
``send_all``. The unfinished line stays inside the framer until its ``\\n``
arrives, or until `LineFramer.flush` takes it at end of input.

Like h11's receive buffer, it never rescans what it has already searched:
each call looks only at the new chunk, so a line trickled one byte at a time
costs O(n) in total, not O(n²). It also owns the line limit, because only the
framer knows how long the current line has grown: a line longer than
``max_line_bytes`` (counting its ``\\n``) sets `LineFramer.too_long`, after the
complete lines before it have been returned, so memory per connection stays
bounded whatever the peer sends. That is a sticky error state, as h11's
``ERROR``: once the framer has refused a line it refuses everything after it
(`LineTooLong`), since the bytes that follow an oversize line have no line
boundary anyone agreed on. No I/O, no clock, no decoding: bytes are never
interpreted beyond looking for ``b"\\n"``.
"""

from __future__ import annotations

__all__ = ["LineFramer", "LineTooLong"]


class LineTooLong(ValueError):
    """The framer was fed (or flushed) after it refused an oversize line."""


class LineFramer:
    """Split a byte stream into lines, enforcing a maximum line length.

    Args:
      max_line_bytes: the longest acceptable line, counting its ``\\n``. A
          final line with no ``\\n`` (taken by `flush`) may be this long too.

    Attributes:
      too_long: set once a line exceeded the limit. The framer has then
          discarded the offending line, and `feed` and `flush` raise
          `LineTooLong` from then on.

    """

    __slots__ = ("_max", "_partial", "too_long")

    def __init__(self, max_line_bytes: int) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be at least 1")
        self._max = max_line_bytes
        self._partial = bytearray()
        self.too_long = False

    @property
    def pending(self) -> int:
        """How many bytes of the unfinished line are buffered."""
        return len(self._partial)

    def feed(self, data: bytes | bytearray) -> bytes | bytearray:
        """Add ``data``; return every line it completes, as one batch.

        Returns ``b""`` when no line was completed. If a line turns out too
        long, the complete lines before it are returned (possibly ``b""``) and
        `too_long` is set; no byte of the oversize line is ever returned.

        Raises:
          LineTooLong: if `too_long` was already set.

        """
        if self.too_long:
            raise LineTooLong("a line was too long: the framer accepts nothing after it")
        partial = self._partial
        end = data.rfind(b"\n") + 1  # data[:end] finishes lines; data[end:] starts one
        if not end:
            if len(partial) + len(data) > self._max:
                self._overflow()
            else:
                partial += data
            return b""

        if len(partial) + end > self._max:
            # Only a batch longer than the limit can hold a line that is, so
            # the per-line scan runs only for chunks bigger than max_line_bytes.
            good = self._end_of_good_lines(data, end)
            if good < end:
                batch = self._join(data, good) if good else b""
                self._overflow()
                return batch

        batch = self._join(data, end)
        tail = len(data) - end
        if tail > self._max:
            self._overflow()
        elif tail:
            partial += data[end:]
        return batch

    def flush(self) -> bytes:
        """Take the unfinished line, if any (at end of input or shutdown).

        Raises:
          LineTooLong: if `too_long` is set: the unfinished line is the
              oversize one, or comes after it.

        """
        if self.too_long:
            raise LineTooLong("a line was too long: there is no unfinished line to take")
        rest = bytes(self._partial)
        self._partial.clear()
        return rest

    def _join(self, data: bytes | bytearray, end: int) -> bytes | bytearray:
        """The buffered partial line, then ``data[:end]``; empties the buffer."""
        partial = self._partial
        if partial:
            batch = b"".join((partial, memoryview(data)[:end]))
            partial.clear()
            return batch
        return data if end == len(data) else data[:end]

    def _end_of_good_lines(self, data: bytes | bytearray, end: int) -> int:
        """Offset in ``data`` where the first over-long line starts, or ``end``."""
        start = 0
        carried = len(self._partial)
        while start < end:
            newline = data.index(b"\n", start, end)
            if carried + newline + 1 - start > self._max:
                return start
            start = newline + 1
            carried = 0
        return end

    def _overflow(self) -> None:
        self.too_long = True
        self._partial.clear()
