"""Property-based fuzzing of a LIVE worker over its raw ZeroMQ socket (fake and llama backends).

A raw DEALER socket (not the client library) sends anything at all: malformed frames,
random argument maps for every command in ``runtime.protocol.COMMANDS``, valid-but-extreme
values, and pipelined command sequences on a few sequences. After every example:

* every request got exactly one final reply (result or error) in time, chunks only
  before it and only for ``generate``: no hang, no duplicate, no stray reply;
* every error has a known code (``runtime.errors.ERROR_TYPES``), a string message and a
  bool ``retryable``; bad input never yields ``internal`` (that is a bug);
* the worker pid is unchanged (no crash, no restart) and ``ping`` still answers.

CI runs a few hundred examples per test, derandomized (reproducible). Run more locally with
``LLAMAFLEET_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py``. With ``LLAMAFLEET_FIGURES=path``
the counts are merged into that JSON file under ``{"fuzz": {backend: {...}}}``.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import struct
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamafleet.runtime import protocol
from llamafleet.runtime.errors import ERROR_TYPES, BadRequest
from llamafleet.runtime.sampling import SamplingParams
from llamafleet.runtime.supervisor import Supervisor
from tests.conftest import make_config, pid_alive, worker_pid
from tests.figures import merge_figures

#: Examples per test (CI default keeps the whole file well under 90 s on 2 cores).
EXAMPLES = int(os.environ.get("LLAMAFLEET_FUZZ_EXAMPLES", "0") or 0)
#: Seconds one request may take to get its final reply before we call it a hang.
REPLY_TIMEOUT = float(os.environ.get("LLAMAFLEET_FUZZ_REPLY_TIMEOUT", "30"))

#: Hunting mode: record internal errors and keep going (the last test of the module still
#: fails listing them all) instead of stopping at, and shrinking, the first one.
COLLECT = os.environ.get("LLAMAFLEET_FUZZ_COLLECT", "") not in ("", "0")

#: Codes bad input may legitimately produce; everything else is a finding.
BAD_INPUT_CODES = {"bad_request", "not_found", "not_supported", "protocol_error"}
#: Plus what the request's own options can cause (cancel, deadline_ms, a full queue).
ALLOWED_CODES = BAD_INPUT_CODES | {"cancelled", "timeout", "overloaded"}

N_SEQ = 4
FAKE_OPTS = {"backend": "fake", "n_ctx": 512, "n_seq_max": N_SEQ, "n_batch": 64}
LLAMA_OPTS = {"backend": "llama", "n_ctx": 256, "n_seq_max": N_SEQ, "n_batch": 64,
              "n_ubatch": 64, "n_threads": 2}


def _examples(default: int) -> int:
    return EXAMPLES or default


def fuzz_settings(default: int) -> settings:
    return settings(max_examples=_examples(default), deadline=None, derandomize=True,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture])


# -- figures -----------------------------------------------------------------------------


# -- the live worker ------------------------------------------------------------------------
class Violation(AssertionError):
    pass


class Live:
    """One running worker reached over a raw DEALER socket, plus what we learnt about it."""

    def __init__(self, backend: str, sup: Supervisor, model: str, files: dict[str, Path]) -> None:
        self.backend = backend
        self.sup = sup
        self.model = model
        self.files = files
        st_ = next(w for w in sup.status() if w["model"] == model)
        self.endpoint = st_["endpoint"]
        self.pid = worker_pid(sup, model)
        self.restarts = st_["restarts"]
        self.ctx = zmq.Context()
        self.sock = self._socket()
        self._next_id = 1 << 40
        self.cases = 0
        self.internal: list[str] = []
        self.crashes = 0
        self.info = self.call("info")["result"]
        self.n_vocab = int(self.info["n_vocab"])
        self.n_ctx = int(self.info["n_ctx"])
        toks = self.call("tokenize", {"text": "hello world, the cat sat"})["result"]["tokens"]
        self.sample_tokens = toks
        assert "result" in self.call("prefill", {"seq": 0, "tokens": toks})
        self.blob = bytes(self.call("kv_pack", {"seq": 0})["result"]["data"])
        self.call("seq_clear", {"seq": 0})

    def _socket(self) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.endpoint)
        return s

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # -- replies -------------------------------------------------------------------------
    def recv(self, timeout: float) -> dict[str, Any] | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        frames = self.sock.recv_multipart()
        if len(frames) != 1:
            raise Violation(f"reply has {len(frames)} frames")
        msg = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
        self.check_reply(msg)
        return msg

    def check_reply(self, msg: Any) -> None:
        if not isinstance(msg, dict) or msg.get("v") != protocol.PROTOCOL_VERSION:
            raise Violation(f"malformed reply {msg!r:.300}")
        kind = msg.get("kind")
        if kind == "result":
            if "result" not in msg:
                raise Violation(f"result reply without result: {msg!r:.300}")
        elif kind == "chunk":
            if not isinstance(msg.get("data"), dict):
                raise Violation(f"chunk without data: {msg!r:.300}")
        elif kind == "error":
            err = msg.get("error")
            if not isinstance(err, dict):
                raise Violation(f"error reply without error map: {msg!r:.300}")
            if err.get("code") not in ERROR_TYPES:
                raise Violation(f"unknown error code {err.get('code')!r}")
            if not isinstance(err.get("message"), str):
                raise Violation(f"error message is not a string: {err!r:.300}")
            if not isinstance(err.get("retryable"), bool):
                raise Violation(f"error retryable is not a bool: {err!r:.300}")
            if not isinstance(err.get("data"), dict):
                raise Violation(f"error data is not a map: {err!r:.300}")
        else:
            raise Violation(f"unknown reply kind {kind!r}")

    def drain_stray(self) -> None:
        """Anything still arriving now is a reply nobody asked for (or a duplicate)."""
        msg = self.recv(0.0)
        if msg is not None:
            raise Violation(f"stray reply after every request was answered: {msg!r:.300}")

    def collect(self, pending: dict[Any, str], what: str) -> dict[Any, dict[str, Any]]:
        """Wait for exactly one final reply per id in ``pending`` (id -> command)."""
        try:
            return self._collect(pending, what)
        except Violation:
            # let the rest of this example's replies arrive and drop them, so the next
            # example (hypothesis shrinks by re-running) starts from a quiet socket
            while self.recv(0.5) is not None:
                pass
            raise

    def _collect(self, pending: dict[Any, str], what: str) -> dict[Any, dict[str, Any]]:
        finals: dict[Any, dict[str, Any]] = {}
        chunks: dict[Any, int] = {}
        deadline = time.monotonic() + REPLY_TIMEOUT * max(1, len(pending))
        while len(finals) < len(pending):
            left = deadline - time.monotonic()
            msg = self.recv(max(0.0, left)) if left > 0 else None
            if msg is None:
                missing = {k: v for k, v in pending.items() if k not in finals}
                raise Violation(f"HANG: no final reply within {REPLY_TIMEOUT}s for {missing} "
                                f"(request: {what:.500})")
            rid = msg.get("id")
            if rid not in pending:
                raise Violation(f"reply for an id nobody is waiting for ({rid!r}): "
                                f"{msg!r:.300} (request: {what:.500})")
            if rid in finals:
                raise Violation(f"reply after the final one for {rid}: {msg!r:.300}")
            if msg["kind"] == "chunk":
                if pending[rid] != "generate":
                    raise Violation(f"chunk for non-streaming command {pending[rid]}")
                chunks[rid] = chunks.get(rid, 0) + 1
                continue
            finals[rid] = msg
            if msg["kind"] == "error":
                code = msg["error"]["code"]
                if code == "internal":
                    self.internal.append(f"{pending[rid]}: {msg['error']['message']} "
                                         f"<- {what:.800}")
                    if not COLLECT:
                        raise Violation(f"INTERNAL error for {what:.800}: "
                                        f"{msg['error']['message']}")
                elif code not in ALLOWED_CODES:
                    raise Violation(f"unexpected error code {code!r} for {what:.500}: "
                                    f"{msg['error']['message']}")
        return finals

    # -- sending ---------------------------------------------------------------------------
    def send_raw(self, frames: list[bytes]) -> None:
        self.cases += 1
        trace = os.environ.get("LLAMAFLEET_FUZZ_TRACE")
        if trace:  # debugging aid: every frame sent, with a timestamp
            with open(trace, "a") as f:
                f.write(f"{time.time():.3f} {frames[-1][:400]!r}\n")
        self.sock.send_multipart(frames)

    def send_request(self, rid: int, cmd: str, args: Any) -> bool:
        """Encode and send; False when the client side already refuses to encode it
        (``BadRequest``: e.g. an integer msgpack cannot carry), so no reply is due."""
        try:
            frame = protocol.request(rid, cmd, args)
        except BadRequest:
            self.cases += 1
            return False
        self.send_raw([frame])
        return True

    def call(self, cmd: str, args: Any = None, req_id: int | None = None) -> dict[str, Any]:
        rid = self.new_id() if req_id is None else req_id
        self.send_raw([protocol.pack({"v": 1, "id": rid, "cmd": cmd, "args": args or {}})])
        return self.collect({rid: cmd}, f"{cmd} {args!r}")[rid]

    # -- health ---------------------------------------------------------------------------
    def check_alive(self, what: str) -> None:
        if not pid_alive(self.pid):
            self.crashes += 1
            raise Violation(f"CRASH: worker {self.pid} died after {what:.800}")
        st_ = next(w for w in self.sup.status() if w["model"] == self.model)
        if st_["pid"] != self.pid or st_["restarts"] != self.restarts:
            self.crashes += 1
            raise Violation(f"RESTART: worker pid {self.pid} -> {st_['pid']} "
                            f"(restarts {st_['restarts']}) after {what:.800}")
        rid = self.new_id()
        self.send_raw([protocol.request(rid, "ping")])
        pong = self.collect({rid: "ping"}, "ping")[rid]
        if pong.get("kind") != "result" or pong["result"].get("pid") != self.pid:
            raise Violation(f"ping after {what:.300} answered {pong!r:.300}")
        self.drain_stray()

    def reset(self) -> None:
        """Leave the worker as found: empty sequences, no adapters."""
        for seq in range(N_SEQ):
            r = self.call("seq_clear", {"seq": seq})
            assert r["kind"] == "result", r
        self.call("set_adapters", {"scales": {}})
        for name in self.call("info")["result"].get("adapters") or {}:
            self.call("unload_adapter", {"name": name})


def _fuzz_files(d: Path) -> dict[str, Path]:
    junk = d / "junk.gguf"
    junk.write_text("not a gguf\n")
    fake_gguf = d / "head.gguf"
    fake_gguf.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\0" * 16)
    return {"dir": d, "junk": junk, "head": fake_gguf}


@pytest.fixture(scope="module", params=["fake", "llama"])
def live(request: pytest.FixtureRequest) -> Iterator[Live]:
    backend = request.param
    rd = Path(tempfile.mkdtemp(prefix="lfz-", dir="/tmp"))
    files = _fuzz_files(rd)
    if backend == "llama":
        try:
            from llamafleet.backends.llama import binding
            binding.lib()
        except Exception as exc:  # noqa: BLE001 - any failure means: no libllama here
            shutil.rmtree(rd, ignore_errors=True)
            pytest.skip(f"libllama not available: {exc}")
        from llamafleet.testing.tiny_gguf import TinyModelSpec, write_lora_adapter, write_tiny_model
        spec = TinyModelSpec()
        files["model"] = write_tiny_model(rd / "tiny.gguf", spec)
        files["lora"] = write_lora_adapter(rd / "lora.gguf", spec)
        opts = {**LLAMA_OPTS, "path": str(files["model"])}
    else:
        files["lora"] = rd / "lora.gguf"
        files["lora"].write_bytes(b"GGUF")
        opts = dict(FAKE_OPTS)
    sup = Supervisor(make_config(rd / "run", {"m": opts})).start()
    lv: Live | None = None
    try:
        sup.wait_ready(timeout=60)
        lv = Live(backend, sup, "m", files)
        yield lv
    finally:
        if lv is not None:
            merge_figures({"fuzz": {backend: {"cases": lv.cases, "crashes": lv.crashes,
                                              "internal_errors": len(lv.internal)}}})
            if lv.internal:
                print(f"\n[fuzz {backend}] internal errors:\n  " + "\n  ".join(lv.internal))
            lv.close()
        sup.stop()
        shutil.rmtree(rd, ignore_errors=True)


# -- strategies -------------------------------------------------------------------------------
INT64 = st.integers(-(1 << 63), (1 << 64) - 1)
EDGE_INTS = st.sampled_from([0, 1, -1, 2, 3, 4, 5, 255, 256, 259, 260, 511, 512, 513, 65535,
                             65536, 65537, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32,
                             (1 << 63) - 1, -(1 << 63), (1 << 64) - 1])
ANY_INT = st.one_of(EDGE_INTS, INT64, st.integers(-10, 600))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, 1e-300, 1e308, -1e308, math.inf, -math.inf,
                                    math.nan, 0.5, 1.0, 2.0, 100.0, 100.0001, 1000.0, 1000.5]))
SPECIAL_TEXTS = ["", "\x00", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "\ud7ff", "\U0010ffff",
                 "\u200b", "é", "✓", "\n", " ", "{{", "}}", "{%", "%}", "root ::= x",
                 "../..", "/", ".", "..", "a" * 128, "a" * 129]
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(SPECIAL_TEXTS),
                 st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
KEYS = st.one_of(st.text(max_size=12), st.integers(-5, 5))
SCALARS = st.one_of(st.none(), st.booleans(), ANY_INT, FLOATS, TEXT, st.binary(max_size=64))
ANY = st.recursive(SCALARS, lambda c: st.one_of(st.lists(c, max_size=5),
                                                st.dictionaries(KEYS, c, max_size=5)),
                   max_leaves=20)

SAMPLING_FIELDS = [f for f in SamplingParams.__dataclass_fields__]


VALID_SAMPLING: dict[str, st.SearchStrategy[Any]] = {
    "temperature": st.one_of(st.floats(0, 2), st.sampled_from([0, 0.0, 100.0])),
    "top_k": st.one_of(st.integers(0, 100), st.just(1 << 31)),
    "top_p": st.floats(0, 1), "min_p": st.floats(0, 1), "typical_p": st.floats(0, 1),
    "repeat_penalty": st.one_of(st.floats(0, 3), st.sampled_from([0, 100])),
    "repeat_last_n": st.one_of(st.integers(-1, 70), st.just(1 << 20)),
    "frequency_penalty": st.floats(-100, 100), "presence_penalty": st.floats(-100, 100),
    "seed": st.one_of(st.integers(-(1 << 63), (1 << 32) - 1), st.integers(0, 9)),
}


def token_ids(lv: Live) -> st.SearchStrategy[int]:
    v = lv.n_vocab
    return st.one_of(st.integers(0, v - 1), st.sampled_from([0, 1, 2, v - 2, v - 1, v, v + 1, -1,
                                                             -(1 << 63), (1 << 64) - 1, 1 << 31]))


def token_lists(lv: Live) -> st.SearchStrategy[list[int]]:
    return st.one_of(st.lists(token_ids(lv), max_size=8),
                     st.lists(st.integers(0, lv.n_vocab - 1), min_size=lv.n_ctx - 3,
                              max_size=lv.n_ctx + 3),
                     st.just(list(lv.sample_tokens)))


GBNF_ATOMS = st.sampled_from(['"a"', '"yes"', '""', '[0-9]', '[^x]', '[a-z]+', '.', 'x', 'root',
                              'y', '"\\n"', '"\\x41"', '"\\u00e9"', '[\\]]', '( "a" | "b" )',
                              '"a"*', '"a"?', '[0-9]{2,3}', '[0-9]{0}', '"a"{1000000}',
                              '[z-a]', '"\\"', '(', ')', '|', '::=', '#c\n'])


@st.composite
def gbnf_text(draw: st.DrawFn) -> str:
    """Grammar-shaped text: often valid, often subtly broken, sometimes left-recursive."""
    names = ["root", "x", "y"]
    rules = []
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3)):
        alts = [" ".join(draw(st.lists(GBNF_ATOMS, min_size=0, max_size=4)))
                for _ in range(draw(st.integers(1, 3)))]
        rules.append(f"{name} ::= {' | '.join(alts)}")
    return "\n".join(rules)


SCHEMA_TYPES = st.sampled_from(["object", "string", "integer", "number", "boolean", "null",
                                "array", "nonsense", 3, None])
SCHEMA = st.recursive(
    st.one_of(st.fixed_dictionaries({"type": SCHEMA_TYPES}),
              st.fixed_dictionaries({"enum": st.lists(SCALARS.filter(
                  lambda x: not isinstance(x, bytes)), max_size=4)}),
              st.fixed_dictionaries({"const": st.one_of(st.text(max_size=5), st.integers())}),
              st.fixed_dictionaries({"type": st.just("string"),
                                     "pattern": st.sampled_from(["^a+$", "[", "(a|b)*", ".*",
                                                                 "\\d{3}", "^$", "a{2,1}"])}),
              st.fixed_dictionaries({"type": st.just("string"), "minLength": ANY_INT,
                                     "maxLength": ANY_INT}),
              st.fixed_dictionaries({"type": st.just("integer"), "minimum": ANY_INT,
                                     "maximum": ANY_INT}),
              st.fixed_dictionaries({"$ref": st.sampled_from(["#", "#/defs/x", "#/$defs/nope",
                                                              "http://x"])}),
              st.fixed_dictionaries({"format": st.sampled_from(["date", "uuid", "email", "x"])}),
              st.just({}), st.just(True), st.just(False)),
    lambda c: st.one_of(
        st.fixed_dictionaries({"type": st.just("object"),
                               "properties": st.dictionaries(st.text(max_size=6), c, max_size=3),
                               "required": st.lists(st.text(max_size=6), max_size=3)},
                              optional={"additionalProperties": st.one_of(st.booleans(), c)}),
        st.fixed_dictionaries({"type": st.just("array"), "items": c},
                              optional={"minItems": ANY_INT, "maxItems": ANY_INT,
                                        "prefixItems": st.lists(c, max_size=2)}),
        st.fixed_dictionaries({"anyOf": st.lists(c, max_size=3)}),
        st.fixed_dictionaries({"oneOf": st.lists(c, max_size=3)}),
        st.fixed_dictionaries({"allOf": st.lists(c, max_size=3)}),
        st.fixed_dictionaries({"$defs": st.dictionaries(st.sampled_from(["x", "y"]), c,
                                                        max_size=2),
                               "$ref": st.sampled_from(["#/$defs/x", "#/$defs/y", "#"])}),
        st.dictionaries(st.text(max_size=8), ANY, max_size=4)),
    max_leaves=8)


@st.composite
def sampling_maps(draw: st.DrawFn, lv: Live) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for name in draw(st.lists(st.sampled_from(SAMPLING_FIELDS), max_size=5, unique=True)):
        if name == "logit_bias":
            key = st.one_of(token_ids(lv), st.sampled_from(["5", "-1", "abc", "1e3", " 7 ", "",
                                                            math.inf, -math.inf, math.nan, 1e300,
                                                            2.5, 10**30, True]),
                            FLOATS)
            out[name] = draw(st.one_of(st.dictionaries(key, st.one_of(FLOATS, ANY), max_size=4),
                                       ANY))
        elif name == "grammar":
            out[name] = draw(st.one_of(gbnf_text(), TEXT, ANY))
        elif name == "json_schema":
            out[name] = draw(st.one_of(SCHEMA, st.just('{"type": "string"}'), TEXT, ANY))
        elif draw(st.integers(0, 9)) < 7:  # mostly valid, so later checks are reached
            out[name] = draw(VALID_SAMPLING[name])
        else:
            out[name] = draw(st.one_of(ANY_INT, FLOATS, st.sampled_from([0, 0.0, 1, -1]), ANY))
    if draw(st.integers(0, 6)) == 0:
        out[draw(KEYS)] = draw(ANY)  # unknown sampling key (maybe a non-str one)
        if draw(st.booleans()):
            out[draw(st.sampled_from([0, 1, b"k", 2.5, "zz"]))] = 1  # mixed key types
    return out


def mutated_blob(lv: Live) -> st.SearchStrategy[bytes]:
    blob = lv.blob

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        b = bytearray(blob)
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "trunc", "append", "set32", "zero"]))
            if not b:
                break
            i = draw(st.integers(0, len(b) - 1))
            if op == "flip":
                b[i] ^= 1 << draw(st.integers(0, 7))
            elif op == "trunc":
                del b[i:]
            elif op == "append":
                b += draw(st.binary(min_size=1, max_size=16))
            elif op == "set32" and i + 4 <= len(b):
                b[i:i + 4] = struct.pack("<I", draw(st.sampled_from(
                    [0, 1, 0xFFFFFFFF, 0x7FFFFFFF, len(b), 256, 257, 4096])))
            elif op == "zero":
                b[i:i + draw(st.integers(1, 64))] = b"\0" * len(b[i:i + 64][:64])
        if draw(st.booleans()):
            b = bytearray(_recrc(lv.backend, bytes(b)))
        return bytes(b)

    return st.one_of(mutate(), st.binary(max_size=200), st.just(blob), st.just(b""))


def _recrc(backend: str, b: bytes) -> bytes:
    """Make a mutated blob's checksum valid again, so the mutation reaches the parser."""
    if backend == "llama":
        if len(b) < 4:
            return b
        return b[:-4] + struct.pack("<I", zlib.crc32(b[:-4]))
    hdr = struct.Struct("<4sHH16sIII")
    if len(b) < hdr.size:
        return b
    magic, ver, res, mid, n_ctx, n, _ = hdr.unpack_from(b)
    crc = zlib.crc32(b[hdr.size:], zlib.crc32(mid))
    return hdr.pack(magic, ver, res, mid, n_ctx, n, crc) + b[hdr.size:]


