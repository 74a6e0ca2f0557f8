"""A fuzzer for tcprelay, standard library only (issue 7).

Imported by ``tests/test_fuzz.py`` (a fixed seed in CI) and by
``scripts/fuzz.py`` (any seed, any number of cases). Everything here is
deterministic per seed: case ``n`` of kind ``k`` is built from
``random.Random(hash(seed, k, n))`` alone, so one case can be replayed
without the others.

Two kinds of case:

- **session**: a byte stream for a Python muxado *server* session, built from
  the recorded Go traffic in ``tests/data/muxado-vectors.json`` by mutation
  (bit flips, byte changes, truncation, splicing frames from different
  vectors, duplicated and reordered frames, corrupted header fields, huge
  lengths, unknown types, zero and huge WNDINC, GOAWAY with long debug text,
  floods) or made up from random frames and bytes. The runner writes it from
  a raw socket over loopback TCP and checks the outcome against a small
  model of the wire rules (``analyse``): a stream with a fault must end the
  session by itself with the code the rules name; a stream without one must
  leave the session working, which the runner proves with a fresh stream
  (accepted, echoed, closed); everything the session writes back must be
  well-formed, and a GOAWAY, if any, must be the last frame and carry the
  session's code.
- **relay**: one live ``Relay`` per run, with a healthy service registered
  through ``tcprelay.service.connect`` whose public port carries checksummed
  echo traffic for the whole run. Cases send random bytes, mutated frame
  streams, a valid SYN followed by garbage, or run a real muxado client whose
  registration stream carries mutated JSON (and mutated answers to the
  relay's challenge). A small oracle written from docs/PROTOCOL.md says which
  answer each request must get; an ``ok`` is proven by a client on the
  granted port.

Further kinds (``EXTRA_KINDS``, ``scripts/fuzz.py --kind NAME``), each
described where it is defined: **proxy** (PROXY headers through
proxyproto.read_header), **client** (service.connect against a hostile fake
relay), **public** (hostile clients of a registered service's public port),
**adapter** (the same through tcprelay.adapter to a local service) and **tls**
(the relay fuzz over TLS, and TLS garbage before and after the handshake).

Memory stays flat however many cases run: run_pool hands each outcome to the
Report as it ends, which keeps counts and failures only.

Never allowed: an uncaught exception in any thread (``threading.excepthook``
on 3.8+), an ERROR log record from a ``tcprelay`` logger, a hang (every wait
is bounded; a watchdog names a case that runs too long), a leaked thread or
socket, or a single byte lost or changed on the healthy service.
"""

import binascii
import collections
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import random
import re
import socket
import ssl
import struct
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if HERE not in sys.path:   # tests/helpers, when run from scripts/fuzz.py
    sys.path.insert(0, HERE)

from helpers.relay import abort, recv_exact  # noqa: E402
from tcprelay import limits, muxado, proxyproto, registration, tls  # noqa: E402
from tcprelay import service as relay_service  # noqa: E402
from tcprelay.muxado import ErrorCode  # noqa: E402
from tcprelay.relay import PENDING_READ_BUDGET, Relay  # noqa: E402

TIMEOUT = 10.0           # the bound on any single blocking call
CASE_LIMIT = 60.0        # a case running longer than this is a hang
QUIET = 0.3              # a bounded wait that must time out ("nothing more comes")
LOOPBACK = "127.0.0.1"
DEFAULT_SEED = 7000
VECTORS_PATH = os.path.join(HERE, "data", "muxado-vectors.json")
TLS_CA = os.path.join(HERE, "data", "test-ca.pem")
TLS_CERT = os.path.join(HERE, "data", "test-server.pem")
TLS_KEY = os.path.join(HERE, "data", "test-server.key")

# -- the wire, written out here so the oracle does not lean on tcprelay.frames ----------

RST, DATA, WNDINC, GOAWAY = 0, 1, 2, 3
FIN, SYN = 0x1, 0x2
MAX_ID = 0x7FFFFFFF
RESERVED = 0x80000000
WINDOW = 256 * 1024
HEADER = struct.Struct(">II")
U32 = struct.Struct(">I")
MAX_QUEUED_REPLIES = 10000     # muxado's bound on replies the reader may owe
DEFAULT_BURST = 10000          # muxado's default flood burst

# RST codes a server session may send on its own (or for the runner's reset()).
SESSION_RST_CODES = (ErrorCode.FLOW_CONTROL_ERROR, ErrorCode.STREAM_CLOSED,
                     ErrorCode.STREAM_REFUSED, ErrorCode.ACCEPT_QUEUE_FULL,
                     ErrorCode.STREAM_RESET, ErrorCode.STREAM_CANCELLED)

Frame = collections.namedtuple("Frame", "type flags sid length body")


def frame(ftype, flags, sid, body=b"", length=None):
    """Any frame, valid or not: ``length`` may disagree with the body."""
    if length is None:
        length = len(body)
    return HEADER.pack((length & 0xFFFFFF) << 8 | (ftype & 15) << 4 | (flags & 15),
                       sid & 0xFFFFFFFF) + bytes(body)


def data_frame(sid, payload=b"", flags=0):
    return frame(DATA, flags, sid, payload)


def parse_frames(data):
    """Whole frames in ``data`` (cut on the length field alone) and the bytes left over."""
    out = []
    pos = 0
    end = len(data)
    while end - pos >= 8:
        word, sid = HEADER.unpack_from(data, pos)
        length = word >> 8
        if end - pos - 8 < length:
            break
        out.append(Frame((word >> 4) & 15, word & 15, sid, length,
                         bytes(data[pos + 8:pos + 8 + length])))
        pos += 8 + length
    return out, bytes(data[pos:])


def split_raw(data):
    """Raw frame byte strings, for mutation; a cut-off last frame stays as it is."""
    frames, rest = parse_frames(data)
    out = [frame(f.type, f.flags, f.sid, f.body) for f in frames]
    if rest:
        out.append(rest)
    return out


def code_name(code):
    return code.name if isinstance(code, ErrorCode) else str(code)


def rand_bytes(rng, n):
    return rng.getrandbits(8 * n).to_bytes(n, "big") if n > 0 else b""


def case_rng(seed, kind, number):
    digest = hashlib.sha256(("tcprelay-fuzz/%d/%s/%d" % (seed, kind, number)).encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def hexdump(data, limit=256):
    data = bytes(data)
    text = binascii.hexlify(data[:limit]).decode("ascii")
    if len(data) > limit:
        text += "... (%d bytes in all)" % len(data)
    return text or "(empty)"


# -- the model: what a server session must do with a byte stream --------------------------

class Analysis(object):
    """What the wire rules say about a client's byte stream to a server session.

    ``fault``: (frame index, code) of the first frame that must end the session
    (malformed, or a SYN of the wrong parity), or None. ``maybe``: codes the
    session may end with before that (a SYN repeated on a stream it may still
    know, floods past the bucket). ``need``: bytes that would complete a
    cut-off last frame (0 if the stream ends on a frame boundary). ``ids``:
    every stream id named; ``syns``: the ids opened, in order.
    """

    def __init__(self):
        self.fault = None
        self.maybe = set()
        self.need = 0
        self.partial_header = False
        self.ids = set()
        self.syns = []
        self.frames = 0
        self.pointless = 0   # frames that may count against the flood bucket


def analyse(data, burst=DEFAULT_BURST):
    result = Analysis()
    seen_syn = set()
    pointless = resets = replies = 0
    pos = 0
    end = len(data)
    while pos < end:
        if end - pos < 8:
            result.need = 8 - (end - pos)
            result.partial_header = True
            break
        word, sid = HEADER.unpack_from(data, pos)
        length = word >> 8
        ftype = (word >> 4) & 15
        flags = word & 15
        have = end - pos - 8
        complete = have >= length
        result.ids.add(sid & MAX_ID)
        fault = None
        if sid & RESERVED:
            fault = ErrorCode.PROTOCOL_ERROR
        elif ftype == DATA:
            if sid == 0:
                fault = ErrorCode.PROTOCOL_ERROR
            elif flags & SYN:
                if sid % 2 == 0:
                    fault = ErrorCode.PROTOCOL_ERROR      # a client opens odd ids only
                else:
                    if sid in seen_syn:
                        result.maybe.add(ErrorCode.PROTOCOL_ERROR)   # duplicate SYN
                    seen_syn.add(sid)
                    result.syns.append(sid)
                    replies += 1
            elif length == 0 and flags == 0:
                pointless += 1
            else:
                replies += 1
                pointless += 1   # its stream may be unknown (or closed) by now
        elif ftype in (RST, WNDINC):
            if length != 4:
                fault = ErrorCode.FRAME_SIZE_ERROR
            elif complete:
                if sid == 0:
                    fault = ErrorCode.PROTOCOL_ERROR
                elif ftype == WNDINC and U32.unpack_from(data, pos + 8)[0] & MAX_ID == 0:
                    fault = ErrorCode.PROTOCOL_ERROR
                elif ftype == RST and sid % 2 == 1:
                    resets += 1
                    pointless += 1   # on a stream unknown (or closed) by now
                else:
                    replies += 1
                    pointless += 1
        elif ftype == GOAWAY:
            if length < 8:
                fault = ErrorCode.FRAME_SIZE_ERROR
            elif have >= 8 and sid != 0:
                fault = ErrorCode.PROTOCOL_ERROR
        else:
            pointless += 1
        result.pointless = pointless
        if pointless >= burst or resets >= burst or replies >= MAX_QUEUED_REPLIES:
            result.maybe.add(ErrorCode.ENHANCE_YOUR_CALM)
        if fault is not None:
            result.fault = (result.frames, fault)
            return result
        if not complete:
            result.need = length - have
            break
        pos += 8 + length
        result.frames += 1
    return result


def completed(data, burst, limit=512 * 1024):
    """``data`` with a cut-off last frame finished with zero bytes (if cheap), and its analysis."""
    analysis = analyse(data, burst)
    for _ in range(3):
        if analysis.fault is not None or not analysis.need or analysis.need > limit:
            break
        data += bytes(analysis.need)
        analysis = analyse(data, burst)
    return data, analysis


def unused_odd_ids(used, count):
    """``count`` odd stream ids, highest first, none of them in ``used``."""
    out = []
    sid = MAX_ID
    while len(out) < count:
        if sid not in used:
            out.append(sid)
        sid -= 2
    return out


# -- the recorded traffic, as material ------------------------------------------------------

_corpus = None
_corpus_lock = threading.Lock()


def load_json_vectors():
    with open(VECTORS_PATH, encoding="utf-8") as f:
        return json.load(f)


def vector_corpus():
    """[(name, [raw frames])] from every recorded byte stream in the vectors file."""
    global _corpus
    with _corpus_lock:
        if _corpus is None:
            vectors = load_json_vectors()
            corpus = []
            for scenario in vectors["scenarios"]:
                for key in ("client_to_server_hex", "server_to_client_hex"):
                    data = binascii.unhexlify(scenario[key])
                    if data:
                        corpus.append(("%s/%s" % (scenario["name"], key[:16]), split_raw(data)))
            for case in vectors["malformed"]:
                corpus.append(("malformed/" + case["name"],
                               split_raw(binascii.unhexlify(case["input_hex"]))))
            _corpus = corpus
        return _corpus


# -- session cases ----------------------------------------------------------------------------

SessionCase = collections.namedtuple("SessionCase",
                                     "kind number data options tidy end presend choices label")

INTERESTING_BYTES = (0x00, 0x01, 0x02, 0x03, 0x04, 0x0F, 0x10, 0x11, 0x12, 0x13, 0x20, 0x30,
                     0x7F, 0x80, 0xFE, 0xFF)
INTERESTING_LENGTHS = (0, 1, 3, 4, 5, 7, 8, 9, 0xFF, 0x100, WINDOW, WINDOW + 1, 0xFFFFFF)
INTERESTING_IDS = (0, 1, 2, 3, 4, 5, 7, 0xFF, 0x100, MAX_ID - 2, MAX_ID, RESERVED | 1,
                   RESERVED, 0xFFFFFFFF)
INCREMENTS = (0, 1, 2, 4096, WINDOW, MAX_ID - 1, MAX_ID, RESERVED, 0xFFFFFFFF)


def _odd_ids(frames):
    ids = set()
    for raw in frames:
        if len(raw) >= 8:
            sid = HEADER.unpack_from(raw, 0)[1] & MAX_ID
            if sid % 2:
                ids.add(sid)
    return sorted(ids) or [1]


def synthetic_frame(rng, ids, big=False):
    """One frame a hostile or careless client might send (valid or not)."""
    sid = rng.choice(ids)
    pick = rng.randrange(14)
    if pick == 0:                                   # open a new stream
        new = max(ids) + 2 * rng.randint(1, 3)
        ids.append(new)
        flags = SYN | (FIN if rng.random() < 0.3 else 0)
        return data_frame(new, rand_bytes(rng, rng.choice([0, 0, 5, 64, 300])), flags)
    if pick == 1:                                   # data, maybe FIN
        flags = FIN if rng.random() < 0.3 else 0
        return data_frame(sid, rand_bytes(rng, rng.choice([0, 1, 16, 200, 1500])), flags)
    if pick == 2:                                   # WNDINC, often extreme
        return frame(WNDINC, 0, sid, U32.pack(rng.choice(INCREMENTS + (rng.getrandbits(32),))))
    if pick == 3:                                   # RST with any code
        code = rng.choice([rng.randint(0, 16), rng.getrandbits(32)])
        return frame(RST, 0, rng.choice([sid, sid, 0, rng.getrandbits(31)]), U32.pack(code))
    if pick == 4:                                   # GOAWAY, debug up to long
        size = rng.choice([0, 8, 100, 4000, 20000])
        if big and rng.random() < 0.5:
            size = (1 << 20) + rng.randint(1, 4096)   # past Go's 1 MiB debug limit
        body = U32.pack(rng.getrandbits(31)) + U32.pack(rng.randint(0, 16)) + rand_bytes(rng, size)
        return frame(GOAWAY, 0, rng.choice([0, 0, 0, sid]), body)
    if pick == 5:                                   # unknown type
        return frame(rng.randint(4, 15), rng.randint(0, 15), rng.choice([0, sid]),
                     rand_bytes(rng, rng.choice([0, 0, 3, 40, 1000])))
    if pick == 6:                                   # a length that lies
        body = rand_bytes(rng, rng.choice([0, 4, 16]))
        return frame(rng.choice([DATA, DATA, RST, WNDINC, GOAWAY, 9]), rng.randint(0, 3), sid,
                     body, length=rng.choice(INTERESTING_LENGTHS))
    if pick == 7:                                   # empty DATA, no flags (pointless)
        return data_frame(sid)
    if pick == 8:                                   # FIN alone
        return data_frame(sid, b"", FIN)
    if pick == 9:                                   # a SYN again on a known id
        return data_frame(sid, b"again", SYN)
    if pick == 10:                                  # wrong-parity SYN
        return data_frame(sid + 1, b"", SYN)
    if pick == 11:                                  # RST/WNDINC with a bad body length
        return frame(rng.choice([RST, WNDINC]), 0, sid, rand_bytes(rng, rng.choice([0, 3, 5, 8])))
    if pick == 12:                                  # the 8-byte pad Go needs after GOAWAY
        return frame(15, 0, 0)
    if big and rng.random() < 0.5:                  # one window and one byte more
        return data_frame(sid, bytes(WINDOW + rng.choice([0, 1])))
    return data_frame(sid, rand_bytes(rng, rng.randint(0, 64)), rng.randint(0, 15))


def random_frame(rng):
    """A frame with a plausible header and random contents."""
    ftype = rng.choice([0, 1, 1, 1, 2, 2, 3, rng.randint(4, 15)])
    flags = rng.choice([0, 0, FIN, SYN, SYN | FIN, rng.randint(0, 15)])
    sid = rng.choice([1, 1, 3, 5, 7, 2, 4, rng.randint(0, 40), rng.getrandbits(31),
                      rng.getrandbits(32)])
    if ftype in (0, 2):
        length = 4 if rng.random() < 0.85 else rng.randint(0, 12)
    elif ftype == 3:
        sid = 0 if rng.random() < 0.85 else sid
        length = rng.choice([8, 8, 12, rng.randint(0, 40)])
    else:
        length = rng.randint(0, 40)
    return frame(ftype, flags, sid, rand_bytes(rng, length))


def valid_frames(rng):
    """A plausible client conversation, several streams interleaved."""
    out = []
    ids = []
    sid = rng.choice([1, 3, 5])
    for _ in range(rng.randint(1, 4)):
        ids.append(sid)
        out.append(data_frame(sid, rand_bytes(rng, rng.choice([0, 5, 100])), SYN))
        sid += 2 * rng.randint(1, 3)
    for _ in range(rng.randint(0, 8)):
        s = rng.choice(ids)
        kind = rng.randrange(5)
        if kind == 0:
            out.append(data_frame(s, rand_bytes(rng, rng.randint(1, 500))))
        elif kind == 1:
            out.append(frame(WNDINC, 0, s, U32.pack(rng.randint(1, 1 << 20))))
        elif kind == 2:
            out.append(data_frame(s, b"", FIN))
        elif kind == 3:
            out.append(frame(RST, 0, s, U32.pack(ErrorCode.STREAM_CANCELLED)))
        else:
            out.append(frame(rng.randint(4, 15), 0, 0, rand_bytes(rng, rng.randint(0, 10))))
    return out


def flood_frames(rng, burst):
    """Pointless frames (or self-reset streams) around the flood bucket's size."""
    count = max(1, int(burst * rng.choice([0.5, 0.9, 1.0, 1.1, 2.0])) + rng.randint(-1, 1))
    kind = rng.randrange(3)
    if kind == 0:
        return [frame(rng.randint(4, 15), 0, 0) for _ in range(count)]
    if kind == 1:
        return [data_frame(1, b"", SYN)] + [data_frame(1) for _ in range(count)]
    out = []
    sid = 1
    for _ in range(count):
        out.append(data_frame(sid, b"", SYN))
        out.append(frame(RST, 0, sid, U32.pack(ErrorCode.STREAM_CANCELLED)))
        sid += 2
    return out


# Mutators over a list of raw frames.

def m_duplicate(rng, frames):
    i = rng.randrange(len(frames))
    frames.insert(rng.randrange(len(frames) + 1), frames[i])
    return frames


def m_reorder(rng, frames):
    if len(frames) > 1:
        i, j = rng.randrange(len(frames)), rng.randrange(len(frames))
        frames[i], frames[j] = frames[j], frames[i]
    return frames


def m_shuffle(rng, frames):
    i = rng.randrange(len(frames))
    part = frames[i:i + rng.randint(2, 6)]
    rng.shuffle(part)
    frames[i:i + len(part)] = part
    return frames


def m_delete(rng, frames):
    if len(frames) > 1:
        del frames[rng.randrange(len(frames))]
    return frames


def m_insert(rng, frames):
    ids = _odd_ids(frames)
    frames.insert(rng.randrange(len(frames) + 1), synthetic_frame(rng, ids, big=rng.random() < 0.01))
    return frames


def m_header(rng, frames):
    """Corrupt one header field: length, type, flags, stream id, the reserved bit."""
    candidates = [i for i, f in enumerate(frames) if len(f) >= 8]
    if not candidates:
        return frames
    i = rng.choice(candidates)
    word, sid = HEADER.unpack_from(frames[i], 0)
    body = frames[i][8:]
    length, ftype, flags = word >> 8, (word >> 4) & 15, word & 15
    field = rng.randrange(5)
    if field == 0:
        length = rng.choice(INTERESTING_LENGTHS + (len(body) - 1, len(body) + 1,
                                                   rng.getrandbits(24)))
    elif field == 1:
        ftype = rng.randint(0, 15)
    elif field == 2:
        flags = rng.randint(0, 15)
    elif field == 3:
        sid = rng.choice(INTERESTING_IDS + (sid ^ 1, sid + 2, rng.getrandbits(32)))
    else:
        sid |= RESERVED
    frames[i] = frame(ftype, flags, sid, body, length=max(0, length))
    return frames


def m_wndinc(rng, frames):
    """A WNDINC of zero or of a huge size, in place of a frame or added."""
    ids = _odd_ids(frames)
    new = frame(WNDINC, 0, rng.choice(ids + [0]), U32.pack(rng.choice(INCREMENTS)))
    if rng.random() < 0.5:
        frames[rng.randrange(len(frames))] = new
    else:
        frames.insert(rng.randrange(len(frames) + 1), new)
    return frames


def m_goaway(rng, frames):
    """A GOAWAY with long (now and then past 1 MiB) debug text."""
    size = rng.choice([0, 50, 5000, 60000])
    if rng.random() < 0.01:
        size = (1 << 20) + rng.randint(1, 10000)
    body = U32.pack(rng.getrandbits(32)) + U32.pack(rng.getrandbits(32)) + rand_bytes(rng, size)
    frames.insert(rng.randrange(len(frames) + 1), frame(GOAWAY, 0, 0, body))
    return frames


def m_splice(rng, frames):
    name, other = rng.choice(vector_corpus())
    i = rng.randrange(len(other))
    part = list(other[i:i + rng.randint(1, 4)])
    j = rng.randrange(len(frames) + 1)
    frames[j:j] = part
    return frames


FRAME_MUTATORS = (m_duplicate, m_reorder, m_shuffle, m_delete, m_insert, m_insert, m_header,
                  m_header, m_header, m_wndinc, m_goaway, m_splice)


# Mutators over bytes.

def b_flip(rng, data):
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return data


def b_set(rng, data):
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.choice(INTERESTING_BYTES + (rng.getrandbits(8),))
    return data


def b_truncate(rng, data):
    del data[rng.randrange(len(data)):]
    return data


def b_insert(rng, data):
    i = rng.randrange(len(data) + 1)
    data[i:i] = rand_bytes(rng, rng.randint(1, 16))
    return data


def b_delete(rng, data):
    i = rng.randrange(len(data))
    del data[i:i + rng.randint(1, 16)]
    return data


def b_repeat(rng, data):
    i = rng.randrange(len(data))
    part = data[i:i + rng.randint(1, 32)]
    data[i:i] = part * rng.randint(1, 4)
    return data


BYTE_MUTATORS = (b_flip, b_flip, b_set, b_truncate, b_insert, b_delete, b_repeat)


def gen_frames(rng, options, label):
    """Raw frames: recorded, spliced, synthetic or random, then mutated."""
    corpus = vector_corpus()
    pick = rng.random()
    if pick < 0.40:
        name, frames = rng.choice(corpus)
        frames = list(frames)
        if len(frames) > 1 and rng.random() < 0.3:
            i = rng.randrange(len(frames))
            frames = frames[i:i + rng.randint(1, len(frames))]
        label.append("vector:" + name)
    elif pick < 0.58:
        frames = []
        for _ in range(rng.randint(2, 4)):
            name, other = rng.choice(corpus)
            i = rng.randrange(len(other))
            frames.extend(other[i:i + rng.randint(1, 3)])
        label.append("splice")
    elif pick < 0.75:
        frames = valid_frames(rng)
        label.append("conversation")
    elif pick < 0.85:
        frames = [random_frame(rng) for _ in range(rng.randint(1, 10))]
        label.append("random-frames")
    elif pick < 0.92:
        frames = [rand_bytes(rng, rng.randint(1, 200))]
        label.append("random-bytes")
    else:
        burst = options.get("flood_limit", (DEFAULT_BURST,))[0]
        if burst > 200:
            burst = rng.randint(5, 60)
            options["flood_limit"] = (burst, rng.choice([1.0, 10.0]))
        frames = flood_frames(rng, burst)
        label.append("flood")
    if not frames:
        frames = [random_frame(rng)]
    for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4])):
        mutator = rng.choice(FRAME_MUTATORS)
        frames = mutator(rng, frames) or [random_frame(rng)]
        label.append(mutator.__name__[2:])
    data = bytearray(b"".join(frames))
    # The 300 kB recorded stream is kept whole only now and then: cases stay cheap.
    if len(data) > 64 * 1024 and rng.random() < 0.8:
        del data[64 * 1024 + rng.randrange(4096):]
        label.append("cut")
    if data and rng.random() < 0.35:
        for _ in range(rng.randint(1, 2)):
            if not data:
                break
            mutator = rng.choice(BYTE_MUTATORS)
            data = mutator(rng, data)
            label.append(mutator.__name__[2:])
    return bytes(data)


