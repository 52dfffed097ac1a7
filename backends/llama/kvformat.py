"""llamafleet's KV blob: a self-describing envelope around llama.cpp's sequence state.

llama.cpp's ``llama_state_seq_get_data`` blob holds KV cells and positions only
(no model identity, no token ids). A blob must be safe to move between workers,
so it is wrapped (all integers little-endian)::

    offset size  field
    0      4     magic b"LFKV"
    4      2     format version (1)
    6      2     flags (0)
    8      16    model id: sha256(file size, first MiB, last 64 KiB)[:16]
    24     4     n_vocab
    28     4     n_layer
    32     4     n_embd
    36     1     kv_unified (0/1)
    37     1     flash attention (0 = off, 1 = on or auto; decides V transposition)
    38     2     type_k (ggml_type)
    40     2     type_v (ggml_type)
    42     2     reserved (0)
    44     4     n_seq_max when not unified (the stream count), else 0
    48     16    adapter id: hash of the active LoRA set (zeros when none)
    64     4     n_tokens
    68     8     payload length
    76     4*n   token ids (int32)
    ...    len   payload (llama.cpp's sequence state)
    end-4  4     CRC32 of everything before it

What must match to restore: model id, n_vocab, n_layer, n_embd (model), and
kv_unified, n_seq_max when not unified, type_k, type_v, flash attention, the
active adapter set (context). ``n_ctx`` need not match: the target only needs
room for ``n_tokens`` cells, which the caller checks.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from llamafleet.runtime.errors import BadRequest

MAGIC = b"LFKV"
VERSION = 1
_HEAD = struct.Struct("<4sHH16sIIIBBHHHI16sIQ")
HEADER_SIZE = _HEAD.size  # 76
assert HEADER_SIZE == 76


@dataclass(frozen=True)
class KVShape:
    """What a context must share with the one that produced a blob."""

    model_id: bytes
    n_vocab: int
    n_layer: int
    n_embd: int
    kv_unified: bool
    flash_attn: bool
    type_k: int
    type_v: int
    n_stream: int  # n_seq_max when not unified, 0 when unified
    adapter_id: bytes = b"\0" * 16


@dataclass
class KVBlob:
    shape: KVShape
    tokens: list[int]
    payload: bytes


def pack(shape: KVShape, tokens: list[int], payload: bytes) -> bytes:
    """Build a blob (header, token ids, payload, CRC32)."""
    buf, view = blank(len(tokens), len(payload))
    view[:] = payload
    return seal(buf, shape, tokens)


def blank(n_tokens: int, payload_len: int) -> tuple[bytearray, memoryview]:
    """A zeroed blob of ``n_tokens`` and a payload of ``payload_len`` bytes, and a view
    of its payload region: llama.cpp writes the state there, :func:`seal` the rest
    (one allocation, no copy of the payload)."""
    start = HEADER_SIZE + 4 * n_tokens
    buf = bytearray(start + payload_len + 4)
    return buf, memoryview(buf)[start:start + payload_len]


def seal(buf: bytearray, shape: KVShape, tokens: list[int]) -> bytes:
    """Fill in the header, token ids and CRC32 of a :func:`blank` blob whose payload is
    written. Pure: safe on any thread."""
    toks = np.asarray(tokens, dtype="<i4")
    start = HEADER_SIZE + 4 * len(toks)
    payload_len = len(buf) - start - 4
    _HEAD.pack_into(buf, 0, MAGIC, VERSION, 0, shape.model_id, shape.n_vocab, shape.n_layer,
                    shape.n_embd, int(shape.kv_unified), int(shape.flash_attn), shape.type_k,
                    shape.type_v, 0, shape.n_stream, shape.adapter_id, len(toks), payload_len)
    buf[HEADER_SIZE:start] = toks.tobytes()
    view = memoryview(buf)
    struct.pack_into("<I", buf, len(buf) - 4, zlib.crc32(view[:len(buf) - 4]))
    view.release()
    return bytes(buf)


def unpack(data: bytes | bytearray | memoryview) -> KVBlob:
    """Parse and verify a blob; BadRequest for bad magic, version, truncation, checksum."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadRequest("KV blob must be bytes")
    mv = memoryview(data).cast("B")
    if len(mv) < 4 or bytes(mv[:4]) != MAGIC:
        raise BadRequest("not a llamafleet KV blob (bad magic)")
    if len(mv) < HEADER_SIZE + 4:
        raise BadRequest("KV blob is truncated (header)")
    (_m, version, _flags, model_id, n_vocab, n_layer, n_embd, unified, fa, type_k, type_v,
     _res, n_stream, adapter_id, n_tokens, payload_len) = _HEAD.unpack_from(mv, 0)
    if version != VERSION:
        raise BadRequest(f"unsupported KV blob format version {version} (this build reads {VERSION})")
    total = HEADER_SIZE + 4 * n_tokens + payload_len + 4
    if len(mv) < total:
        raise BadRequest(f"KV blob is truncated ({len(mv)} of {total} bytes)")
    if len(mv) > total:
        raise BadRequest(f"KV blob has {len(mv) - total} trailing bytes")
    (crc,) = struct.unpack_from("<I", mv, total - 4)
    if zlib.crc32(mv[:total - 4]) != crc:
        raise BadRequest("KV blob checksum mismatch (corrupted)")
    toks = np.frombuffer(mv, dtype="<i4", count=n_tokens, offset=HEADER_SIZE)
    if n_tokens and (int(toks.min()) < 0 or int(toks.max()) >= n_vocab):
        raise BadRequest("KV blob holds token ids outside the vocabulary")
    start = HEADER_SIZE + 4 * n_tokens
    shape = KVShape(bytes(model_id), n_vocab, n_layer, n_embd, bool(unified), bool(fa),
                    type_k, type_v, n_stream, bytes(adapter_id))
    return KVBlob(shape, toks.tolist(), bytes(mv[start:start + payload_len]))


def check_compatible(blob: KVShape, here: KVShape) -> None:
    """BadRequest naming the first difference that forbids restoring ``blob`` here."""
    if (blob.model_id, blob.n_vocab, blob.n_layer, blob.n_embd) != \
            (here.model_id, here.n_vocab, here.n_layer, here.n_embd):
        raise BadRequest("KV blob is from another model "
                         f"(n_vocab {blob.n_vocab}, n_layer {blob.n_layer}, n_embd {blob.n_embd}; "
                         f"this model: {here.n_vocab}, {here.n_layer}, {here.n_embd})")
    diffs = []
    if blob.kv_unified != here.kv_unified:
        diffs.append(f"kv_unified {blob.kv_unified} != {here.kv_unified}")
    if blob.n_stream != here.n_stream:
        diffs.append(f"KV streams (n_seq_max, not unified) {blob.n_stream} != {here.n_stream}")
    if blob.type_k != here.type_k or blob.type_v != here.type_v:
        diffs.append(f"cache types k/v {blob.type_k}/{blob.type_v} != {here.type_k}/{here.type_v}")
    if blob.flash_attn != here.flash_attn:
        diffs.append(f"flash attention {blob.flash_attn} != {here.flash_attn}")
    if diffs:
        raise BadRequest("KV blob is from an incompatible context: " + "; ".join(diffs))
    if blob.adapter_id != here.adapter_id:
        raise BadRequest("KV blob was computed with another LoRA adapter set")