def field_values(lv: Live, cmd: str, name: str) -> st.SearchStrategy[Any]:
    """Plausible-to-extreme values of one argument (plus, sometimes, anything at all)."""
    seqs = st.sampled_from([0, 1, N_SEQ - 1, N_SEQ, N_SEQ + 1, -1, 1 << 31, (1 << 64) - 1])
    paths = st.sampled_from([str(lv.files["lora"]), str(lv.files["junk"]), str(lv.files["head"]),
                             str(lv.files["dir"]), "", "relative.gguf", "/nonexistent/x.gguf",
                             "/dev/null", "/proc/self/status", "/etc/passwd", "\x00",
                             "/" * 4096, "a" * 4097, "/tmp/../" + "x" * 300])
    names = st.one_of(st.sampled_from(["a", "b", "style", ".", "..", "a/b", "x\x00", "",
                                       "a" * 128, "a" * 129, "é" * 128, " "]), TEXT)
    message = st.fixed_dictionaries(
        {"role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "", "ROOT",
                                            "<|im_end|>", "{{ raise }}"]), ANY),
         "content": st.one_of(TEXT, st.none(), ANY)},
        optional={"tool_calls": ANY, "name": TEXT, "reasoning_content": TEXT, "extra": ANY})
    table: dict[str, st.SearchStrategy[Any]] = {
        "seq": seqs,
        "tokens": token_lists(lv),
        "continue_tokens": token_lists(lv),
        "keep_alive": st.sampled_from([-1, 0, 0.5, 300, 10 ** 7, 10 ** 7 + 1, -2, None]),
        "text": st.one_of(TEXT, st.just("x" * protocol.MAX_TEXT_CHARS),
                          st.just("é" * 5000), st.just("<|im_start|>" * 50)),
        "prompt": st.one_of(TEXT, st.just("x" * (lv.n_ctx + 10)), st.just("hi")),
        "add_special": st.booleans(), "parse_special": st.booleans(), "special": st.booleans(),
        "ignore_eos": st.booleans(), "stream": st.booleans(), "normalize": st.booleans(),
        "add_generation_prompt": st.booleans(), "enable_thinking": st.one_of(st.booleans(),
                                                                             st.none()),
        "max_tokens": st.sampled_from([0, 1, 2, 16, 65536, 65537, -1]),
        "stop": st.lists(st.one_of(TEXT, st.just("a" * 256), st.just("a" * 257), st.just("")),
                         max_size=17),
        "sampling": st.one_of(sampling_maps(lv), st.none()),
        "session": st.one_of(names, st.none()),
        "deadline_ms": st.sampled_from([0, 1, 5, 1000, 1 << 40, (1 << 63) - 1, -1]),
        "data": mutated_blob(lv),
        "grammar": st.one_of(gbnf_text(), TEXT),
        "json_schema": st.one_of(SCHEMA, st.text(max_size=30), st.booleans(), st.none()),
        "name": names,
        "path": paths,
        "scales": st.dictionaries(names, st.one_of(FLOATS, ANY_INT, ANY), max_size=4),
        "texts": st.lists(TEXT, max_size=6) | st.just(["x"] * protocol.MAX_EMBED_TEXTS),
        "messages": st.lists(message, max_size=5),
        "system": st.one_of(TEXT, st.none()),
        "target": st.one_of(ANY_INT, st.just(lv._next_id)),
        "model": names, "wait_ms": ANY_INT,
        "exclude": st.lists(st.integers(0, 2 ** 40), max_size=4) | ANY,
    }
    good = table.get(name, ANY)
    return st.one_of(good, good, good, ANY)