def session_options(rng):
    options = {"write_timeout": 5.0}
    if rng.random() < 0.12:
        options["flood_limit"] = (rng.randint(2, 64), rng.choice([1.0, 10.0, 100.0]))
    if rng.random() < 0.08:
        options["max_streams"] = rng.randint(1, 6)
    if rng.random() < 0.08:
        options["accept_backlog"] = rng.randint(1, 6)
    if rng.random() < 0.08:
        options["window_size"] = rng.choice([WINDOW + 1, 1 << 20])
    return options


def gen_session_case(seed, number):
    rng = case_rng(seed, "session", number)
    options = session_options(rng)
    label = []
    data = gen_frames(rng, options, label)
    # Now and then the bytes are already waiting when the session starts (as on the
    # relay, where a service's first frames race the session's threads).
    presend = len(data) <= 64 * 1024 and rng.random() < 0.25
    return SessionCase("session", number, data, options, tidy=rng.random() < 0.8,
                       end=rng.choice(["eof", "eof", "close", "close", "race"]), presend=presend,
                       choices=rng.getrandbits(32), label="+".join(label))


# -- the harness: failures, logs, threads ---------------------------------------------------

class CaseFailure(AssertionError):
    """A case broke a rule; the message says which."""


def check(condition, message, *args):
    if not condition:
        raise CaseFailure(message % args if args else message)


class Outcome(object):
    """A case's result: ``outcome`` (for the summary) or ``failure``."""

    def __init__(self, case, outcome=None, failure=None):
        self.case = case
        self.outcome = outcome
        self.failure = failure


_NAME_PATTERN = re.compile(r"fuzz-([a-z])(\d+)")
# The letter in a case's thread and session names (fuzz-s12, fuzz-p7...): its kind.
KIND_LETTERS = {"s": "session", "r": "relay", "p": "proxy", "c": "client", "u": "public",
                "a": "adapter", "t": "tls"}
LETTER_OF = dict((kind, letter) for letter, kind in KIND_LETTERS.items())
_PORT_PATTERN = re.compile(r"127\.0\.0\.1:(\d+)")


class Watch(object):
    """Collects what must never happen: ERROR records from tcprelay loggers, and
    exceptions no thread caught. Each is tied to a case when its text names one
    (session names are ``fuzz-s<N>``/``fuzz-r<N>``; relay log lines name the
    client's address, which the relay runner registers with ``port_is``)."""

    class _Handler(logging.Handler):
        def __init__(self, watch):
            logging.Handler.__init__(self, logging.WARNING)
            self.watch = watch

        def emit(self, record):
            self.watch._record(record)

    def __init__(self):
        self._lock = threading.Lock()
        self.errors = []          # (case key or None, text)
        self.warnings = 0
        self._ports = {}
        self._handler = self._Handler(self)
        self._logger = logging.getLogger("tcprelay")
        self._saved = None
        self._previous_hook = None

    def port_is(self, port, key):
        with self._lock:
            self._ports[port] = key

    def _key_of(self, text):
        match = _NAME_PATTERN.search(text)
        if match and match.group(1) in KIND_LETTERS:
            return (KIND_LETTERS[match.group(1)], int(match.group(2)))
        with self._lock:
            for port in _PORT_PATTERN.findall(text):
                key = self._ports.get(int(port))
                if key is not None:
                    return key
        return None

    def _record(self, record):
        if record.levelno < logging.ERROR:
            with self._lock:
                self.warnings += 1
            return
        try:
            text = "%s: %s %s" % (record.levelname, record.getMessage(),
                                  "".join(traceback.format_exception(*record.exc_info))
                                  if record.exc_info else "")
        except Exception:   # a record that cannot even be formatted is a failure too
            text = "%s: %r %r" % (record.levelname, record.msg, record.args)
        text = "[%s] %s" % (record.threadName, text)
        key = self._key_of(text)
        with self._lock:
            self.errors.append((key, text))

    def _hook(self, args):
        text = "[%s] uncaught %s" % (
            args.thread.name if args.thread is not None else "?",
            "".join(traceback.format_exception(args.exc_type, args.exc_value,
                                               args.exc_traceback)))
        key = self._key_of(text)
        with self._lock:
            self.errors.append((key, text))

    def __enter__(self):
        self._saved = (self._logger.level, self._logger.propagate)
        self._logger.setLevel(logging.WARNING)
        self._logger.propagate = False
        self._logger.addHandler(self._handler)
        if hasattr(threading, "excepthook"):
            self._previous_hook = threading.excepthook
            threading.excepthook = self._hook
        return self

    def __exit__(self, *exc_info):
        if self._previous_hook is not None:
            threading.excepthook = self._previous_hook
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._saved[0])
        self._logger.propagate = self._saved[1]

    def errors_for(self, key):
        with self._lock:
            return [text for k, text in self.errors if k == key]

    def unattributed(self, kind, numbers):
        """Errors tied to no case of ``kind`` in ``numbers`` (a range: no set of keys)."""
        with self._lock:
            return [text for k, text in self.errors
                    if k is None or k[0] != kind or k[1] not in numbers]


def _as_range(numbers):
    """``numbers`` as a range if it is one (a million cases: no list), else a list."""
    return numbers if isinstance(numbers, range) else list(numbers)


def open_fds():
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def join_threads(threads, timeout=TIMEOUT):
    """Join each thread within one overall bound; the names of those still running."""
    end = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    return [t.name for t in threads if t.is_alive()]


def threads_named(*names):
    wanted = set(names)
    return [t for t in threading.enumerate() if t.name in wanted]


class Report(object):
    """Cases run, outcomes by kind, failures (each with its replay command).

    Only counts and failures are kept (the first ``KEEP_FAILURES`` in full, the
    rest counted): memory stays flat however many cases run.
    """

    KEEP_FAILURES = 1000

    def __init__(self, seed):
        self.seed = seed
        self.outcomes = collections.Counter()
        self.cases = collections.Counter()
        self.failures = []          # (kind, number, text), the first KEEP_FAILURES
        self.failed = 0             # every failure, kept or not
        self.notes = []
        self.elapsed = 0.0

    def add(self, kind, number, outcome=None, failure=None):
        self.cases[kind] += 1
        if failure is not None:
            self._keep(kind, number, failure)
            self.outcomes[(kind, "FAILED")] += 1
        else:
            self.outcomes[(kind, outcome)] += 1

    def _keep(self, kind, number, text):
        self.failed += 1
        if len(self.failures) < self.KEEP_FAILURES:
            self.failures.append((kind, number, text))

    def fail_run(self, kind, text):
        self._keep(kind, None, text)

    def recorder(self, kind):
        """A ``record`` callback for run_pool: counts, and failures kept."""
        return lambda n, result: self.add(kind, n, result.outcome, result.failure)

    def note_skipped(self, kind, numbers, ran):
        skipped = len(numbers) - ran
        if skipped:
            self.notes.append("%s: %d cases not run (stopped after too many failures)"
                              % (kind, skipped))

    def replay_command(self, kind, number):
        return "python3 scripts/fuzz.py --seed %d --kind %s --replay %d" % (self.seed, kind, number)

    def describe_failures(self, limit=5):
        parts = []
        for kind, number, text in self.failures[:limit]:
            if number is None:
                parts.append("%s run (seed %d): %s" % (kind, self.seed, text))
            else:
                parts.append("%s case %d (seed %d): %s\n  replay: %s"
                             % (kind, number, self.seed, text, self.replay_command(kind, number)))
        if self.failed > limit:
            parts.append("... and %d more failures" % (self.failed - limit))
        return "\n\n".join(parts)

    def summary(self):
        lines = ["seed %d: %d cases in %.1fs" % (self.seed, sum(self.cases.values()), self.elapsed)]
        for kind in sorted(self.cases):
            lines.append("  %s: %d cases" % (kind, self.cases[kind]))
            rows = sorted((o, n) for (k, o), n in self.outcomes.items() if k == kind)
            for outcome, count in rows:
                lines.append("    %-44s %6d" % (outcome, count))
        for note in self.notes:
            lines.append("  " + note)
        lines.append("  failures: %d" % self.failed)
        return "\n".join(lines)


def run_pool(numbers, run_one, workers, progress=None, limit=CASE_LIMIT, max_failures=None,
             record=None):
    """Run ``run_one(n)`` for every n on ``workers`` threads; returns how many ran.

    ``record(n, outcome)`` gets each case's Outcome as it ends (one call at a
    time); nothing is kept here, so a million cases run in bounded memory. A
    watchdog names any case that runs past ``limit`` seconds (a hang): its
    worker is left behind (a daemon thread) and the case reported. After
    ``max_failures`` failed cases no new case starts.
    """
    total = len(numbers)
    todo = iter(numbers)
    lock = threading.Lock()
    running = {}
    counts = {"done": 0, "failed": 0, "stop": False}

    def finish(n, result):
        # (lock held)
        counts["done"] += 1
        if result.failure is not None:
            counts["failed"] += 1
            if max_failures is not None and counts["failed"] >= max_failures:
                counts["stop"] = True
        if record is not None:
            record(n, result)

    def worker():
        me = threading.current_thread()
        while True:
            with lock:
                n = None if counts["stop"] else next(todo, None)
                if n is None:
                    return
                running[me] = (n, time.monotonic())
            try:
                result = run_one(n)
            except CaseFailure as exc:
                result = Outcome(None, failure=str(exc))
            except Exception:
                result = Outcome(None, failure="the harness raised:\n" + traceback.format_exc())
            result.case = None     # its bytes: up to a megabyte each
            with lock:
                if running.pop(me, None) is None:
                    return         # reported as hung meanwhile
                finish(n, result)
                done, failures = counts["done"], counts["failed"]
            if progress is not None:
                progress(done, total, failures)

    threads = [threading.Thread(target=worker, name="fuzz-worker-%d" % i)
               for i in range(max(1, min(workers, total)))]
    for thread in threads:
        thread.daemon = True
        thread.start()
    hung = False
    for thread in threads:
        while thread.is_alive():
            thread.join(1.0)
            now = time.monotonic()
            with lock:
                late = [(me, n, now - t0) for me, (n, t0) in running.items() if now - t0 > limit]
                for me, n, took in late:
                    del running[me]
                    finish(n, Outcome(None, failure="hang: still running after %.0fs" % took))
                if late:
                    counts["stop"] = True
            if late:
                hung = True
                break
        if hung:
            break
    with lock:
        counts["stop"] = True
        return counts["done"]


# -- the session runner ----------------------------------------------------------------------

