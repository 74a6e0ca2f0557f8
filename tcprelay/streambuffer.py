"""A muxado stream's receive buffer: the bytes received and not yet read.

No locks and no I/O: the stream holds its lock around every call.
Positions count the stream's bytes from its start. A read copies from
``read_pos`` and then commits by one store to ``read_pos``: an exception
(a signal handler's, in the main thread) can land anywhere in a read and
leave the buffer whole. Chunks already read are dropped lazily, by the
next copy.
"""

import collections


class ReceiveBuffer(object):
    """Received bytes, as (end position, bytes) chunks in order.

    ``read_pos``: all before it has been read. ``end``: the end of the last
    chunk. ``end - read_pos`` bytes wait to be read.
    """

    __slots__ = ("chunks", "read_pos", "end")

    def __init__(self):
        self.chunks = collections.deque()
        self.read_pos = 0
        self.end = 0

    def append(self, data):
        """Buffer ``data`` (bytes, never empty) after what is there."""
        self.end += len(data)
        self.chunks.append((self.end, data))

    def drop(self):
        """Forget what is unread: it counts as read (shutdown, close, a reset)."""
        self.chunks.clear()
        self.read_pos = self.end

    def copy_out(self, start, bufsize, whole):
        """Up to ``bufsize`` bytes from position ``start`` (some must be there).

        ``whole``: only all ``bufsize`` bytes, or all there are, will do
        (MSG_WAITALL, MSG_PEEK); else a first chunk that fits is returned as
        it is, without a copy. Changes no position.
        """
        chunks = self.chunks
        while chunks and chunks[0][0] <= start:
            chunks.popleft()          # read before: only dropping is left
        end, chunk = chunks[0]
        offset = start - (end - len(chunk))
        if offset == 0 and (len(chunk) == bufsize or len(chunk) < bufsize and (
                len(chunks) == 1 or not whole)):
            return chunk if type(chunk) is bytes else bytes(chunk)
        data = bytearray()
        for end, chunk in chunks:
            if offset:
                data += memoryview(chunk)[offset:offset + bufsize - len(data)]
                offset = 0
            else:
                data += memoryview(chunk)[:bufsize - len(data)]
            if len(data) >= bufsize:
                break
        return bytes(data)

    def copy_into(self, view, start, nbytes):
        """Copy up to ``nbytes`` from position ``start`` into ``view``; the count.

        Changes no position.
        """
        chunks = self.chunks
        while chunks and chunks[0][0] <= start:
            chunks.popleft()
        n = 0
        for end, chunk in chunks:
            offset = start + n - (end - len(chunk))
            take = min(len(chunk) - offset, nbytes - n)
            view[n:n + take] = memoryview(chunk)[offset:offset + take]
            n += take
            if n >= nbytes:
                break
        return n

    def holds_from(self, start):
        """Whether the bytes from position ``start`` on are still buffered."""
        if not self.chunks:
            return False
        first_end, first = self.chunks[0]
        return first_end - len(first) <= start

    def take_unread(self):
        """Yield (end position, bytes) of each unread chunk, each read as it goes."""
        chunks = self.chunks
        while chunks:
            end, chunk = chunks.popleft()
            if end <= self.read_pos:
                continue
            offset = self.read_pos - (end - len(chunk))
            if offset:
                chunk = memoryview(chunk)[offset:]
            self.read_pos = end
            yield end, chunk