@st.composite
def command_args(draw: st.DrawFn, lv: Live, cmd: str) -> Any:
    spec = protocol.COMMANDS[cmd]
    mode = draw(st.integers(0, 9))
    if mode == 0:
        return draw(ANY)  # args that may not even be a map
    if mode == 1:  # a random map over real and made-up keys
        return draw(st.dictionaries(st.one_of(st.sampled_from(sorted(spec.fields) or ["x"]), KEYS),
                                    ANY, max_size=6))
    args: dict[Any, Any] = {}
    for name, f in spec.fields.items():
        if draw(st.integers(0, 4)) == 0 and (not f.required or mode == 2):
            continue  # omitted (a required one only now and then)
        args[name] = draw(field_values(lv, cmd, name))
    if mode == 3:
        args[draw(KEYS)] = draw(ANY)
    return args


# -- the tests ---------------------------------------------------------------------------------
def _frames_strategy() -> st.SearchStrategy[tuple[str, list[bytes]]]:
    ping = protocol.request(7, "ping")
    real = msgpack.packb({"v": 1, "id": 3, "cmd": "tokenize", "args": {"text": "abc"}})
    return st.one_of(
        st.tuples(st.just("random"), st.lists(st.binary(max_size=300), min_size=1, max_size=1)),
        st.tuples(st.just("empty"), st.just([b""])),
        st.tuples(st.just("truncated"), st.integers(0, len(real) - 1).map(
            lambda i: [real[:i]])),
        st.tuples(st.just("garbage-tail"), st.binary(min_size=1, max_size=20).map(
            lambda t: [real + t])),
        st.tuples(st.just("bitflip"), st.tuples(st.integers(0, len(real) - 1),
                                                st.integers(0, 7)).map(
            lambda p: [real[:p[0]] + bytes([real[p[0]] ^ (1 << p[1])]) + real[p[0] + 1:]])),
        st.tuples(st.just("non-map"), ANY.filter(lambda x: not isinstance(x, dict)).map(
            lambda x: [msgpack.packb(x, use_bin_type=True)])),
        st.tuples(st.just("map"), st.dictionaries(st.one_of(
            st.sampled_from(["v", "id", "cmd", "args", "kind"]), KEYS), ANY, max_size=6).map(
            lambda d: [msgpack.packb(d, use_bin_type=True)])),
        st.tuples(st.just("envelope"), st.fixed_dictionaries(
            {"v": st.one_of(st.just(1), st.just(1.0), st.just(True), ANY),
             "id": st.one_of(ANY_INT, ANY),
             "cmd": st.one_of(st.sampled_from(sorted(protocol.COMMANDS)), TEXT, ANY),
             "args": st.one_of(st.just({}), ANY)}).map(
            lambda d: [msgpack.packb(d, use_bin_type=True)])),
        st.tuples(st.just("unhashable-key"), st.just(
            [b"\x84\xa1v\x01\xa2id\x01\xa3cmd\xa4ping\x91\x01\x01"])),
        st.tuples(st.just("deep-nesting"), st.integers(100, 200_000).map(
            lambda n: [b"\x91" * n + b"\xc0"])),
        st.tuples(st.just("huge-declared-len"), st.sampled_from(
            [[b"\xdb\xff\xff\xff\xff"], [b"\xdd\xff\xff\xff\xff"], [b"\xdf\xff\xff\xff\xff"],
             [b"\xc6\x7f\xff\xff\xff"]])),
        st.tuples(st.just("ext-type"), st.just([b"\x84\xa1v\x01\xa2id\x01\xa3cmd\xa4ping"
                                                b"\xa4args\xd4\x05\x00"])),
        st.tuples(st.just("timestamp-ext"), st.just([b"\xd6\xff\x00\x00\x00\x01"])),
        st.tuples(st.just("multi-frame"), st.lists(st.sampled_from([ping, b"", b"x"]),
                                                   min_size=2, max_size=4)),
        st.tuples(st.just("big-allowed"), st.sampled_from(range(len(_big_frames()))).map(
            lambda i: [_big_frames()[i]])),
    )