class Pairs(object):
    """Connected TCP pairs on 127.0.0.1 from one listener (ephemeral port)."""

    def __init__(self):
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(128)
        self._listener.settimeout(TIMEOUT)
        self._lock = threading.Lock()

    def pair(self):
        """(dialer, acceptor), both with TIMEOUT."""
        with self._lock:
            dialer = socket.create_connection(self._listener.getsockname(), timeout=TIMEOUT)
            try:
                acceptor, _ = self._listener.accept()
            except BaseException:
                dialer.close()
                raise
        acceptor.settimeout(TIMEOUT)
        return dialer, acceptor

    def close(self):
        self._listener.close()


class RawSide(object):
    """The raw socket end: sends bytes, reads back and checks every frame."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = bytearray()
        self.frames = []
        self.eof = False
        self.reset = False
        self.alert = None    # the TLS alert that ended the connection, if one did

    def send(self, data):
        """Send all of ``data``; False if the peer is gone (it may end a session early)."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False
        except socket.timeout:
            raise CaseFailure("sending %d bytes took longer than %gs (nobody reads)"
                              % (len(data), TIMEOUT))

    def shutdown_write(self):
        try:
            # (socket's own: SSLSocket.shutdown would drop TLS for the reads after it)
            socket.socket.shutdown(self.sock, socket.SHUT_WR)
        except OSError:
            pass

    def _read(self, timeout):
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(256 * 1024)
        except ConnectionResetError:
            self.reset = True
            data = b""
        except ssl.SSLError as exc:
            # Over TLS the relay may end with an alert instead (tls cases only).
            self.reset = True
            self.alert = exc
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        frames, rest = parse_frames(self.buffer)
        self.frames.extend(frames)
        self.buffer = bytearray(rest)
        return True

    def read_until(self, predicate, what, timeout=TIMEOUT):
        """Read until ``predicate(frames)``; False at EOF first. A hang fails the case."""
        end = time.monotonic() + timeout
        while not predicate(self.frames):
            if self.eof:
                return False
            left = end - time.monotonic()
            try:
                if left <= 0:
                    raise socket.timeout()
                self._read(left)
            except socket.timeout:
                raise CaseFailure("hang: no %s within %gs; got %s" % (what, timeout,
                                                                      describe(self.frames)))
        return True

    def read_to_eof(self, timeout=TIMEOUT):
        self.read_until(lambda frames: False, "EOF", timeout)
        check(not self.buffer, "the peer wrote a cut-off frame before closing: %s",
              hexdump(self.buffer, 64))
        return self.frames

    def quiet(self, wait=QUIET):
        """Read what comes within ``wait``; True if the connection stayed open."""
        end = time.monotonic() + wait
        while not self.eof:
            left = end - time.monotonic()
            if left <= 0:
                return True
            try:
                self._read(left)
            except socket.timeout:
                return True
        return False

    def close(self):
        self.sock.close()


def describe(frames, limit=6):
    names = {RST: "RST", DATA: "DATA", WNDINC: "WNDINC", GOAWAY: "GOAWAY"}
    parts = []
    for f in frames[-limit:]:
        if f.type == RST and f.length == 4:
            parts.append("RST(%d, %s)" % (f.sid, code_name(ErrorCode.of(U32.unpack(f.body)[0]))))
        elif f.type == GOAWAY and f.length >= 8:
            last, code = struct.unpack_from(">II", f.body)
            parts.append("GOAWAY(%d, %s, %r)" % (last, code_name(ErrorCode.of(code)),
                                                 f.body[8:60]))
        else:
            parts.append("%s(flags %d, stream %d, %d bytes)"
                         % (names.get(f.type, "type %d" % f.type), f.flags, f.sid, f.length))
    more = "%d frames, last: " % len(frames) if len(frames) > limit else ""
    return more + (", ".join(parts) or "nothing")


def is_rst(frame_, sid, codes=None):
    if frame_.type != RST or frame_.sid != sid or frame_.length != 4:
        return False
    return codes is None or U32.unpack(frame_.body)[0] in codes


def goaway_of(frames):
    return [f for f in frames if f.type == GOAWAY]


def check_goaway_last(frames, who="the session"):
    """At most one GOAWAY, and nothing after it; returns its code or None."""
    goaways = [i for i, f in enumerate(frames) if f.type == GOAWAY]
    if not goaways:
        return None
    check(len(goaways) == 1, "%s sent %d GOAWAY frames: %s", who, len(goaways), describe(frames))
    check(goaways[0] == len(frames) - 1, "%s sent frames after its GOAWAY: %s",
          who, describe(frames[goaways[0]:]))
    g = frames[goaways[0]]
    check(g.length >= 8 and g.sid == 0 and g.flags == 0, "malformed GOAWAY: %s", describe([g]))
    return ErrorCode.of(U32.unpack_from(g.body, 4)[0])


def check_session_output(frames, analysis, probe_ids, probe_payload, goaway_code):
    """Everything a server session wrote back must be a well-formed, expected frame."""
    opened = set(analysis.syns) | set(probe_ids[1:2])
    named = analysis.ids | set(probe_ids)
    data = collections.defaultdict(bytearray)
    for f in frames:
        check(f.type in (RST, DATA, WNDINC, GOAWAY), "the session sent a frame of type %d", f.type)
        check(not f.sid & RESERVED, "the session set the reserved bit: %s", describe([f]))
        if f.type == RST:
            check(f.length == 4 and f.flags == 0 and f.sid != 0, "bad RST: %s", describe([f]))
            check(U32.unpack(f.body)[0] in SESSION_RST_CODES, "RST with an odd code: %s",
                  describe([f]))
            check(f.sid in named, "RST for a stream the peer never named: %s", describe([f]))
        elif f.type == WNDINC:
            check(f.length == 4 and f.flags == 0 and f.sid in opened, "bad WNDINC: %s",
                  describe([f]))
            check(0 < U32.unpack(f.body)[0] <= MAX_ID, "WNDINC increment out of range: %s",
                  describe([f]))
        elif f.type == DATA:
            check(f.sid in opened and not f.flags & ~FIN, "DATA the session should not send: %s",
                  describe([f]))
            data[f.sid] += f.body
    for sid, payload in data.items():
        if sid == probe_ids[1]:
            check(bytes(payload) == probe_payload, "the probe's echo came back wrong: %r",
                  bytes(payload[:80]))
        else:
            check(not payload.strip(b"F"), "the session sent data nobody wrote on stream %d", sid)
    code = check_goaway_last(frames)
    if code is not None:
        check(code == goaway_code, "GOAWAY says %s, the session ended with %s",
              code_name(code), code_name(goaway_code))
        last = U32.unpack_from(goaway_of(frames)[0].body, 0)[0]
        check(last in (set(analysis.syns) | set(probe_ids[1:2]) | {1}),
              "GOAWAY names last stream %d, which the peer never opened", last)


def _tidy(session, case, rng):
    """Accept what is queued; close, reset or answer each stream (tidy), or leave it."""
    accepted = []
    while True:
        try:
            stream = session.accept(timeout=0)
        except (socket.timeout, muxado.MuxadoError):
            return accepted
        accepted.append(stream)
        if not case.tidy:
            continue
        action = rng.randrange(4)
        try:
            if action == 0:
                stream.reset(rng.choice([ErrorCode.STREAM_RESET, ErrorCode.STREAM_CANCELLED]))
            elif action == 1:
                stream.settimeout(TIMEOUT)
                stream.sendall(b"F" * rng.randint(1, 100))
                stream.close()
            else:
                stream.close()
        except (muxado.MuxadoError, OSError):
            stream.close()


def run_session_case(case, pairs, watch):
    """Feed one case to a fresh server session; returns the outcome's name."""
    rng = random.Random(case.choices)     # the runner's own choices
    name = "fuzz-s%d" % case.number
    burst = case.options.get("flood_limit", (DEFAULT_BURST,))[0]
    data, analysis = completed(case.data, burst)
    dialer, acceptor = pairs.pair()
    raw = RawSide(dialer)
    presend = case.presend and len(data) <= 64 * 1024   # nobody reads it yet
    if presend:
        raw.send(data)
    session = muxado.server(acceptor, name=name, **case.options)
    sync_id, probe_id, sync2_id = unused_odd_ids(analysis.ids, 3)
    probe_ids = (sync_id, probe_id, sync2_id)
    payload = b"probe %d" % case.number
    allowed = set(analysis.maybe)
    if analysis.pointless + len(probe_ids) - 1 >= burst:
        # The two sync frames go to streams that do not exist: pointless too.
        allowed.add(ErrorCode.ENHANCE_YOUR_CALM)
    outcome = None
    try:
        if not presend:
            raw.send(data)
        if analysis.fault is not None:
            # The stream breaks the rules: the session must end by itself.
            allowed.add(analysis.fault[1])
            check(session.wait(TIMEOUT), "hang: frame %d breaks the rules (%s) but the session "
                  "did not end", analysis.fault[0], code_name(analysis.fault[1]))
            outcome = "ended"
        elif analysis.need:
            # Cut off inside a frame (too long to finish): only EOF ends it.
            raw.shutdown_write()
            allowed.add(ErrorCode.PEER_EOF)
            check(session.wait(TIMEOUT), "hang: the session did not end at EOF")
            outcome = "ended"
        else:
            outcome = _prove_alive(case, session, raw, analysis, probe_ids, payload, allowed, rng)
            if outcome.startswith("alive"):
                if case.end in ("eof", "race"):
                    raw.shutdown_write()
                    allowed.add(ErrorCode.PEER_EOF)
                if case.end in ("close", "race"):
                    session.close()     # with "race", as the peer's EOF comes in
                    allowed.add(ErrorCode.SESSION_CLOSED)
            check(session.wait(TIMEOUT), "hang: the session did not end (%s)", case.end)
        frames = raw.read_to_eof()
        check(session.closed and session.error is not None, "the session ended with no error set")
        code = session.error.code
        check(isinstance(code, ErrorCode), "the session ended with a code that is not an "
              "ErrorCode: %r", code)
        check(code in allowed, "the session ended with %s (%s); allowed: %s; last frames: %s",
              code_name(code), session.error.message,
              ", ".join(sorted(code_name(c) for c in allowed)) or "none", describe(frames))
        goaway_code = ErrorCode.NO_ERROR if code == ErrorCode.SESSION_CLOSED else code
        check(goaway_of(frames) or raw.reset, "the session ended (%s) without GOAWAY: %s",
              code_name(code), describe(frames))
        check_session_output(frames, analysis, probe_ids, payload, goaway_code)
        if outcome == "ended":
            outcome = "ended " + code_name(code)
        elif outcome != "alive":
            outcome += " " + code_name(code)
    finally:
        session.close()
        raw.close()
    check(acceptor.fileno() == -1, "the session left its socket open")
    left = join_threads(threads_named(name, name + "-writer"))
    check(not left, "threads left running: %s", left)
    errors = watch.errors_for(("session", case.number))
    check(not errors, "logged or raised in a thread:\n%s", "\n".join(errors[:3]))
    return outcome


def _prove_alive(case, session, raw, analysis, ids, payload, allowed, rng):
    """The case left the session in step: show a fresh stream works (or why it may not)."""
    sync_id, probe_id, sync2_id = ids
    raw.send(data_frame(sync_id, b"s"))
    if not raw.read_until(lambda fs: any(is_rst(f, sync_id) for f in fs), "RST for the sync frame"):
        return "ended by the case"    # only allowed if the model said it may (checked later)
    _tidy(session, case, rng)
    raw.send(data_frame(probe_id, payload, SYN | FIN) + data_frame(sync2_id, b"s"))
    if not raw.read_until(lambda fs: any(is_rst(f, sync2_id) for f in fs),
                          "RST for the second sync frame"):
        return "ended by the case"
    refused = [f for f in raw.frames if is_rst(f, probe_id)]
    if refused:
        most = case.options.get("max_streams", 1024)
        full = min(most, case.options.get("accept_backlog", most))   # the backlog defaults to it
        check(not case.tidy and len(analysis.syns) >= full,
              "the probe stream was refused (%s) with no limit reached", describe(refused))
        return "alive, probe refused"
    while True:
        try:
            stream = session.accept(timeout=TIMEOUT)
        except socket.timeout:
            raise CaseFailure("hang: the probe stream was never accepted")
        except muxado.MuxadoError:
            return "ended by the case"
        if stream.id == probe_id:
            break
        check(not case.tidy, "accepted stream %d after the sync frame", stream.id)
    stream.settimeout(TIMEOUT)
    received = bytearray()
    while True:
        chunk = stream.recv(65536)
        if not chunk:
            break
        received += chunk
    check(bytes(received) == payload, "the probe stream carried %r, not %r",
          bytes(received[:80]), payload)
    stream.sendall(payload)
    stream.close()
    raw.read_until(lambda fs: any(f.type == DATA and f.sid == probe_id and f.flags & FIN
                                  for f in fs), "FIN on the probe stream")
    return "alive"


def session_case_for(seed, number, pairs, watch, make_case=None):
    case = (make_case or gen_session_case)(seed, number)
    try:
        outcome = run_session_case(case, pairs, watch)
    except CaseFailure as exc:
        errors = watch.errors_for(("session", number))
        if errors and "logged or raised" not in str(exc):
            exc = "%s\n  logged or raised in a thread:\n%s" % (exc, "\n".join(errors[:2]))
        raise CaseFailure("%s\n  case: %s, options %r, tidy=%s, end=%s, presend=%s\n"
                          "  bytes: %s" % (exc, case.label, case.options, case.tidy, case.end,
                                           case.presend, hexdump(case.data)))
    return Outcome(case, outcome)


def run_session_fuzz(seed, numbers, workers=24, report=None, progress=None, make_case=None,
                     max_failures=None):
    """Run session cases ``numbers`` for ``seed``; returns a Report.

    ``make_case(seed, n)`` replaces the generator (regression tests run fixed cases).
    """
    report = report or Report(seed)
    started = time.monotonic()
    numbers = _as_range(numbers)
    vector_corpus()
    fds = open_fds()
    pairs = Pairs()
    before = set(threading.enumerate())
    try:
        with Watch() as watch:
            ran = run_pool(numbers, lambda n: session_case_for(seed, n, pairs, watch, make_case),
                           workers, progress, max_failures=max_failures,
                           record=report.recorder("session"))
            stray = watch.unattributed("session", numbers)
    finally:
        pairs.close()
    report.note_skipped("session", numbers, ran)
    for text in stray:
        report.fail_run("session", "logged or raised outside any case:\n" + text)
    left = join_threads([t for t in threading.enumerate()
                         if t not in before and not t.name.startswith("fuzz-worker")])
    if left:
        report.fail_run("session", "threads left running: %s" % left[:10])
    if open_fds() != fds:
        report.fail_run("session", "open files: %s before, %s after" % (fds, open_fds()))
    report.elapsed += time.monotonic() - started
    return report


# -- relay cases: the environment --------------------------------------------------------------

SECRET = b"tcprelay fuzzing secret"
AUTH_METHOD = "hmac-sha256"
AUTH_CONTEXT = b"tcprelay registration v1\x00"   # docs: HMAC-SHA256(secret, context + nonce)
MAX_REQUEST = 4096                                # docs/PROTOCOL.md 2.2
HANDSHAKE_TIMEOUT = 0.5
# Bytes a connection may send before it has registered (a window and 64 KiB; then
# the relay ends its session with ENHANCE_YOUR_CALM).
PENDING_BUDGET = WINDOW + 64 * 1024
LEASE_TIME = 0.5
POOL_SIZE = 48
REPLY_STATUSES = ("challenge", "waiting", "ok", "error")


def free_port_range(count, seed, low=20000, high=32000, attempts=500):
    """``count`` contiguous free ports in [low, high): the kernel hands out none below 32768."""
    rng = random.Random(seed)
    for _ in range(attempts):
        start = rng.randrange(low, high - count)
        ports = list(range(start, start + count))
        if all(_port_free(port) for port in ports):
            return ports
    raise RuntimeError("no %d free contiguous ports in %d-%d" % (count, low, high))


def _port_free(port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


class Traffic(object):
    """A client of the healthy service's public port: random chunks, each echoed and
    compared byte for byte; sha256 of everything sent and received. ``churn`` opens a
    new connection every few chunks, else one connection carries the whole run."""

    def __init__(self, port, seed, churn):
        self.port = port
        self.rng = random.Random(seed)
        self.churn = churn
        self.sent = hashlib.sha256()
        self.received = hashlib.sha256()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.round_trips = 0
        self.connections = 0
        self.error = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run,
                                       name="healthy traffic%s" % (" (churn)" if churn else ""))
        self.thread.daemon = True
        self.thread.start()

    def _chunk(self):
        rng = self.rng
        return rand_bytes(rng, rng.choice([1, 7, 100, 1460, 16384, 65536, rng.randint(1, 65536)]))

    def _run(self):
        try:
            while not self._stop.is_set():
                sock = socket.create_connection((LOOPBACK, self.port), timeout=TIMEOUT)
                self.connections += 1
                try:
                    count = self.rng.randint(1, 4) if self.churn else -1
                    while count and not self._stop.is_set():
                        chunk = self._chunk()
                        sock.sendall(chunk)
                        self.sent.update(chunk)
                        self.bytes_sent += len(chunk)
                        echo = recv_exact(sock, len(chunk))
                        self.received.update(echo)
                        self.bytes_received += len(echo)
                        if echo != chunk:
                            at = next(i for i in range(len(chunk)) if echo[i] != chunk[i])
                            raise AssertionError("echo differs from byte %d of a %d-byte chunk"
                                                 % (at, len(chunk)))
                        self.round_trips += 1
                        count -= 1
                    sock.shutdown(socket.SHUT_WR)
                    rest = sock.recv(1)
                    if rest:
                        raise AssertionError("more came back than was sent: %r" % rest)
                finally:
                    sock.close()
        except Exception:
            self.error = traceback.format_exc()

    def stop(self):
        self._stop.set()
        self.thread.join(TIMEOUT)
        if self.thread.is_alive():
            return "the healthy traffic thread is stuck"
        if self.error is not None:
            return "healthy traffic failed after %d round trips:\n%s" % (self.round_trips,
                                                                          self.error)
        if self.sent.digest() != self.received.digest():
            return "healthy traffic: sha256 of sent and received differ (%d vs %d bytes)" % (
                self.bytes_sent, self.bytes_received)
        if not self.round_trips:
            return "healthy traffic made no round trip"
        return None