@functools.lru_cache(maxsize=1)
def _big_frames() -> list[bytes]:
    """Large but allowed (and just over the limit) requests, built once."""
    return [
        protocol.request(9, "tokenize", {"text": "y" * protocol.MAX_TEXT_CHARS}),
        protocol.request(9, "tokenize", {"text": "y" * (protocol.MAX_TEXT_CHARS + 1)}),
        protocol.request(9, "kv_unpack", {"seq": 1, "data": os.urandom(8 << 20)}),
        protocol.request(9, "detokenize", {"tokens": [5] * protocol.MAX_TOKENS_IN}),
        protocol.request(9, "detokenize", {"tokens": [5] * (protocol.MAX_TOKENS_IN + 1)}),
        protocol.request(9, "prefill", {"seq": 1, "tokens": [5] * protocol.MAX_TOKENS_IN}),
        protocol.request(9, "embed", {"texts": ["z" * 1000] * protocol.MAX_EMBED_TEXTS}),
        protocol.request(9, "generate", {"prompt": "y" * protocol.MAX_TEXT_CHARS}),
    ]


def _expected_id(payload: bytes) -> Any:
    try:
        msg = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001
        return None
    if isinstance(msg, dict) and msg.get("v") == 1:
        rid = msg.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool):
            return rid
    return None


@fuzz_settings(150)
@given(data=st.data())
def test_malformed_frames(live: Live, data: st.DataObject) -> None:
    kind, frames = data.draw(_frames_strategy(), label="frames")
    what = f"{kind}: {[f[:120] for f in frames]!r}"
    live.send_raw(frames)
    if len(frames) != 1:
        # a DEALER multi-part message is not a request: no reply, and the next one works
        live.check_alive(what)
        return
    rid = _expected_id(frames[0])
    msg = live.recv(REPLY_TIMEOUT)
    if msg is None:
        raise Violation(f"HANG: no reply to {what}")
    if msg["kind"] == "chunk":
        # a well-formed generate slipped through; wait for its end
        live.collect({msg["id"]: "generate"}, what)
    elif msg["kind"] == "error":
        code = msg["error"]["code"]
        if code == "internal":
            live.internal.append(f"frame {what}: {msg['error']['message']}")
        assert code in ALLOWED_CODES or (COLLECT and code == "internal"), \
            f"{code} for {what}: {msg['error']['message']}"
    if rid is not None:
        assert msg["id"] == rid, f"reply id {msg['id']!r} != request id {rid!r} for {what}"
    live.check_alive(what)
    live.reset()


@fuzz_settings(300)
@given(data=st.data())
def test_random_args_for_every_command(live: Live, data: st.DataObject) -> None:
    cmd = data.draw(st.sampled_from(sorted(protocol.COMMANDS)), label="cmd")
    args = data.draw(command_args(live, cmd), label="args")
    rid = data.draw(st.one_of(st.just(None), INT64), label="id")
    rid = live.new_id() if rid is None else rid  # any int64/uint64 id must come back as is
    what = f"{cmd} {args!r}"
    try:
        frame = protocol.pack({"v": 1, "id": rid, "cmd": cmd, "args": args})
    except BadRequest:  # msgpack cannot carry it (an integer past 64 bits): never sent
        frame = None
    if frame is not None:
        live.send_raw([frame])
        live.collect({rid: cmd}, what)
    live.check_alive(what)
    live.reset()