class HealthyService(object):
    """A service registered with ``tcprelay.service.connect`` that echoes every stream."""

    def __init__(self, relay_address, client_tls=None):
        # The relay's handshake timeout is short (HANDSHAKE_TIMEOUT): on a loaded
        # machine it may time us out (an error line) or drop us (the session ends).
        for attempt in range(5):
            try:
                self.connection = relay_service.connect(relay_address, name="healthy",
                                                        secret=SECRET, timeout=TIMEOUT,
                                                        tls=client_tls)
                break
            except relay_service.RegistrationRefused as exc:
                if "not finished" not in exc.reason or attempt == 4:
                    raise
            except (relay_service.RelayGone, muxado.MuxadoError, ssl.SSLError,
                    registration.RegistrationError):
                if attempt == 4:
                    raise
        self.port = self.connection.port
        self.address = self.connection.session.getsockname()
        self._threads = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.error = None
        self.hostile_clients = False   # set for public cases
        self._spawn(self._accept_loop, "healthy accept")

    def _spawn(self, fn, name, *args):
        thread = threading.Thread(target=fn, args=args, name=name)
        thread.daemon = True
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                stream = self.connection.accept(timeout=TIMEOUT)
            except socket.timeout:
                continue
            except relay_service.RelayGone:
                if not self._stop.is_set():
                    self.error = "the healthy service lost the relay"
                return
            self._spawn(self._echo, "healthy echo %d" % stream.id, stream)

    def _echo(self, stream):
        stream.settimeout(TIMEOUT)
        try:
            while True:
                data = stream.recv(256 * 1024)
                if not data:
                    break
                stream.sendall(data)
        except (OSError, muxado.MuxadoError) as exc:
            # With hostile clients on the port (public cases) a reset is theirs to
            # send: the healthy traffic checks its own streams byte for byte.
            hostile = self.hostile_clients and isinstance(
                exc, (ConnectionResetError, BrokenPipeError, muxado.StreamResetError))
            if not self._stop.is_set() and not hostile:
                self.error = "healthy echo on stream %d failed: %r" % (stream.id, exc)
        finally:
            stream.close()

    def close(self):
        self._stop.set()
        self.connection.close()
        with self._lock:
            threads = list(self._threads)
        return join_threads(threads)


class RelayEnv(object):
    """One live relay for a run, with the healthy service and its traffic."""

    def __init__(self, seed, watch, use_tls=False):
        self.watch = watch
        self.threads_before = set(threading.enumerate())
        self.ports = free_port_range(POOL_SIZE, seed)
        self.client_tls = tls.client_context(TLS_CA) if use_tls else None
        self.relay = Relay((LOOPBACK, 0), ports=self.ports, public_bind=LOOPBACK,
                           tls_context=tls.server_context(TLS_CERT, TLS_KEY) if use_tls
                           else None,
                           handshake_timeout=HANDSHAKE_TIMEOUT, registration_rate=10 ** 6,
                           secret=SECRET, lease_time=LEASE_TIME,
                           # Every case comes from 127.0.0.1, up to one per worker at
                           # once (--workers may be more than the default cap of 16).
                           max_pending_per_host=None)
        # Wrong answers are part of the fuzzing: they must not get 127.0.0.1 banned.
        self.relay.auth_failures = limits.FailureBans(limit=1 << 30)
        self.relay_address = self.relay.server_address
        self._serve = threading.Thread(target=self.relay.serve_forever, name="fuzz relay")
        self._serve.daemon = True
        self._serve.start()
        self.healthy = None
        self.traffic = []
        try:
            self.healthy = HealthyService(self.relay_address, self.client_tls)
            self.healthy_port = self.healthy.port
            self.healthy_link = self._link_with_port(self.healthy_port)
            self.traffic = [Traffic(self.healthy_port, seed, churn=False),
                            Traffic(self.healthy_port, seed + 1, churn=True)]
        except BaseException:
            self._stop_relay()
            raise

    def dial(self):
        """A connection to the relay's service port: TCP, or TLS (handshake done) if
        the run uses TLS."""
        sock = socket.create_connection(self.relay_address, timeout=TIMEOUT)
        if self.client_tls is None:
            return sock
        try:
            return self.client_tls.wrap_socket(sock, server_hostname=LOOPBACK)
        except BaseException:
            sock.close()
            raise

    def _link_with_port(self, port):
        links = [link for link in self.relay.services if link.port == port]
        if len(links) != 1:
            raise AssertionError("the relay has %d services on port %d" % (len(links), port))
        return links[0]

    def links_of(self, local_port):
        return [link for link in self.relay.services if link.address[1] == local_port]

    def finish(self):
        """Check the relay and the healthy service after every case; returns problems."""
        # No new services from now on: every link the relay took is started.
        problems = self._stop_serving()
        # Every fuzz service must be gone: join their threads.
        others = [link for link in self.relay.services if link is not self.healthy_link]
        stuck = [link for link in others if not link.join(TIMEOUT)]
        if stuck:
            problems.append("relay service threads still running: %s" % stuck[:5])
        healthy_tag = "%s:%d" % tuple(self.healthy.address[:2])
        extra = [t.name for t in threading.enumerate()
                 if (t.name.startswith("service ") or t.name.startswith("heartbeat service"))
                 and healthy_tag not in t.name]
        if extra:
            problems.append("relay threads beyond the healthy service's: %s" % extra[:10])
        if self.relay.services != [self.healthy_link]:
            problems.append("the relay's services are %r, not just the healthy one"
                            % self.relay.services[:5])
        for traffic in self.traffic:
            problem = traffic.stop()
            if problem:
                problems.append(problem)
        if self.healthy.error:
            problems.append(self.healthy.error)
        if self.healthy.connection.closed:
            problems.append("the healthy service's session ended: %s"
                            % self.healthy.connection.session.error)
        else:
            try:
                message = b"still healthy?" * 100
                client = socket.create_connection((LOOPBACK, self.healthy_port), timeout=TIMEOUT)
                try:
                    client.sendall(message)
                    if recv_exact(client, len(message)) != message:
                        problems.append("a fresh client of the healthy service got bad bytes")
                finally:
                    client.close()
            except (OSError, AssertionError) as exc:
                problems.append("a fresh client of the healthy service failed: %r" % exc)
        return problems

    def notes(self):
        sent = sum(t.bytes_sent for t in self.traffic)
        return ["healthy service: %d round trips, %d connections, %.1f MiB echoed, "
                "sha256 equal; relay warnings logged: %d"
                % (sum(t.round_trips for t in self.traffic),
                   sum(t.connections for t in self.traffic), sent / 1048576.0,
                   self.watch.warnings)]

    def close(self):
        problems = []
        for traffic in self.traffic:
            traffic.stop()
        if self.healthy is not None:
            left = self.healthy.close()
            if left:
                problems.append("healthy service threads still running: %s" % left)
        problems.extend(self._stop_relay())
        left = join_threads([t for t in threading.enumerate() if t not in self.threads_before
                             and not t.name.startswith("fuzz-worker")])
        if left:
            problems.append("threads left running after the relay closed: %s" % left[:10])
        return problems

    def _stop_serving(self):
        """Stop taking services (those registered stay, and so do their clients)."""
        if not self._serve.is_alive():
            return []
        self.relay.shutdown()
        self._serve.join(TIMEOUT)
        if self._serve.is_alive():
            return ["serve_forever did not return after shutdown()"]
        return []

    def _stop_relay(self):
        problems = self._stop_serving()
        self.relay.server_close()
        return problems


# -- relay cases: requests, and what the relay must answer -------------------------------------

class Raw(object):
    """JSON text put into a request as it is (NaN, deep nesting, huge literals)."""

    def __init__(self, text):
        self.text = text


def render(value):
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, list) and value and isinstance(value[0], Pair):
        return "{" + ", ".join("%s: %s" % (json.dumps(p.key), render(p.value))
                               for p in value) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(render(v) for v in value) + "]"
    return json.dumps(value)


Pair = collections.namedtuple("Pair", "key value")

FIELDS = ("version", "port", "name", "max_wait", "notices", "lease", "heartbeat",
          "proxy_protocol", "auth")
WRONG_VALUES = ("1", "", "x" * 70, 1, 0, -1, 1.5, True, False, None, [], {}, [1, 2],
                {"a": 1}, Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e3"),
                Raw("-0"), Raw("1E400"))
HUGE = (10 ** 30, -10 ** 30, 2 ** 31, 2 ** 63, 2 ** 64 + 1, 1e308, -1e308, 65536, 65535,
        10 ** 9, 10 ** 9 + 1, Raw("9" * 300), Raw("0." + "0" * 300 + "1"))
NAMES = ("", "x" * 64, "x" * 65, "a\nb", "tab\there", "\x7f", "\u540d\u5b57", "\u200b",
         "\ud800", " ", "ok-name")
LEASES = ("", "x" * 128, "x" * 129, "\x00abc", "\u00b2-abc", "\u0663-abc", "\u00b9\u00b2-x",
          "\u2460-x", "99999-x", "-", "0-abc", "65536-x", "12345678901234567890-x",
          "\U0001d7d8-x", "abc", "7-", "%d-deadbeef")
AUTHS = ("HMAC-SHA256", "hmac-sha1", "none", "", " hmac-sha256", 1, None, ["hmac-sha256"])
VERSIONS = (0, 2, -1, "1", 1.0, True, None, 10 ** 20, Raw("1.0"), Raw("1e0"))


def _set(body, key, value):
    for i, pair in enumerate(body):
        if pair.key == key:
            body[i] = Pair(key, value)
            return
    body.append(Pair(key, value))


def _nested(rng):
    depth = rng.choice([3, 30, 200, 999, 1001, 2000])
    if rng.random() < 0.5:
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a": ' * depth + "1" + "}" * depth)


def gen_request(rng, env, label):
    """A registration request line: valid-ish fields, then mutations; bytes."""
    body = []
    if rng.random() < 0.7:
        body.append(Pair("version", 1))
    if rng.random() < 0.5:
        body.append(Pair("name", "fuzz-%d" % rng.randint(0, 999)))
    if rng.random() < 0.3:
        body.append(Pair("notices", rng.random() < 0.5))
    if rng.random() < 0.2:
        body.append(Pair("max_wait", rng.choice([0, 0.1, 5, 30])))
    if rng.random() < 0.3:
        body.append(Pair("heartbeat", rng.random() < 0.6))
    if rng.random() < 0.15:
        body.append(Pair("proxy_protocol", rng.choice(["v1", "v2"])))
    if rng.random() < 0.15:
        body.append(Pair("lease", "%d-%s" % (rng.choice(env.ports), "ab" * 16)))
    if rng.random() < 0.06:
        body.append(Pair("port", rng.choice([env.healthy_port, rng.choice(env.ports),
                                             rng.randint(1, 65535)])))
    if rng.random() < 0.9:
        body.append(Pair("auth", AUTH_METHOD))
    rng.shuffle(body)
    for _ in range(rng.choice([0, 0, 0, 0, 1, 1, 1, 2, 3])):
        op = rng.randrange(11)
        key = rng.choice(FIELDS)
        if op == 0:
            _set(body, key, rng.choice(WRONG_VALUES))
            label.append("wrong-type:" + key)
        elif op == 1:
            _set(body, rng.choice(["port", "max_wait", "version", "max_wait"]), rng.choice(HUGE))
            label.append("huge-number")
        elif op == 2:
            _set(body, rng.choice(["x-deep", key]), _nested(rng))
            label.append("deep-nesting")
        elif op == 3:
            _set(body, "version", rng.choice(VERSIONS))
            label.append("bad-version")
        elif op == 4:
            body.append(Pair("x-%d" % rng.randint(0, 99), rng.choice(
                [1, "text", None, [1, {"b": [2]}], {"nested": {"k": "v"}}, True])))
            label.append("unknown-field")
        elif op == 5:
            lease = rng.choice(LEASES)
            if "%d" in lease:
                lease = lease % rng.choice([env.healthy_port] + env.ports)
            _set(body, "lease", lease if rng.random() < 0.9 else rng.choice([12, [], None]))
            label.append("bad-lease")
        elif op == 6:
            _set(body, "name", rng.choice(NAMES + (rng.randint(0, 9), None)))
            label.append("bad-name")
        elif op == 7:
            _set(body, "auth", rng.choice(AUTHS))
            label.append("bad-auth")
        elif op == 8:
            body.append(Pair(key, rng.choice(WRONG_VALUES + (1, True, "v1"))))
            label.append("duplicate-key")
        elif op == 9:
            _set(body, rng.choice(["notices", "heartbeat"]), rng.choice([None, 0, 1, "true"]))
            label.append("bad-flag")
        else:
            body = [p for p in body if p.key != key]
            label.append("drop:" + key)
    text = render(body) if body else "{}"
    pick = rng.random()
    if pick < 0.04:
        text = rng.choice(["[%s]" % text, "null", "1", '"auth"', "true", "[]", ""])
        label.append("not-an-object")
    elif pick < 0.10:
        text = text[:rng.randrange(len(text) + 1)]
        label.append("truncated")
    elif pick < 0.14:
        i = rng.randrange(len(text))
        text = text[:i] + rng.choice(["'", ",", "}", "{", "\\", '"', ":", " ", "\t"]) + text[i + 1:]
        label.append("char")
    elif pick < 0.16:
        text = text.rstrip("}") + ", }"
        label.append("trailing-comma")
    line = text.encode("utf-8", "surrogatepass")
    pick = rng.random()
    if pick < 0.04:
        i = rng.randrange(len(line) + 1)
        line = line[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]) + line[i:]
        label.append("bad-utf8")
    elif pick < 0.06:
        line = b"\xef\xbb\xbf" + line
        label.append("bom")
    elif pick < 0.09:
        line = rng.choice([b" ", b"\t", b"\r", b"\x0b", b"  \r"]) + line + \
            rng.choice([b" ", b"\r", b"\x0c", b""])
        label.append("whitespace")
    elif pick < 0.12:
        line = line.rstrip(b"}") + b', "pad": "' + b"p" * rng.choice(
            [MAX_REQUEST - len(line) - 14, MAX_REQUEST - len(line) - 13, 5000]) + b'"}'
        label.append("long")
    line += b"\n" if rng.random() < 0.9 else rng.choice([b"\r\n", b"\n\n"])
    pick = rng.random()
    if pick < 0.06:
        line = line.rstrip(b"\n")
        label.append("no-newline")
    elif pick < 0.12:
        line += rng.choice([b'{"hmac": "00"}\n', b"garbage\n", b"\n", b" ", b'{"ping": 1}\n',
                            b"more without newline"])
        label.append("extra-line")
    elif pick < 0.14:
        line = b"\n" if rng.random() < 0.5 else b"   \n"
        label.append("empty")
    return line


def hmac_answer(secret, nonce):
    return hmac.new(secret, AUTH_CONTEXT + nonce, hashlib.sha256).hexdigest()


class Verdict(object):
    """What the relay may answer next. ``allowed``: statuses in the next reply
    ("challenge", "ok", "error", "waiting"), or "timeout" (an error, but only after
    the handshake timeout), or "quiet" (nothing at all for now)."""

    def __init__(self, allowed, why, body=None):
        self.allowed = set(allowed)
        self.why = why
        self.body = body

    def __repr__(self):
        return "<%s: %s>" % ("/".join(sorted(self.allowed)), self.why)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


MAX_JSON_DEPTH = 32   # docs/PROTOCOL.md 2.2: a request nested deeper is refused


def _json_depth(value):
    """How deep arrays and objects nest in ``value`` (a scalar: 0), without recursion."""
    deepest = 0
    todo = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        todo.extend((child, depth + 1) for child in children)
    return deepest