@fuzz_settings(150)
@given(data=st.data())
def test_random_sampling_params(live: Live, data: st.DataObject) -> None:
    """The largest argument surface (sampling maps, grammars, schemas) gets its own budget."""
    cmd = data.draw(st.sampled_from(["set_sampling", "decode", "generate", "set_grammar"]))
    seq = data.draw(st.sampled_from([0, 1, N_SEQ - 1]))
    if data.draw(st.booleans()):
        # start from an empty sequence: earlier examples may have filled its context
        assert live.call("seq_clear", {"seq": seq})["kind"] == "result"
        r = live.call("prefill", {"seq": seq, "tokens": live.sample_tokens})
        assert r["kind"] == "result", r
    if cmd == "set_grammar":
        args: dict[str, Any] = data.draw(st.one_of(
            st.fixed_dictionaries({"seq": st.just(seq), "grammar": st.one_of(gbnf_text(), TEXT)}),
            st.fixed_dictionaries({"seq": st.just(seq), "json_schema": st.one_of(
                SCHEMA, st.text(max_size=30))})))
    else:
        args = {"sampling": data.draw(sampling_maps(live))}
        if cmd == "generate":
            args.update(prompt="hi", max_tokens=data.draw(st.sampled_from([1, 8, 64])),
                        stream=data.draw(st.booleans()))
            if data.draw(st.booleans()):
                args["seq"] = seq
        else:
            args["seq"] = seq
    what = f"{cmd} {args!r}"
    rid = live.new_id()
    if live.send_request(rid, cmd, args):
        live.collect({rid: cmd}, what)
    if cmd in ("set_sampling", "set_grammar"):
        # the sampler that was (or was not) installed must still sample sanely
        rid = live.new_id()
        live.send_raw([protocol.request(rid, "decode", {"seq": seq})])
        live.collect({rid: "decode"}, f"decode after {what}")
    live.check_alive(what)
    live.reset()