def judge_request(sent, half_closed):
    """docs/PROTOCOL.md 2.2 and 2.6, for a relay that requires the secret."""
    newline = sent.find(b"\n")
    if newline < 0:
        if len(sent) > MAX_REQUEST:
            return Verdict(["error"], "no newline in %d bytes" % len(sent)), b""
        if not half_closed:
            return Verdict(["timeout"], "the request never ends"), b""
        line, rest = sent, b""
    else:
        line, rest = sent[:newline + 1], sent[newline + 1:]
        if len(line) > MAX_REQUEST:
            return Verdict(["error"], "a request line of %d bytes" % len(line)), rest
    text = line.rstrip(b"\n").strip(b" \t\r\n\x0b\x0c")
    if not text:
        return Verdict(["error"], "the minimal form, and the relay requires a secret"), rest
    try:
        body = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return Verdict(["error"], "not JSON"), rest
    if not isinstance(body, dict):
        return Verdict(["error"], "not an object"), rest
    if _json_depth(body) > MAX_JSON_DEPTH:
        return Verdict(["error"], "nested deeper than %d levels" % MAX_JSON_DEPTH), rest
    errors, doubts = [], []
    version = body.get("version", 1)
    if not _is_int(version) or version != 1:
        errors.append("version %r" % (version,))
    port = body.get("port")
    if port is not None and (not _is_int(port) or not 1 <= port <= 65535):
        errors.append("port %r" % (port,))
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= 64
                             or not name.isprintable()):
        errors.append("name %r" % (name,))
    max_wait = body.get("max_wait")
    if max_wait is not None:
        if isinstance(max_wait, bool) or not isinstance(max_wait, (int, float)) \
                or not max_wait >= 0:
            errors.append("max_wait %r" % (max_wait,))
        elif max_wait > 10 ** 6:
            doubts.append("max_wait %r" % (max_wait,))   # the docs set no upper bound
    for flag in ("notices", "heartbeat"):
        if flag in body and not isinstance(body[flag], bool):
            errors.append("%s %r" % (flag, body[flag]))
    lease = body.get("lease")
    if lease is not None:
        if not isinstance(lease, str):
            errors.append("lease %r" % (lease,))
        elif not lease or len(lease) > 128 or not lease.isprintable():
            doubts.append("lease %r" % (lease,))        # the docs only say "string"
    if body.get("proxy_protocol") not in (None, "v1", "v2"):
        errors.append("proxy_protocol %r" % (body.get("proxy_protocol"),))
    if body.get("auth") != AUTH_METHOD:
        errors.append("auth %r" % (body.get("auth"),))
    for key in ("name", "port", "proxy_protocol"):
        if key in body and body[key] is None:
            doubts.append("%s null" % key)
    if errors:
        return Verdict(["error"], "; ".join(errors)), rest
    if doubts:
        return Verdict(["error", "challenge"], "; ".join(doubts), body), rest
    return Verdict(["challenge"], "a good request", body), rest


def judge_answer(buffered, eof, nonce):
    """The challenge's answer: the next line on the stream (docs/PROTOCOL.md 2.6)."""
    newline = buffered.find(b"\n")
    if newline < 0:
        if eof:
            return Verdict(["error"], "the stream ended before an answer")
        if len(buffered) > MAX_REQUEST:
            return Verdict(["error"], "an answer of %d bytes" % len(buffered))
        return Verdict(["timeout"], "no answer")
    line = buffered[:newline + 1]
    verdict = ["error"]
    try:
        answer = json.loads(line.decode("utf-8"))
        if isinstance(answer, dict) and answer.get("hmac") == hmac_answer(SECRET, nonce):
            verdict = ["granted"]
    except (UnicodeDecodeError, ValueError, RecursionError):
        pass
    if len(line) > MAX_REQUEST + 1 and verdict == ["granted"]:
        verdict = ["granted", "error"]    # how a long line is cut into reads decides
    return Verdict(verdict, "answer %r" % line[:60])


def judge_port(body, env):
    port = body.get("port")
    if port is None:
        return Verdict(["ok"], "any port")
    if port not in env.ports:
        return Verdict(["error"], "port %d is not in the pool" % port)
    max_wait = body.get("max_wait")
    waiting = ["waiting", "quiet"] + (["error"] if max_wait is not None else [])
    if port == env.healthy_port:
        return Verdict(waiting, "the healthy service holds port %d" % port)
    return Verdict(["ok"] + waiting, "port %d, maybe taken" % port)


# -- relay cases: generation --------------------------------------------------------------------

RelayCase = collections.namedtuple("RelayCase", "kind number mode data plan label")

ANSWERS = ("good",) * 14 + ("good-split",) * 2 + (
    "wrong", "upper", "not-hex", "int", "array", "not-json", "no-newline-eof", "eof", "long",
    "silent")
PINGS = ('{"ping": %d}', '{"ping": %d}', '{"ping": %d, "x": [1]}', '{"ping": "s%d"}',
         '{"pong": %d}', "garbage %d", '[%d]')


def gen_relay_case(seed, number, env):
    rng = case_rng(seed, "relay", number)
    label = []
    pick = rng.random()
    plan = {"end": rng.choice(["shut"] * 17 + ["reset"] * 2 + ["wait"])}
    if pick < 0.12:
        data = rand_bytes(rng, rng.choice([1, 7, 8, 9, 64, rng.randint(1, 3000)]))
        mode = "bytes"
        label.append("random-bytes")
    elif pick < 0.27:
        data = gen_frames(rng, {}, label)
        mode = "frames"
    elif pick < 0.42:
        sid = rng.choice([1, 1, 3, 5])
        request = gen_request(rng, env, label)
        flags = SYN | (FIN if rng.random() < 0.2 else 0)
        data = data_frame(sid, request, flags) + gen_frames(rng, {}, label)
        mode = "syn-garbage"
    else:
        mode = "register"
        plan["end"] = "close"
        data = gen_request(rng, env, label)
        plan["announce"] = rng.random() < 0.8
        plan["cuts"] = sorted(rng.randrange(len(data) + 1) for _ in range(rng.choice([0, 0, 1, 3])))
        plan["half_close"] = rng.random() < (0.7 if b"\n" not in data else 0.1)
        plan["answer"] = rng.choice(ANSWERS)
        if plan["answer"] == "silent" and rng.random() < 0.7:
            plan["answer"] = "good"     # the handshake timeout costs 0.5 s: keep them rare
        if b"\n" not in data and not plan["half_close"] and rng.random() < 0.7:
            plan["half_close"] = True
        plan["probe"] = rng.random() < 0.5
        plan["pings"] = [rng.choice(PINGS) % rng.randint(0, 99)
                         for _ in range(rng.choice([0, 0, 1, 2]))]
    return RelayCase("relay", number, mode, data, plan, "+".join([mode] + label))


# -- relay cases: running -----------------------------------------------------------------------

class Lines(object):
    """JSON-line replies from the relay's side of a registration stream."""

    def __init__(self, stream):
        self.stream = stream
        self.buffer = bytearray()
        self.eof = False

    def next(self, timeout=TIMEOUT):
        """The next reply (a dict with a status), None at EOF; socket.timeout if none comes."""
        line = self.next_line(timeout)
        return None if line is None else parse_reply(line)

    def next_line(self, timeout=TIMEOUT):
        self.stream.settimeout(timeout)
        while b"\n" not in self.buffer:
            if self.eof:
                check(not self.buffer, "the relay's reply has no newline: %r", bytes(self.buffer))
                return None
            chunk = self.stream.recv(65536)
            if not chunk:
                self.eof = True
            self.buffer += chunk
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return line


def parse_reply(line):
    try:
        reply = json.loads(line.decode("utf-8"))
    except ValueError:
        raise CaseFailure("the relay's reply is not JSON: %r" % line[:200])
    check(isinstance(reply, dict) and reply.get("status") in REPLY_STATUSES,
          "the relay's reply has no known status: %r", line[:200])
    if reply["status"] == "error":
        check(isinstance(reply.get("error"), str) and reply["error"],
              "an error reply without a reason: %r", reply)
    if reply["status"] == "challenge":
        check(reply.get("method") == AUTH_METHOD and isinstance(reply.get("nonce"), str)
              and re.match(r"^[0-9a-f]{64}$", reply["nonce"]), "a malformed challenge: %r", reply)
    return reply


class Clock(object):
    """Time against the relay's own handshake deadline for one connection.

    The relay's ServiceLink sets the deadline when it accepts the connection,
    which on a loaded machine can be well after our connect: so the clock
    looks the link up (by our local port) and keeps its deadline. Until it has
    found the link, our own clock, started before the connect (so never behind
    the relay's), stands in.
    """

    def __init__(self, env=None):
        self.start = time.monotonic()
        self.env = env
        self.local_port = None
        self._deadline = None

    def elapsed(self):
        return time.monotonic() - self.start

    def deadline(self):
        """The relay's deadline (time.monotonic()), None while its link is unknown."""
        if self._deadline is None and self.env is not None and self.local_port is not None:
            for link in self.env.links_of(self.local_port):
                self._deadline = link._handshake_deadline
        return self._deadline

    def passed(self):
        """True once the relay's handshake deadline for this connection has passed."""
        deadline = self.deadline()
        if deadline is None:
            return self.elapsed() >= HANDSHAKE_TIMEOUT
        return time.monotonic() >= deadline


# docs/PROTOCOL.md 2: a registration not done by the handshake timeout is dropped.
DROPPED = {"status": "dropped"}


def expect_reply(lines, verdict, clock, step, handshake=True):
    """Read the next reply and check it against ``verdict``; returns it (None for quiet,
    DROPPED if the relay ended the session at its handshake deadline). ``handshake``:
    False once the relay has taken the registration (no deadline any more)."""
    quiet = "quiet" in verdict.allowed or verdict.allowed == {"waiting"}
    try:
        reply = lines.next(QUIET if quiet else TIMEOUT)
    except socket.timeout:
        check(quiet, "hang: no reply to the %s within %gs (expected %r)", step, TIMEOUT, verdict)
        return None
    except (muxado.MuxadoError, OSError) as exc:
        # At its handshake deadline the relay drops the connection, with or without
        # an error line first; before it, only an answer may end the session.
        if handshake and clock.passed():
            return DROPPED
        raise CaseFailure("the relay ended the session instead of answering the %s "
                          "(expected %r): %r" % (step, verdict, exc))
    if reply is None and handshake and clock.passed():
        return DROPPED
    check(reply is not None, "the relay closed the registration stream without answering the "
          "%s (expected %r)", step, verdict)
    status = reply["status"]
    timed_out = status == "error" and "not finished within" in reply["error"]
    if timed_out and handshake:
        check(clock.passed(), "the relay timed out the handshake after only %.3fs (before its "
              "deadline)", clock.elapsed())
        return reply
    if status == "error" and "timeout" in verdict.allowed:
        raise CaseFailure("the relay answered the %s with %r, expected a handshake timeout"
                          % (step, reply))
    check(status in verdict.allowed, "the relay answered the %s with %r; expected %r",
          step, reply, verdict)
    return reply


def answer_bytes(plan, nonce):
    good = (json.dumps({"hmac": hmac_answer(SECRET, nonce)}) + "\n").encode("ascii")
    kind = plan["answer"]
    return {
        "good": good, "good-split": good,
        "wrong": (json.dumps({"hmac": hmac_answer(b"not the secret", nonce)}) + "\n").encode(),
        "upper": (json.dumps({"hmac": hmac_answer(SECRET, nonce).upper()}) + "\n").encode(),
        "not-hex": b'{"hmac": "zz"}\n', "int": b'{"hmac": 12}\n', "array": b"[1]\n",
        "not-json": b"hello\n", "no-newline-eof": good.rstrip(b"\n"), "eof": b"",
        "long": good.rstrip(b"\n") + b" " * 5000 + b"\n", "silent": b"",
    }[kind]


def _write(action, verdict, clock, step):
    """Run one of our writes; False if the relay had already closed the connection,
    which is only right if it may have refused us (or timed us out) first."""
    try:
        action()
        return True
    except (muxado.MuxadoError, OSError) as exc:
        check(verdict.allowed & {"error", "timeout"} or clock.passed(),
              "the relay closed the connection before our %s (expected %r): %r",
              step, verdict, exc)
        return False


def run_register_case(case, env):
    """A real muxado client registers with a mutated request and answers the challenge
    as the plan says; every reply is checked against the oracle."""
    plan = case.plan
    clock = Clock(env)     # before the connect: the relay's deadline starts after it
    try:
        sock = env.dial()
    except (ssl.SSLError, ConnectionError) as exc:
        # TLS shares the handshake deadline (relay.py): on a loaded machine it may pass.
        check(env.client_tls is not None and clock.elapsed() >= HANDSHAKE_TIMEOUT,
              "the TLS handshake failed: %r", exc)
        return "dropped at the handshake timeout (TLS)"
    local_port = sock.getsockname()[1]
    clock.local_port = local_port
    env.watch.port_is(local_port, (case.kind, case.number))
    transport = sock if env.client_tls is None else tls.TLSTransport(sock)
    session = muxado.client(transport, name="fuzz-%s%d" % (LETTER_OF[case.kind], case.number),
                            write_timeout=5.0)
    try:
        outcome = _register(case, env, session, clock)
    except CaseFailure as exc:
        raise CaseFailure("%s\n  our session: %s, the relay's GOAWAY %r, %.3fs after the "
                          "connect, the relay's deadline %s" % (
                              exc, session.error, session.remote_goaway, clock.elapsed(),
                              "passed" if clock.passed() else "not passed"))
    finally:
        session.close()
    check(session.wait(TIMEOUT), "hang: our session did not end")
    _relay_side_done(env, local_port)
    return outcome


def _register(case, env, session, clock):
    plan = case.plan
    closed_early = "answered: error (the relay closed before our last write)"
    if plan.get("late"):
        # (Regression tests only: a stall past the relay's deadline, as on a loaded machine.)
        end = time.monotonic() + TIMEOUT
        while (clock.deadline() is None or not clock.passed()) and time.monotonic() < end:
            time.sleep(0.01)
    clock.deadline()     # the relay's link is there now, unless it is already done with us
    try:
        stream = session.open(announce=plan["announce"])
    except muxado.MuxadoError as exc:
        check(clock.passed(), "the relay ended the session before we opened a stream: %r", exc)
        return _dropped(session, clock)
    stream.settimeout(TIMEOUT)
    lines = Lines(stream)
    verdict, rest = judge_request(case.data, plan["half_close"])
    writing = verdict
    if "challenge" in verdict.allowed and b"\n" in rest:
        # A line after the request is the answer, and a wrong one (the nonce is
        # not known yet): the relay may refuse it and close before our last
        # write goes (seen on a loaded machine: seed 7000, tls case 103).
        writing = Verdict(verdict.allowed | {"error"}, verdict.why, verdict.body)
    cuts = plan["cuts"]
    for piece in [case.data[a:b] for a, b in zip([0] + cuts, cuts + [None])]:
        if piece and not _write(lambda: stream.sendall(piece), writing, clock, "request"):
            return closed_early
    if plan["half_close"] and not _write(stream.close_write, writing, clock, "FIN"):
        return closed_early
    reply = expect_reply(lines, verdict, clock, "request")
    if reply is not None and reply["status"] == "challenge":
        nonce = binascii.unhexlify(reply["nonce"])
        eof = plan["half_close"]
        answer = b""
        if not eof and b"\n" not in rest:
            # (A line sent after the request is the answer: then nothing more is read.)
            answer = answer_bytes(plan, nonce)
        verdict = judge_answer(rest + answer, eof or plan["answer"] in ("no-newline-eof", "eof"),
                               nonce)
        if "granted" in verdict.allowed:
            granted = judge_port(reply_body(case.data), env)
            verdict = Verdict(granted.allowed | (verdict.allowed - {"granted"}), granted.why)
        writes = [answer[:10], answer[10:]] if plan["answer"] == "good-split" else [answer]
        if not eof and not rest and plan["answer"] in ("no-newline-eof", "eof"):
            writes.append(None)
        for piece in writes:
            action = stream.close_write if piece is None else (lambda: stream.sendall(piece))
            if (piece is None or piece) and not _write(action, verdict, clock, "answer"):
                return closed_early
        reply = expect_reply(lines, verdict, clock, "answer")
        while reply is not None and reply["status"] == "waiting":
            check(_is_int(reply.get("position")) and reply["position"] >= 1,
                  "a waiting notice without a position: %r", reply)
            reply = expect_reply(lines, Verdict(verdict.allowed | {"quiet"}, verdict.why),
                                 clock, "wait", handshake=False)
    if reply is None:
        return "answered: waiting in line"
    if reply is DROPPED:
        return _dropped(session, clock)
    if reply["status"] == "ok":
        return "answered: ok" + _after_ok(case, env, session, stream, lines, reply)
    check(lines.next(TIMEOUT) is None, "more after the relay's error reply")
    check(session.wait(TIMEOUT), "hang: the relay kept the session after its error reply")
    goaway = session.remote_goaway
    check(goaway is not None and goaway[1] == ErrorCode.NO_ERROR,
          "after its error reply the relay ended the session with %r", goaway)
    return "answered: error"


def _dropped(session, clock):
    """The relay dropped us at its handshake deadline: the session must end, and
    the relay's GOAWAY (if it got one out) says NO_ERROR."""
    check(session.wait(TIMEOUT), "hang: the relay's session did not end after a drop")
    goaway = session.remote_goaway
    check(goaway is None or goaway[1] == ErrorCode.NO_ERROR,
          "the relay dropped the connection at its deadline with %r", goaway)
    return "dropped at the handshake timeout"


def reply_body(data):
    verdict, _ = judge_request(data, True)
    return verdict.body or {}


def _after_ok(case, env, session, stream, lines, reply):
    """Check an ok reply and prove it: a client on the granted port reaches us."""
    body = reply_body(case.data)
    port = reply.get("port")
    check(_is_int(port) and port in env.ports and port != env.healthy_port,
          "ok with port %r (the pool is %d-%d, the healthy service has %d)", port,
          env.ports[0], env.ports[-1], env.healthy_port)
    check(reply.get("address") == "127.0.0.1:%d" % port and reply.get("version") == 1,
          "ok reply with a wrong address or version: %r", reply)
    check(isinstance(reply.get("lease"), str) and reply["lease"].startswith("%d-" % port)
          and reply.get("lease_seconds") == LEASE_TIME, "ok reply with a bad lease: %r", reply)
    heartbeat = bool(body.get("heartbeat"))
    check(isinstance(reply.get("heartbeat"), dict) == heartbeat,
          "heartbeat %s but the ok reply says %r", heartbeat, reply.get("heartbeat"))
    extra = ""
    if case.plan["probe"]:
        extra += _probe_public_port(case, session, port, body.get("proxy_protocol"))
    if heartbeat:
        extra += _heartbeat(case, session, stream, lines)
    else:
        check(lines.next(TIMEOUT) is None, "the relay kept the registration stream open "
              "without a heartbeat")
    return extra


def _probe_public_port(case, session, port, proxy_protocol):
    client = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT)
    try:
        stream = session.accept(timeout=TIMEOUT)
        stream.settimeout(TIMEOUT)
        check(stream.id % 2 == 0, "the relay opened odd stream %d", stream.id)
        if proxy_protocol:
            source, destination = proxyproto.read_header(stream)
            check(tuple(source[:2]) == client.getsockname()[:2], "the PROXY header names %r, "
                  "the client is %r", source, client.getsockname())
        message = b"hello %d" % case.number
        client.sendall(message)
        check(recv_exact(stream, len(message)) == message, "the client's bytes came wrong")
        stream.sendall(message[::-1])
        check(recv_exact(client, len(message)) == message[::-1], "our bytes came wrong")
        stream.close()
        check(client.recv(1) == b"", "the client got more than we sent")
    finally:
        client.close()
    return ", client served"


def _heartbeat(case, session, stream, lines):
    for ping in case.plan["pings"]:
        stream.sendall(ping.encode() + b"\n")
        try:
            sent = json.loads(ping)
        except ValueError:
            sent = None
        if not isinstance(sent, dict):
            # A bad heartbeat line: the relay must drop the session.
            check(session.wait(TIMEOUT), "hang: the relay kept a session whose heartbeat "
                  "line was %r", ping)
            return ", bad heartbeat dropped"
        if "ping" in sent:
            line = lines.next_line(TIMEOUT)
            check(line is not None, "the relay ended the heartbeat instead of answering %r", ping)
            check(json.loads(line.decode("utf-8")) == {"pong": sent["ping"]},
                  "ping %r answered with %r", ping, line[:200])
    return ", heartbeat"


def _relay_side_done(env, local_port):
    """The relay's thread for our connection must finish once we are gone."""
    for link in env.links_of(local_port):
        try:
            done = link.join(TIMEOUT)
        except RuntimeError:
            continue   # not started yet (serve_forever lists it first): checked at the end
        check(done, "hang: the relay still serves %r after the case", link)


def run_raw_relay_case(case, env):
    """Bytes straight at the service port: the relay must end the session cleanly,
    with well-formed frames, a GOAWAY last, and only well-formed replies."""
    started = time.monotonic()
    try:
        sock = env.dial()
    except (ssl.SSLError, ConnectionError) as exc:
        check(env.client_tls is not None and time.monotonic() - started >= HANDSHAKE_TIMEOUT,
              "the TLS handshake failed: %r", exc)
        return "dropped at the handshake timeout (TLS)"
    local_port = sock.getsockname()[1]
    env.watch.port_is(local_port, (case.kind, case.number))
    raw = RawSide(sock)
    analysis = analyse(case.data)
    allowed = set(analysis.maybe) | {ErrorCode.NO_ERROR}
    if len(case.data) > PENDING_BUDGET:
        # A connection that never registers may send only so much (relay.py).
        allowed.add(ErrorCode.ENHANCE_YOUR_CALM)
    if analysis.fault is not None:
        allowed.add(analysis.fault[1])
    if len(case.data) > PENDING_READ_BUDGET:
        # More than a connection may send before it has registered.
        allowed.add(ErrorCode.ENHANCE_YOUR_CALM)
    end = case.plan["end"]
    try:
        raw.send(case.data)
        if end == "reset":
            abort(sock)
            _relay_side_done(env, local_port)
            return "reset by us"
        if end == "shut":
            raw.shutdown_write()
            allowed.add(ErrorCode.PEER_EOF)
        frames = raw.read_to_eof()
    finally:
        sock.close()
    opened = set(analysis.syns)
    payloads = collections.defaultdict(bytearray)
    for f in frames:
        check(f.type in (RST, DATA, WNDINC, GOAWAY) and not f.sid & RESERVED,
              "the relay sent a bad frame: %s", describe([f]))
        if f.type == DATA:
            check(f.sid in opened and not f.flags & ~FIN, "DATA the relay should not send: %s",
                  describe([f]))
            payloads[f.sid] += f.body
        elif f.type == RST:
            check(f.length == 4 and f.sid in analysis.ids and U32.unpack(f.body)[0]
                  in SESSION_RST_CODES, "a bad RST from the relay: %s", describe([f]))
        elif f.type == WNDINC:
            check(f.length == 4 and f.sid in opened and 0 < U32.unpack(f.body)[0] <= MAX_ID,
                  "a bad WNDINC from the relay: %s", describe([f]))
    statuses = []
    for sid, payload in payloads.items():
        lines = bytes(payload).split(b"\n")
        check(lines[-1] == b"", "the relay's reply on stream %d has no newline: %r",
              sid, lines[-1][:100])
        for line in lines[:-1]:
            statuses.append(parse_reply(line)["status"])
    check("ok" not in statuses, "the relay registered a raw connection that never answered "
          "its challenge")
    code = check_goaway_last(frames, "the relay")
    if code is None:
        check(raw.reset, "the relay closed the connection without GOAWAY: %s", describe(frames))
        outcome = "relay reset the connection" if raw.alert is None else "relay sent a TLS alert"
    else:
        check(code in allowed, "the relay ended the session with %s; allowed: %s; %s",
              code_name(code), ", ".join(sorted(code_name(c) for c in allowed)), describe(frames))
        outcome = "relay ended %s" % code_name(code)
    if statuses:
        outcome += ", after %s" % "+".join(sorted(set(statuses)))
    _relay_side_done(env, local_port)
    return outcome


def relay_case_for(seed, number, env, make_case=None, kind="relay"):
    case = (make_case or gen_relay_case)(seed, number, env)._replace(kind=kind)
    try:
        if case.mode == "register":
            outcome = run_register_case(case, env)
        elif case.mode.startswith("tls-"):
            outcome = run_tls_garbage_case(case, env)
        else:
            outcome = run_raw_relay_case(case, env)
        errors = env.watch.errors_for((kind, number))
        check(not errors, "logged or raised in a thread:\n%s", "\n".join(errors[:3]))
    except (CaseFailure, OSError, muxado.MuxadoError) as exc:
        text = str(exc) if isinstance(exc, CaseFailure) else "%r\n%s" % (
            exc, traceback.format_exc())
        errors = env.watch.errors_for((kind, number))
        if errors and "logged or raised" not in text:
            text += "\n  the relay logged:\n%s" % "\n".join(errors[:2])
        raise CaseFailure("%s\n  case: %s, plan %r\n  bytes: %s"
                          % (text, case.label, case.plan, hexdump(case.data)))
    return Outcome(case, "%s: %s" % (case.mode, outcome))


def run_relay_fuzz(seed, numbers, workers=16, report=None, progress=None, make_case=None,
                   max_failures=None, kind="relay"):
    """Run relay cases ``numbers`` for ``seed`` against one live relay; returns a Report.

    ``make_case(seed, n, env)`` replaces the generator (regression tests run fixed cases).
    ``kind="tls"``: the relay and every connection to it use TLS (see gen_tls_case).
    """
    use_tls = kind == "tls"
    if use_tls and make_case is None:
        make_case = gen_tls_case
    report = report or Report(seed)
    started = time.monotonic()
    numbers = _as_range(numbers)
    vector_corpus()
    problems = []
    fds = open_fds()
    ran = 0
    with Watch() as watch:
        env = RelayEnv(seed, watch, use_tls)
        try:
            ran = run_pool(numbers, lambda n: relay_case_for(seed, n, env, make_case, kind),
                           workers, progress, max_failures=max_failures,
                           record=report.recorder(kind))
            problems.extend(env.finish())
            report.notes.extend(env.notes())
        finally:
            problems.extend(env.close())
        stray = watch.unattributed(kind, numbers)
    report.note_skipped(kind, numbers, ran)
    for problem in problems:
        report.fail_run(kind, problem)
    for text in stray:
        report.fail_run(kind, "logged or raised outside any case:\n" + text)
    if open_fds() != fds:
        report.fail_run(kind, "open files: %s before, %s after" % (fds, open_fds()))
    report.elapsed += time.monotonic() - started
    return report


def describe_case(case, limit=4096):
    """A case in full (for --replay): what it is and its bytes."""
    lines = ["%s case %d: %s" % (case.kind, case.number, case.label)]
    if case.kind == "session":
        lines.append("options %r, tidy=%s, end=%s, presend=%s"
                     % (case.options, case.tidy, case.end, case.presend))
        analysis = analyse(case.data, case.options.get("flood_limit", (DEFAULT_BURST,))[0])
        fault = analysis.fault
        lines.append("model: %s" % ("frame %d breaks the rules (%s)" % (fault[0], code_name(fault[1]))
                                     if fault else "no fault; %d bytes short of a whole frame"
                                     % analysis.need if analysis.need else "no fault"))
    else:
        lines.append("mode %s, plan %r" % (case.mode, case.plan))
    lines.append("bytes (%d): %s" % (len(case.data), hexdump(case.data, limit)))
    return "\n".join(lines)


# -- kinds beside session and relay: a shared runner ----------------------------------------------

def run_simple_fuzz(kind, seed, numbers, case_for, workers=16, report=None, progress=None,
                    max_failures=None):
    """Run ``case_for(n, pairs, watch)`` (an Outcome) for each n; returns a Report.

    The run must leave no thread or descriptor behind, and log no error outside its cases.
    """
    report = report or Report(seed)
    started = time.monotonic()
    numbers = _as_range(numbers)
    fds = open_fds()
    pairs = Pairs()
    before = set(threading.enumerate())
    try:
        with Watch() as watch:
            ran = run_pool(numbers, lambda n: case_for(n, pairs, watch), workers, progress,
                           max_failures=max_failures, record=report.recorder(kind))
            stray = watch.unattributed(kind, numbers)
    finally:
        pairs.close()
    report.note_skipped(kind, numbers, ran)
    for text in stray:
        report.fail_run(kind, "logged or raised outside any case:\n" + text)
    left = join_threads([t for t in threading.enumerate()
                         if t not in before and not t.name.startswith("fuzz-worker")])
    if left:
        report.fail_run(kind, "threads left running: %s" % left[:10])
    if open_fds() != fds:
        report.fail_run(kind, "open files: %s before, %s after" % (fds, open_fds()))
    report.elapsed += time.monotonic() - started
    return report


def _threads_done(*names):
    left = join_threads(threads_named(*names))
    check(not left, "threads left running: %s", left)


# -- proxy cases: PROXY protocol headers (tcprelay/proxyproto.py read_header) --------------------
#
# A header, valid or not (HAProxy's spec, written out here), mutated now and
# then, with the client's own bytes after it, over loopback TCP or a muxado
# stream, with or without EOF. read_header must return (only for a whole
# header, with well-formed addresses, the right ones for a header left valid)
# or raise ProxyHeaderError; wait only while the header is incomplete and the
# connection open (then socket.timeout at the connection's timeout); and never
# take a byte past the header.

ProxyCase = collections.namedtuple("ProxyCase", "kind number data expect pieces eof transport "
                                                "label")
PROXY_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V1_MAX = 107           # the spec's longest v1 line, CRLF included
PROXY_OPEN_WAIT = 0.2        # the connection's timeout when we send no EOF


def _rand_ip(rng, version):
    bits = rng.choice([0, rng.getrandbits(8 if version == 4 else 16), rng.getrandbits(
        32 if version == 4 else 128)])
    return str(ipaddress.ip_address(bits) if version == 4 else ipaddress.IPv6Address(bits))


def _v2(ver_cmd, fam, body, length=None):
    return PROXY_SIGNATURE + bytes([ver_cmd & 255, fam & 255]) + struct.pack(
        ">H", len(body) if length is None else length) + body


def gen_proxy_case(seed, number):
    rng = case_rng(seed, "proxy", number)
    label = []
    expect = None
    pick = rng.random()
    if pick < 0.25:
        version = rng.choice([4, 6])
        src, dst = (_rand_ip(rng, version), rng.randint(0, 65535)), \
            (_rand_ip(rng, version), rng.randint(0, 65535))
        header = ("PROXY TCP%d %s %s %d %d\r\n" % (version, src[0], dst[0], src[1], dst[1])
                  ).encode("ascii")
        expect = (src, dst)
        label.append("v1")
    elif pick < 0.45:
        version = rng.choice([4, 6])
        src, dst = (_rand_ip(rng, version), rng.randint(0, 65535)), \
            (_rand_ip(rng, version), rng.randint(0, 65535))
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        body = socket.inet_pton(family, src[0]) + socket.inet_pton(family, dst[0]) + \
            struct.pack(">HH", src[1], dst[1])
        tlv = rand_bytes(rng, rng.choice([0, 0, 0, 3, 40]))    # TLVs are skipped
        header = _v2(0x21, 0x11 if version == 4 else 0x21, body + tlv)
        expect = (src, dst)
        label.append("v2")
    elif pick < 0.65:
        ports = ["0", "65535", "65536", "70000", "-1", "+80", "1_0", "080", "", "0x10",
                 "\u0663", str(rng.randint(0, 65535))]
        hosts = ["1.2.3.4", "::1", "01.2.3.4", "1.2.3", "::ffff:1.2.3.4", "fe80::1%eth0",
                 "", "x", _rand_ip(rng, 4), _rand_ip(rng, 6)]
        fields = [rng.choice(["TCP4", "TCP6", "TCP4", "TCP6", "UNKNOWN", "UDP4", "tcp4", ""]),
                  rng.choice(hosts), rng.choice(hosts), rng.choice(ports), rng.choice(ports)]
        if rng.random() < 0.2:
            del fields[rng.choice([4, 4, 1])]                 # a field too few
        elif rng.random() < 0.1:
            fields.append(str(rng.randint(0, 9)))             # one too many
        line = "PROXY " + rng.choice([" ", " ", " ", "  ", "\t"]).join(fields)
        header = line.encode("utf-8") + rng.choice([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r",
                                                    b" \r\n", b""])
        label.append("v1-fields")
    elif pick < 0.85:
        body = rand_bytes(rng, rng.choice([0, 4, 11, 12, 35, 36, 100]))
        header = _v2(rng.choice([0x20, 0x21, 0x21, 0x22, 0x11, 0x31, rng.getrandbits(8)]),
                     rng.choice([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, rng.getrandbits(8)]),
                     body, length=rng.choice([None, None, 0, len(body) + 1, 0xFFFF,
                                              rng.getrandbits(16)]))
        label.append("v2-fields")
    elif pick < 0.92:
        header = b"PROXY UNKNOWN" + rng.choice([b"", b" ", b" " + rand_bytes(rng, 20)]) + b"\r\n"
        header = header.replace(b"\r\n", b"..") + b"\r\n" if b"\r\n" in header[:-2] else header
        expect = (None, None) if len(header) <= PROXY_V1_MAX else None
        label.append("unknown")
    else:
        header = rng.choice([rand_bytes(rng, rng.randint(1, 40)), PROXY_SIGNATURE[:rng.randint(
            1, 12)] + rand_bytes(rng, rng.randint(0, 10)), b"PROXY" + rand_bytes(rng, 3),
            b"PROXY " + b"x" * rng.choice([99, 100, 101, 102, 200])])
        label.append("random")
    if rng.random() < 0.3:
        data = bytearray(header)
        for _ in range(rng.randint(1, 2)):
            if not data:
                break
            mutator = rng.choice(BYTE_MUTATORS)
            data = mutator(rng, data)
            label.append(mutator.__name__[2:])
        if bytes(data) != header:
            header, expect = bytes(data), None
    data = header + rand_bytes(rng, rng.choice([0, 1, 5, 64, 300]))
    pieces = sorted(rng.randrange(len(data) + 1) for _ in range(rng.choice([0, 0, 1, 2])))
    eof = rng.random() < 0.92
    transport = rng.choice(["tcp", "stream"])
    if transport == "tcp":
        # read_header on a socket with a timeout takes a header still on its way for
        # one cut off by EOF (MSG_WAITALL does not wait on a socket that is
        # non-blocking inside): a known fault (see the report), kept out of the way
        # here: one write, and no open connection with half a header.
        pieces = []
        if not eof and proxy_model(data)[0] == "short":
            transport = "stream"
    return ProxyCase("proxy", number, data, expect, pieces, eof, transport, "+".join(label))


def proxy_model(data):
    """What the bytes hold, by the spec: ("header", length), ("short", None) while a
    header could still come, or ("bad", None) when no header can start this way."""
    if data[:len(PROXY_SIGNATURE)] == PROXY_SIGNATURE[:len(data)]:
        if len(data) < 16:
            return "short", None
        length = 16 + struct.unpack_from(">H", data, 14)[0]
        return ("header", length) if len(data) >= length else ("short", None)
    if data[:6] == b"PROXY "[:len(data)]:
        end = data[:PROXY_V1_MAX].find(b"\r\n")
        if end >= 0:
            return "header", end + 2
        return ("bad", None) if len(data) >= PROXY_V1_MAX else ("short", None)
    return "bad", None