@st.composite
def command_sequence(draw: st.DrawFn, lv: Live) -> list[tuple[str, dict[str, Any], bool]]:
    """A list of (cmd, args, wait) on sequences 0..2 (seq 3 stays free for seq-less
    generates), pipelined unless ``wait``; cancel targets earlier generate requests."""
    seqs = st.sampled_from([0, 1, 2, 0, 1, N_SEQ])
    small_tokens = st.lists(st.integers(0, lv.n_vocab - 1), min_size=1, max_size=12)
    ops: list[tuple[str, dict[str, Any], bool]] = []
    for _ in range(draw(st.integers(1, 10))):
        cmd = draw(st.sampled_from(["prefill", "decode", "kv_pack", "kv_unpack", "seq_clear",
                                    "set_sampling", "generate", "generate", "cancel",
                                    "set_grammar", "tokenize", "ping"]))
        a: dict[str, Any]
        if cmd == "prefill":
            a = {"seq": draw(seqs), "tokens": draw(small_tokens)}
        elif cmd == "decode":
            a = {"seq": draw(seqs)}
            if draw(st.booleans()):
                a["sampling"] = {"temperature": draw(st.sampled_from([0.0, 0.7, 2.0])),
                                 "seed": draw(st.integers(0, 5))}
        elif cmd in ("kv_pack", "seq_clear"):
            a = {"seq": draw(seqs)}
        elif cmd == "kv_unpack":
            a = {"seq": draw(seqs), "data": draw(st.one_of(st.just(lv.blob),
                                                           mutated_blob(lv)))}
        elif cmd == "set_sampling":
            a = {"seq": draw(seqs), "sampling": draw(st.one_of(
                st.just({"temperature": 0.0}), sampling_maps(lv)))}
        elif cmd == "set_grammar":
            a = {"seq": draw(seqs), "grammar": draw(st.one_of(
                st.just('root ::= [a-z]+ "."'), gbnf_text()))}
        elif cmd == "generate":
            a = {"max_tokens": draw(st.sampled_from([0, 1, 4, 32, 300])),
                 "stream": draw(st.booleans()), "ignore_eos": draw(st.booleans()),
                 "sampling": {"temperature": draw(st.sampled_from([0.0, 0.8]))}}
            if draw(st.booleans()):
                a["prompt"] = draw(st.sampled_from(["hi", "Once upon a time", "x" * 40]))
            else:
                a["tokens"] = draw(st.one_of(small_tokens, st.just([])))
            if draw(st.integers(0, 2)) == 0:
                a["seq"] = draw(seqs)
            if draw(st.integers(0, 4)) == 0:
                a["deadline_ms"] = draw(st.sampled_from([0, 1, 20]))
            if draw(st.integers(0, 5)) == 0:
                a["stop"] = draw(st.lists(st.sampled_from(["e", "the", " ", ""]), max_size=2))
        elif cmd == "cancel":
            gens = [i for i, (c, _, _) in enumerate(ops) if c == "generate"]
            a = {"target": draw(st.sampled_from(gens)) if gens else -1}  # index, fixed below
        elif cmd == "tokenize":
            a = {"text": draw(TEXT)}
        else:
            a = {}
        ops.append((cmd, a, draw(st.booleans())))
    return ops