def _check_address(value, version=None):
    check(isinstance(value, tuple) and len(value) == 2, "a PROXY address %r", value)
    host, port = value
    check(isinstance(port, int) and not isinstance(port, bool) and 0 <= port <= 65535,
          "a PROXY port out of range: %r", value)
    try:
        parsed = ipaddress.ip_address(host)
    except ValueError:
        raise CaseFailure("a PROXY host that is no address: %r" % (value,))
    check(version is None or parsed.version == version,
          "a PROXY address of the wrong family: %r (TCP%s)", value, version)


def run_proxy_case(case, pairs):
    name = "fuzz-p%d" % case.number
    dialer, acceptor = pairs.pair()
    sessions = []
    try:
        if case.transport == "stream":
            sessions = [muxado.client(dialer, name=name + "-c"),
                        muxado.server(acceptor, name=name + "-s")]
            writer = sessions[0].open()
            writer.settimeout(TIMEOUT)
            reader = sessions[1].accept(timeout=TIMEOUT)
            shut = writer.close_write
        else:
            writer, reader = dialer, acceptor
            shut = lambda: dialer.shutdown(socket.SHUT_WR)
        for a, b in zip([0] + case.pieces, case.pieces + [None]):
            if case.data[a:b]:
                writer.sendall(case.data[a:b])
        if case.eof:
            shut()
        reader.settimeout(TIMEOUT if case.eof else PROXY_OPEN_WAIT)
        state, length = proxy_model(case.data)
        try:
            result = proxyproto.read_header(reader)
        except proxyproto.ProxyHeaderError as exc:
            check(state != "short" or case.eof, "ProxyHeaderError (%s) while the header "
                  "was incomplete and the connection open", exc)
            result = exc
        except socket.timeout:
            # (A v2 receiver may wait for the 16 fixed bytes before it looks at them.)
            may_wait = state == "short" or (state == "bad" and len(case.data) < 16
                                             and case.data[:1] == PROXY_SIGNATURE[:1])
            check(may_wait and not case.eof, "socket.timeout, but the bytes hold a %s",
                  "whole header" if state == "header" else "bad start or EOF")
            return "waited (incomplete, open)"
        except Exception as exc:
            raise CaseFailure("read_header raised %r (only ProxyHeaderError may come)\n%s"
                              % (exc, traceback.format_exc()))
        if not isinstance(result, Exception):
            check(state == "header", "read_header returned %r from a %s", result,
                  "bad start" if state == "bad" else "cut-off header")
            source, destination = result
            check((source is None) == (destination is None), "half an address: %r", result)
            if source is not None:
                version = None
                if case.data.startswith(b"PROXY TCP4 ") or case.data.startswith(b"PROXY TCP6 "):
                    version = int(case.data[9:10])
                _check_address(source, version)
                _check_address(destination, version)
            if case.expect is not None:
                expect = tuple(None if a is None else (str(ipaddress.ip_address(a[0])), a[1])
                               for a in case.expect)
                check(result == expect, "read_header returned %r, the header says %r",
                      result, expect)
        # What is left on the connection: all of it after the header, nothing taken past it.
        reader.settimeout(TIMEOUT if case.eof else PROXY_OPEN_WAIT)
        rest = bytearray()
        try:
            while True:
                chunk = reader.recv(65536)
                if not chunk:
                    break
                rest += chunk
        except socket.timeout:
            check(not case.eof, "hang: no EOF after the header")
        taken = len(case.data) - len(rest)
        check(case.data[taken:] == bytes(rest), "the bytes left after read_header are not the "
              "end of what we sent")
        if state == "header":
            check(taken == length, "read_header took %d bytes; the header is %d", taken, length)
            outcome = "read" if not isinstance(result, Exception) else "refused"
        elif state == "bad":
            check(taken == 0, "read_header took %d bytes of a bad start", taken)
            outcome = "bad start"
        else:
            outcome = "cut off"
        return "%s (%s)" % (outcome, case.transport)
    finally:
        for session in sessions:
            session.close()
        dialer.close()
        acceptor.close()
        if sessions:
            _threads_done(*[n + suffix for n in (name + "-c", name + "-s")
                            for suffix in ("", "-writer")])


def proxy_case_for(seed, number, pairs, watch, make_case=None):
    case = (make_case or gen_proxy_case)(seed, number)
    try:
        outcome = run_proxy_case(case, pairs)
        errors = watch.errors_for(("proxy", number))
        check(not errors, "logged or raised in a thread:\n%s", "\n".join(errors[:3]))
    except (CaseFailure, OSError, muxado.MuxadoError) as exc:
        raise CaseFailure("%s\n  case: %s, transport %s, eof %s, pieces %r\n  bytes: %s"
                          % (exc, case.label, case.transport, case.eof, case.pieces,
                             hexdump(case.data)))
    return Outcome(case, outcome)


def run_proxy_fuzz(seed, numbers, workers=16, report=None, progress=None, make_case=None,
                   max_failures=None):
    """PROXY headers through read_header (see above); returns a Report."""
    return run_simple_fuzz("proxy", seed, numbers,
                           lambda n, pairs, watch: proxy_case_for(seed, n, pairs, watch,
                                                                  make_case),
                           workers, report, progress, max_failures)


# -- client cases: the service library against a hostile relay (tcprelay/service.py) --------------
#
# A fake relay on loopback answers service.connect with a script of reply lines
# (challenges, waiting notices, ok and error replies, valid and mutated, split
# as they come), then closes the stream, resets it, ends the session or holds
# on; or it writes mutated muxado frames at the service's session. connect must
# return a working ServiceConnection exactly when the script's first final
# answer is a valid ok (docs/PROTOCOL.md 2.2, 2.6), else fail cleanly with
# RegistrationError, RegistrationRefused, RelayGone, socket.timeout or a
# MuxadoError/OSError; either way, no thread or descriptor left behind. The
# fake relay checks the service's request line and its answer to the challenge.

ClientCase = collections.namedtuple("ClientCase", "kind number data plan label")
CLIENT_SILENCE = 0.3        # the service's timeout when the script ends in silence
CLIENT_FAILURES = (registration.RegistrationError, relay_service.RegistrationRefused,
                   relay_service.RelayGone, socket.timeout, muxado.MuxadoError, OSError)


def _render_any(value):
    if isinstance(value, dict):
        return "{" + ", ".join("%s: %s" % (json.dumps(k), _render_any(v))
                               for k, v in value.items()) + "}"
    return render(value)


def _json_line(body):
    return _render_any(body).encode("utf-8", "surrogatepass") + b"\n"


def _client_reply(rng, kind, plan, label):
    """One reply line of ``kind`` (bytes, newline included), valid or mutated."""
    port = rng.randint(1, 65535)
    if kind == "challenge":
        body = {"status": "challenge", "method": AUTH_METHOD, "nonce": "%064x" % rng.getrandbits(256)}
        if rng.random() < 0.25:
            field = rng.choice(["method", "nonce"])
            body[field] = rng.choice(["hmac-sha1", "", None, 12, [1], "zz", "abc", "0" * 63])
            label.append("bad-challenge:" + field)
    elif kind == "waiting":
        body = {"status": "waiting", "position": rng.choice([1, 2, 0, -1, "x", None, 10 ** 30])}
        if rng.random() < 0.8:
            body["interval"] = rng.choice([3, 0.05, 0, -1, "x", None, True, 1e308, 10 ** 400])
    elif kind == "ok":
        body = {"status": "ok", "address": "localhost:%d" % port, "port": port, "version": 1,
                "lease": "%d-%032x" % (port, rng.getrandbits(128)), "lease_seconds": 30}
        if plan["heartbeat"] and rng.random() < 0.9:
            body["heartbeat"] = {"interval": 5, "timeout": 15}
        if rng.random() < 0.3:
            field = rng.choice(["address", "port", "heartbeat", "interval", "timeout", "version",
                                "lease"])
            value = rng.choice(WRONG_VALUES + (10 ** 400,))
            if field in ("interval", "timeout"):
                body.setdefault("heartbeat", {"interval": 5, "timeout": 15})[field] = value
            elif rng.random() < 0.2:
                body.pop(field, None)
            else:
                body[field] = value
            label.append("bad-ok:" + field)
    elif kind == "error":
        body = {"status": "error", "error": rng.choice(["no", "", "x" * 300, None, 7, [1]])}
        if rng.random() < 0.2:
            del body["error"]
    else:
        line = rng.choice([b"not json\n", b"[1]\n", b"null\n", b'{"status": 1}\n', b"{}\n",
                           b'{"status": "later"}\n', b"\n", b"\xff\xfe\n", b'{"status": NaN}\n',
                           b"x" * (registration.MAX_REPLY + 10) + b"\n",
                           b'{"status": "ok", "address": "a:1"' + b' ' * 10 + b"\n"])
        return line
    line = _json_line(body)
    if rng.random() < 0.05:
        line = rng.choice([b"\xef\xbb\xbf", b" ", b"\r"]) + line
        label.append("prefix")
    return line


def gen_client_case(seed, number):
    rng = case_rng(seed, "client", number)
    label = []
    plan = {"secret": rng.random() < 0.7, "heartbeat": rng.random() < 0.5,
            "after": rng.choice(["hold"] * 4 + ["close-stream", "reset", "close-session"]),
            "split": rng.choice(["whole", "lines", "lines", "chunks"]), "max_wait": None}
    if rng.random() < 0.15:
        plan["mode"] = "frames"
        data = gen_frames(rng, {}, label)
        label.insert(0, "frames")
        return ClientCase("client", number, data, plan, "+".join(label))
    plan["mode"] = "lines"
    kinds = []
    if plan["secret"] and rng.random() < 0.9 or rng.random() < 0.1:
        kinds.append("challenge")
    kinds.extend(["waiting"] * rng.choice([0, 0, 1, 2]))
    kinds.append(rng.choice(["ok"] * 6 + ["error", "garbage", "challenge", "none"]))
    if rng.random() < 0.2:
        kinds.append(rng.choice(["ok", "error", "garbage", "waiting"]))
    replies = [_client_reply(rng, k, plan, label) for k in kinds if k != "none"]
    label.insert(0, "+".join(kinds))
    if replies and rng.random() < 0.08:
        replies[-1] = replies[-1][:rng.randrange(len(replies[-1]))]   # cut off, no newline
        label.append("cut")
    plan["replies"] = replies
    return ClientCase("client", number, b"".join(replies), plan, "+".join(label))


def _positive_seconds(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return 0 < float(value) < float("inf")
    except OverflowError:
        return False


def client_model(plan):
    """What connect must do with the script: ("ok", reply), ("fail", why) or
    ("silence", why) (the relay said nothing final: the service times out)."""
    secret = plan["secret"]
    for line in plan["replies"]:
        if not line.endswith(b"\n"):
            break
        text = line[:-1]
        if len(line) > registration.MAX_REPLY:
            return "fail", "a reply line past MAX_REPLY"
        try:
            body = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return "fail", "a reply that is not JSON"
        if not isinstance(body, dict) or not isinstance(body.get("status"), str):
            return "fail", "a reply without a status"
        status = body["status"]
        if status == "waiting":
            continue
        if status == "challenge":
            nonce = body.get("nonce")
            if not secret or body.get("method") != AUTH_METHOD:
                return "fail", "a challenge we cannot answer"
            if not isinstance(nonce, str) or not re.match(r"^([0-9a-fA-F]{2})*$", nonce):
                return "fail", "a malformed nonce"
            continue
        if status == "ok":
            if not isinstance(body.get("address"), str):
                return "fail", "ok without an address"
            beat = body.get("heartbeat")
            if plan["heartbeat"] and isinstance(beat, dict):
                for key in ("interval", "timeout"):
                    if key in beat and not _positive_seconds(beat[key]):
                        return "fail", "a bad heartbeat %s" % key
            return "ok", body
        return "fail", "status %r" % status
    if plan["after"] in ("close-stream", "reset", "close-session"):
        return "fail", "the relay ended before a final answer"
    return "silence", "no final answer"


def _fake_relay(case, listener, problems):
    """The relay's side of a client case (its own thread)."""
    plan = case.plan
    name = "fuzz-c%d" % case.number
    try:
        sock, _ = listener.accept()
    except OSError as exc:
        problems.append("the service never connected: %r" % exc)
        return
    # One session per case: a service that dials again (the minimal form,
    # after a reset or silence) is refused at once, not left in the backlog.
    listener.close()
    sock.settimeout(TIMEOUT)
    if plan["mode"] == "frames":
        try:
            raw = RawSide(sock)
            # (The service may be gone before all is written: then no more to do.)
            if raw.send(case.data) and plan["after"] != "hold":
                raw.shutdown_write()
            # Until the service has gone (it must, by itself).
            raw.read_until(lambda frames: False, "EOF from the service")
        except (CaseFailure, OSError) as exc:
            problems.append("the service did not close the connection: %s" % exc)
        finally:
            sock.close()
        return
    session = muxado.server(sock, name=name + "-relay")
    try:
        stream = session.accept(timeout=TIMEOUT)
        stream.settimeout(TIMEOUT)
        lines = Lines(stream)
        request = lines.next_line(TIMEOUT)
        body = json.loads(request.decode("utf-8"))
        check(isinstance(body, dict) and body.get("version") == 1
              and (body.get("auth") == AUTH_METHOD) == plan["secret"]
              and bool(body.get("heartbeat")) == plan["heartbeat"],
              "the service's request is not what it was asked to send: %r", request)
        for line in plan["replies"]:
            if plan["split"] == "chunks":
                for i in range(0, len(line), 7):
                    stream.sendall(line[i:i + 7])
            else:
                stream.sendall(line)
            try:
                reply = json.loads(line.decode("utf-8"))
            except ValueError:
                continue
            if isinstance(reply, dict) and reply.get("status") == "challenge" and \
                    client_model(dict(plan, replies=[line], after="hold"))[0] != "fail":
                # The service must answer with the HMAC of this nonce (2.6).
                answer = json.loads(lines.next_line(TIMEOUT).decode("utf-8"))
                check(answer == {"hmac": hmac_answer(SECRET, binascii.unhexlify(
                    reply["nonce"]))}, "the service's answer to the challenge is %r", answer)
        after = plan["after"]
        if after == "close-stream":
            stream.close()
        elif after == "reset":
            stream.reset(ErrorCode.STREAM_CANCELLED)
        elif after == "close-session":
            session.close()
        if not session.wait(TIMEOUT + CLIENT_SILENCE * 2):
            problems.append("hang: the service kept its session after the case")
    except (CaseFailure, socket.timeout) as exc:
        problems.append("the fake relay: %s" % exc)
    except (muxado.MuxadoError, OSError, ValueError, AttributeError):
        pass   # the service went away (it may, on a failure)
    finally:
        session.close()


def run_client_case(case, watch):
    plan = case.plan
    expect, why = client_model(plan) if plan["mode"] == "lines" else ("any", "frames")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    address = listener.getsockname()
    watch.port_is(address[1], ("client", case.number))
    where = "relay %s:%d" % address
    problems = []
    relay = threading.Thread(target=_fake_relay, args=(case, listener, problems),
                             name="fuzz-c%d fake relay" % case.number)
    relay.daemon = True
    relay.start()
    silent = expect in ("silence", "any")
    connection = None
    started = time.monotonic()
    try:
        try:
            connection = relay_service.connect(
                address, secret=SECRET if plan["secret"] else None, heartbeat=plan["heartbeat"],
                timeout=CLIENT_SILENCE if silent else TIMEOUT,
                max_wait=CLIENT_SILENCE if silent else None, name="fuzz-c%d" % case.number)
        except CLIENT_FAILURES as exc:
            result = exc
        except Exception as exc:
            raise CaseFailure("connect raised %r (not a clean failure)\n%s"
                              % (exc, traceback.format_exc()))
        else:
            result = connection
        took = time.monotonic() - started
        check(took < TIMEOUT + 2 * CLIENT_SILENCE, "hang: connect took %.1fs", took)
        if connection is not None:
            check(expect in ("ok", "any"), "connect returned, but the script says %s (%s)",
                  expect, why)
            if expect == "ok":
                # (As JSON: a NaN the relay sent is not equal to itself.)
                got = [connection.address, connection.port, connection.lease]
                check(json.dumps(got) == json.dumps([why["address"], why.get("port"),
                                                     why.get("lease")]),
                      "connect returned %r for the reply %r", got, why)
            outcome = "connected"
        else:
            # An RST aborts the stream (docs/PROTOCOL.md 1): an ok still unread goes with it.
            check(expect != "ok" or plan["after"] == "reset",
                  "connect failed with %r, but the script says ok (%r)", result, why)
            if expect == "silence":
                # A relay silent past the grace is taken for a minimal one: the
                # service dials again, and this fake relay refuses a second session.
                check(isinstance(result, (socket.timeout, relay_service.RelayGone,
                                          muxado.MuxadoError, ConnectionRefusedError))
                      or plan["after"] != "hold",
                      "connect failed with %r; the relay only went silent", result)
            # (socket.timeout is TimeoutError from 3.10 on: one name for every version.)
            outcome = "failed: %s" % ("socket.timeout" if isinstance(result, socket.timeout)
                                      else type(result).__name__)
    finally:
        if connection is not None:
            connection.close()
            check(connection.closed, "close() left the session open")
        relay.join(TIMEOUT + 3 * CLIENT_SILENCE)
        listener.close()
    check(not relay.is_alive(), "hang: the fake relay is still running")
    check(not problems, "%s", "; ".join(problems))
    _threads_done(where, where + "-writer", "heartbeat " + where)
    return outcome + (" (frames)" if plan["mode"] == "frames" else "")


def client_case_for(seed, number, pairs, watch, make_case=None):
    case = (make_case or gen_client_case)(seed, number)
    try:
        outcome = run_client_case(case, watch)
        errors = watch.errors_for(("client", number))
        check(not errors, "logged or raised in a thread:\n%s", "\n".join(errors[:3]))
    except (CaseFailure, OSError, muxado.MuxadoError) as exc:
        raise CaseFailure("%s\n  case: %s, plan %r\n  bytes: %s"
                          % (exc, case.label, dict((k, v) for k, v in case.plan.items()
                                                   if k != "replies"), hexdump(case.data)))
    return Outcome(case, outcome)


def run_client_fuzz(seed, numbers, workers=16, report=None, progress=None, make_case=None,
                    max_failures=None):
    """The service library against a hostile fake relay (see above); returns a Report."""
    return run_simple_fuzz("client", seed, numbers,
                           lambda n, pairs, watch: client_case_for(seed, n, pairs, watch,
                                                                   make_case),
                           workers, report, progress, max_failures)


# -- public cases: hostile clients of a registered service's public port ----------------------------
#
# The relay environment's healthy echo service (its checksummed traffic running
# beside every case) gets hostile clients too: bytes then a reset, a reset at
# once, a half-close with or without reading the echo, a slow reader, a client
# that sends much and reads nothing. A client that half-closes and reads must get
# exactly its bytes back; every case ends within its bounds; after the run the
# relay holds no client, the healthy traffic's sha256 are equal and nothing
# leaked (RelayEnv.finish, run_relay_fuzz's checks).

PublicCase = collections.namedtuple("PublicCase", "kind number data plan label")
PUBLIC_ACTIONS = ("echo", "echo", "echo-pieces", "reset-after", "reset-at-once",
                  "half-close-no-read", "close-unread", "slow-read", "read-some-reset")


def gen_public_case(seed, number):
    rng = case_rng(seed, "public", number)
    action = rng.choice(PUBLIC_ACTIONS)
    size = rng.choice([0, 1, 7, 1460, 65536, 300000, rng.randint(1, 200000)])
    chunk = rng.choice([1, 100, 4096])
    if action == "slow-read":
        # More than the windows hold, read in small bites.
        size, chunk = rng.choice([100000, 300000]), rng.choice([512, 4096])
    data = rand_bytes(rng, size)
    plan = {"action": action,
            "pieces": sorted(rng.randrange(size + 1) for _ in range(rng.choice([0, 1, 3, 8]))),
            "chunk": chunk, "linger_reset": rng.random() < 0.5}
    return PublicCase("public", number, data, plan, action)


def run_public_case(case, env, port=None, kind="public"):
    plan = case.plan
    action = plan["action"]
    sock = socket.create_connection((LOOPBACK, port or env.healthy_port), timeout=TIMEOUT)
    env.watch.port_is(sock.getsockname()[1], (kind, case.number))
    try:
        if action == "reset-at-once":
            abort(sock)
            return "reset at once"
        cuts = plan["pieces"] if action == "echo-pieces" else []
        if action == "slow-read":
            # Send it all from a thread while we read in small bites.
            sender = threading.Thread(target=lambda: sock.sendall(case.data) or
                                      sock.shutdown(socket.SHUT_WR),
                                      name="fuzz-u%d sender" % case.number)
            sender.daemon = True
            sender.start()
            echoed = bytearray()
            while True:
                chunk = sock.recv(plan["chunk"])
                if not chunk:
                    break
                echoed += chunk
            sender.join(TIMEOUT)
            check(not sender.is_alive(), "hang: the slow reader's sender never finished")
            check(bytes(echoed) == case.data, "the slow reader got %d bytes back, not its %d "
                  "(or different ones)", len(echoed), len(case.data))
            return "slow read, echoed exactly"
        if action in ("reset-after", "read-some-reset"):
            sock.sendall(case.data[:65536])
            if action == "read-some-reset" and case.data:
                sock.recv(plan["chunk"])
            abort(sock)
            return action
        if action == "close-unread":
            sock.sendall(case.data[:65536])
            sock.close()
            return "closed unread"
        for a, b in zip([0] + cuts, cuts + [None]):
            if case.data[a:b]:
                sock.sendall(case.data[a:b])
        sock.shutdown(socket.SHUT_WR)
        if action == "half-close-no-read":
            (abort if plan["linger_reset"] else socket.socket.close)(sock)
            return "half-closed, left"
        echoed = bytearray()
        while True:
            chunk = sock.recv(262144)
            if not chunk:
                break
            echoed += chunk
        check(bytes(echoed) == case.data, "the echo is %d bytes, not the %d sent (or differs)",
              len(echoed), len(case.data))
        return "echoed exactly"
    except socket.timeout:
        raise CaseFailure("hang: the public port gave no answer within %gs" % TIMEOUT)
    finally:
        sock.close()


def public_case_for(seed, number, env, make_case=None, port=None, kind="public"):
    case = (make_case or gen_public_case)(seed, number)
    case = case._replace(kind=kind)
    try:
        outcome = run_public_case(case, env, port, kind)
        errors = env.watch.errors_for((kind, number))
        check(not errors, "logged or raised in a thread:\n%s", "\n".join(errors[:3]))
    except (CaseFailure, OSError, muxado.MuxadoError) as exc:
        text = str(exc) if isinstance(exc, CaseFailure) else "%r\n%s" % (
            exc, traceback.format_exc())
        raise CaseFailure("%s\n  case: %s, plan %r, %d bytes" % (text, case.label, case.plan,
                                                                 len(case.data)))
    return Outcome(case, outcome)


def run_public_fuzz(seed, numbers, workers=16, report=None, progress=None, make_case=None,
                    max_failures=None, kind="public"):
    """Hostile clients of the healthy service's public port (see above), or with
    ``kind="adapter"`` of an Adapter's (see below); returns a Report."""
    report = report or Report(seed)
    started = time.monotonic()
    numbers = _as_range(numbers)
    problems = []
    fds = open_fds()
    ran = 0
    with Watch() as watch:
        env = RelayEnv(seed, watch)
        env.healthy.hostile_clients = True
        adapter = None
        try:
            port = None
            if kind == "adapter":
                adapter = AdapterUnderTest(env)
                port = adapter.port
            ran = run_pool(numbers, lambda n: public_case_for(seed, n, env, make_case, port,
                                                              kind),
                           workers, progress, max_failures=max_failures,
                           record=report.recorder(kind))
            if adapter is not None:
                problems.extend(adapter.close())
                adapter = None
            problems.extend(env.finish())
            end = time.monotonic() + TIMEOUT
            while env.relay.client_count and time.monotonic() < end:
                time.sleep(0.05)
            if env.relay.client_count:
                problems.append("the relay still holds %d clients after the run"
                                % env.relay.client_count)
            report.notes.extend(env.notes())
        finally:
            if adapter is not None:
                problems.extend(adapter.close())
            problems.extend(env.close())
        stray = watch.unattributed(kind, numbers)
    report.note_skipped(kind, numbers, ran)
    for problem in problems:
        report.fail_run(kind, problem)
    for text in stray:
        report.fail_run(kind, "logged or raised outside any case:\n" + text)
    if open_fds() != fds:
        report.fail_run(kind, "open files: %s before, %s after" % (fds, open_fds()))
    report.elapsed += time.monotonic() - started
    return report


# -- adapter cases: the public cases through tcprelay.adapter to a local service -----------------
#
# The same hostile clients (and the same checks) against the public port of an
# Adapter registered with the run's relay, whose streams it joins to a plain
# TCP echo service on loopback: every byte must cross relay, adapter and back.

class LocalEcho(object):
    """A TCP echo service on loopback, a thread per connection; resets are the client's."""

    def __init__(self):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(128)
        self.address = self.listener.getsockname()
        self._lock = threading.Lock()
        self._threads = []
        self._conns = set()
        self._spawn(self._accept_loop, "fuzz local echo")

    def _spawn(self, fn, name, *args):
        thread = threading.Thread(target=fn, args=args, name=name)
        thread.daemon = True
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.settimeout(TIMEOUT)
            with self._lock:
                self._conns.add(conn)
            self._spawn(self._echo, "fuzz local echo conn", conn)

    def _echo(self, conn):
        try:
            while True:
                data = conn.recv(262144)
                if not data:
                    conn.shutdown(socket.SHUT_WR)
                    break
                conn.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            threads = list(self._threads)
        return join_threads(threads)


class AdapterUnderTest(object):
    """An Adapter (no stdout announcement) registered with the env's relay, serving."""

    def __init__(self, env):
        from tcprelay.adapter import Adapter
        from tcprelay.service import RelayServer

        class QuietAdapter(Adapter):
            def registered(self, previous_address, connection):
                RelayServer.registered(self, previous_address, connection)

        self.echo = LocalEcho()
        try:
            self.adapter = QuietAdapter(env.relay_address, self.echo.address, secret=SECRET,
                                        name="fuzz-adapter")
        except BaseException:
            self.echo.close()
            raise
        self.port = self.adapter.server_address[1]
        self._serve = threading.Thread(target=self.adapter.serve_forever, args=(0.1,),
                                       name="fuzz adapter")   # shutdown() in 0.1 s
        self._serve.daemon = True
        self._serve.start()

    def close(self):
        problems = []
        self.adapter.shutdown()
        self._serve.join(TIMEOUT)
        if self._serve.is_alive():
            problems.append("the adapter's serve_forever did not return after shutdown()")
        self.adapter.server_close()
        left = self.echo.close()
        if left:
            problems.append("local echo threads still running: %s" % left[:5])
        return problems


# -- tls cases: the relay with tls_context -------------------------------------------------------
#
# The whole relay fuzz (garbage, mutated frames, registrations) over TLS, the
# healthy service registered over TLS too; and TLS-level garbage: random bytes,
# made-up and mutated ClientHello records, oversized record headers, plain muxado
# (a client that forgot TLS) before the handshake; after a real handshake, raw
# bytes, records with a broken MAC, oversized and cut-off records. The relay must
# close the connection (within its handshake deadline for what never gets that
# far), log nothing at ERROR, and leave the healthy traffic unharmed.

TLS_GARBAGE = ("random", "client-hello", "client-hello", "huge-record", "alert", "plain-muxado")
TLS_AFTER = ("raw-bytes", "bad-mac", "bad-mac", "huge-record", "cut-record", "close-notify-then")


def _tls_client_hello(rng):
    """A made-up ClientHello record (TLS 1.2/1.3 shaped, random contents)."""
    suites = [0x1301, 0x1302, 0x1303, 0xC02F, 0xC030, 0x009C] + [
        rng.getrandbits(16) for _ in range(rng.randint(0, 4))]
    extensions = b""
    if rng.random() < 0.8:
        extensions += struct.pack(">HHB", 0x2B, 5, 4) + b"\x03\x04\x03\x03"   # versions
        extensions += struct.pack(">HHH", 0x0A, 4, 2) + b"\x00\x1d"           # x25519
        extensions += struct.pack(">HHHHH", 0x33, 38, 36, 0x1D, 32) + rand_bytes(rng, 32)
        extensions += struct.pack(">HHH", 0x0D, 4, 2) + b"\x08\x04"           # rsa_pss
    extensions += rand_bytes(rng, rng.choice([0, 0, 4, 20]))
    body = b"\x03\x03" + rand_bytes(rng, 32) + b"\x20" + rand_bytes(rng, 32) + struct.pack(
        ">H", 2 * len(suites)) + b"".join(struct.pack(">H", c) for c in suites) + b"\x01\x00" + \
        struct.pack(">H", len(extensions)) + extensions
    handshake = b"\x01" + struct.pack(">I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack(">H", len(handshake)) + handshake


def gen_tls_case(seed, number, env):
    rng = case_rng(seed, "tls", number)
    if rng.random() < 0.6:
        # The relay fuzz's own cases, over TLS (a different stream of numbers).
        return gen_relay_case(seed + 0x7F000000, number, env)
    label = []
    end = rng.choice(["shut", "shut", "reset", "wait"])
    if rng.random() < 0.5:
        how = rng.choice(TLS_GARBAGE)
        if how == "random":
            data = rand_bytes(rng, rng.choice([1, 5, 6, 100, rng.randint(1, 3000)]))
        elif how == "client-hello":
            data = _tls_client_hello(rng)
        elif how == "huge-record":
            data = bytes([rng.choice([0x16, 0x17, 0x15, 0x80])]) + b"\x03\x03\xff\xff" + \
                rand_bytes(rng, rng.randint(0, 100))
        elif how == "alert":
            data = b"\x15\x03\x03\x00\x02" + bytes([rng.choice([1, 2]), rng.getrandbits(8)])
        else:
            data = data_frame(1, b'{"auth": "hmac-sha256"}\n', SYN)
        if rng.random() < 0.4:
            buf = bytearray(data)
            for _ in range(rng.randint(1, 2)):
                if buf:
                    mutator = rng.choice(BYTE_MUTATORS)
                    buf = mutator(rng, buf)
                    label.append(mutator.__name__[2:])
            data = bytes(buf)
        mode = "tls-before"
    else:
        how = rng.choice(TLS_AFTER)
        data = rand_bytes(rng, rng.choice([1, 5, 40, 1000, 20000]))
        mode = "tls-after"
    plan = {"end": end, "how": how, "flip": rng.randrange(1 << 16)}
    return RelayCase("tls", number, mode, data, plan, "+".join([mode, how] + label))


def _tls_handshake_bio(sock, context):
    """A client TLS handshake over ``sock`` through memory BIOs, so that what goes
    on the wire afterwards is ours to corrupt; returns (sslobject, outgoing)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname=LOOPBACK)
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            pending = outgoing.read()
            if pending:
                sock.sendall(pending)
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError("EOF in the TLS handshake")
            incoming.write(data)
    pending = outgoing.read()
    if pending:
        sock.sendall(pending)
    return obj, outgoing


def run_tls_garbage_case(case, env):
    """Bytes at a TLS relay, before or after a real handshake: it must close."""
    plan = case.plan
    started = time.monotonic()
    sock = socket.create_connection(env.relay_address, timeout=TIMEOUT)
    local_port = sock.getsockname()[1]
    env.watch.port_is(local_port, (case.kind, case.number))
    raw = RawSide(sock)
    try:
        data = case.data
        if case.mode == "tls-after":
            try:
                obj, outgoing = _tls_handshake_bio(sock, env.client_tls)
            except (ssl.SSLError, ConnectionError) as exc:
                check(time.monotonic() - started >= HANDSHAKE_TIMEOUT,
                      "the TLS handshake failed: %r", exc)
                return "dropped at the handshake timeout (TLS)"
            how = plan["how"]
            if how in ("bad-mac", "cut-record", "close-notify-then"):
                if how == "close-notify-then":
                    try:
                        obj.unwrap()
                    except ssl.SSLError:
                        pass
                    record = outgoing.read() + data
                else:
                    obj.write(data)
                    record = bytearray(outgoing.read())
                    if how == "bad-mac":
                        record[5 + plan["flip"] % (len(record) - 5)] ^= 0x01
                    else:
                        del record[5 + plan["flip"] % (len(record) - 5):]
                data = bytes(record)
            elif how == "huge-record":
                data = b"\x17\x03\x03\xff\xff" + data
        raw.send(data)
        if plan["end"] == "reset":
            abort(sock)
            _relay_side_done(env, local_port)
            return "%s: reset by us" % case.mode
        if plan["end"] == "shut":
            raw.shutdown_write()
        # Whatever the relay says (a ServerHello, an alert), it must close.
        raw.read_until(lambda frames: False, "the relay closing the connection")
    finally:
        sock.close()
    _relay_side_done(env, local_port)
    return "%s: closed by the relay%s" % (case.mode, " (reset)" if raw.reset else "")


def run_tls_fuzz(seed, numbers, workers=16, report=None, progress=None, make_case=None,
                 max_failures=None):
    """The relay over TLS (see above); returns a Report."""
    return run_relay_fuzz(seed, numbers, workers, report, progress, make_case, max_failures,
                          kind="tls")


def describe_simple_case(case, limit=4096):
    fields = ", ".join("%s=%r" % (k, v) for k, v in case._asdict().items()
                       if k not in ("kind", "number", "data", "label"))
    return "%s case %d: %s\n%s\nbytes (%d): %s" % (case.kind, case.number, case.label, fields,
                                                 len(case.data), hexdump(case.data, limit))


# Kinds beyond session and relay: name -> (runner, generator, what it fuzzes).
EXTRA_KINDS = {
    "proxy": (run_proxy_fuzz, gen_proxy_case,
              "PROXY v1/v2 headers, valid and mutated, through proxyproto.read_header"),
    "client": (run_client_fuzz, gen_client_case,
               "service.connect against a fake relay sending mutated replies and frames"),
    "public": (run_public_fuzz, gen_public_case,
               "hostile clients of a registered service's public port, healthy traffic beside"),
    "adapter": (lambda *a, **k: run_public_fuzz(*a, kind="adapter", **k), gen_public_case,
                "the public cases through tcprelay.adapter to a local TCP echo service"),
    "tls": (run_tls_fuzz, gen_tls_case,
            "the relay fuzz over TLS, and TLS garbage before and after the handshake"),
}