@fuzz_settings(120)
@given(data=st.data())
def test_pipelined_command_sequences(live: Live, data: st.DataObject) -> None:
    ops = data.draw(command_sequence(live), label="ops")
    ids: list[int] = []
    pending: dict[int, str] = {}
    answered: dict[int, dict[str, Any]] = {}
    what = repr([(c, {k: (v[:16] if isinstance(v, bytes) else v) for k, v in a.items()}, w)
                 for c, a, w in ops])
    for cmd, a, wait in ops:
        rid = live.new_id()
        if cmd == "cancel":
            t = a["target"]
            a = {"target": ids[t] if 0 <= t < len(ids) else live.new_id()}
        ids.append(rid)
        if live.send_request(rid, cmd, a):
            pending[rid] = cmd
        else:
            answered[rid] = {"kind": "error", "client_side": True}
        if wait:
            answered.update(live.collect(pending, what))
            pending = {}
    answered.update(live.collect(pending, what))
    assert len(answered) == len(ops)
    live.check_alive(what)
    live.reset()


#: Inputs the long hunting runs found (minimal forms). Each must be refused as bad input
#: (or served), never answered with ``internal`` nor crash the worker.
REGRESSIONS = [
    ("load_adapter", {"name": "a", "path": "\x00"}),                       # NUL in a path
    ("set_sampling", {"seq": 0, "sampling": {"": None, 0: 1}}),            # mixed key types
    ("set_sampling", {"seq": 0, "sampling": {"logit_bias": {math.inf: 1.0}}}),
    ("set_sampling", {"seq": 0, "sampling": {"json_schema": {"a": b"x"}}}),
    ("set_grammar", {"seq": 0, "json_schema": {"type": "string", "maxLength": 8738}}),
    # bounds the converter writes out element by element: minutes of GIL-held string
    # building, so the worker missed its heartbeats and was killed, again on each replay
    ("set_grammar", {"seq": 0, "json_schema": {"type": "string", "minLength": 0,
                                               "maxLength": 2147483647}}),
    ("set_grammar", {"seq": 0, "json_schema": {"type": "string",
                                               "pattern": "^a{0,2147483647}$"}}),
    ("generate", {"prompt": "hello hello", "max_tokens": 8, "stream": False,
                  "sampling": {"repeat_penalty": 0, "temperature": 0}}),
]


@pytest.mark.parametrize("cmd,args", REGRESSIONS, ids=[f"{c}-{i}" for i, (c, _) in
                                                      enumerate(REGRESSIONS)])
def test_found_bad_inputs_are_refused_cleanly(live: Live, cmd: str, args: dict[str, Any]) -> None:
    rid = live.new_id()
    live.send_raw([protocol.pack({"v": 1, "id": rid, "cmd": cmd, "args": args})])
    live.collect({rid: cmd}, f"{cmd} {args!r}")
    live.check_alive(f"{cmd} {args!r}")
    live.reset()


def test_fuzz_counts_are_recorded(live: Live) -> None:
    """Runs last per backend: nothing crashed and no internal error was seen."""
    assert live.crashes == 0
    assert not live.internal, "internal errors:\n" + "\n".join(live.internal)
    assert live.cases > 0
