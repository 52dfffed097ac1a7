"""The worker's command table: one handler per worker command of the protocol.

A handler takes the worker, the validated arguments and the caller's key,
and returns the command's declared reply (or None when the reply comes later,
as for ``generate``). The table is checked against :data:`protocol.COMMANDS`
when this module loads: a worker command without a handler, a handler for no
command, or a handler whose reply type differs from the declaration fails at
once. A new command is one declaration in the protocol and one handler here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from llamafleet.runtime import protocol
from llamafleet.runtime.errors import BadRequest, NotSupported
from llamafleet.runtime.sampling import SamplingParams
from llamafleet.worker.generation import Generation

if TYPE_CHECKING:
    from llamafleet.worker.server import Worker

Args = dict[str, Any]
#: (client identity, request id): who asked
Key = tuple[bytes, int]
Handler = Callable[["Worker", Args, Key], protocol.Message | None]
H = TypeVar("H", bound=Handler)

HANDLERS: dict[str, Handler] = {}
#: commands that act on one caller-managed sequence (checked before the handler runs)
SEQ_COMMANDS = frozenset({"prefill", "decode", "kv_pack", "kv_unpack", "seq_clear",
                          "set_sampling", "set_grammar"})


def handles(cmd: str) -> Callable[[H], H]:
    """Register the decorated function as the handler of worker command ``cmd``."""
    spec = protocol.COMMANDS.get(cmd)
    if spec is None or spec.target != "worker":
        raise AssertionError(f"handler for {cmd!r}, which is not a worker command")
    if cmd in HANDLERS:
        raise AssertionError(f"two handlers for {cmd!r}")

    def register(fn: H) -> H:
        HANDLERS[cmd] = fn
        return fn

    return register


def check_table() -> None:
    """Every worker command has exactly one handler (raises AssertionError)."""
    declared = {c.name for c in protocol.COMMANDS.values() if c.target == "worker"}
    missing = declared - set(HANDLERS)
    extra = set(HANDLERS) - declared
    if missing or extra:
        raise AssertionError(f"worker command table out of step with the protocol: "
                             f"no handler for {sorted(missing)}, no command for {sorted(extra)}")


# -- handlers -------------------------------------------------------------------------
@handles("ping")
def ping(w: Worker, a: Args, caller: Key) -> protocol.Pong:
    return protocol.Pong(model=w.spec.model, pid=os.getpid(), generation=w.spec.generation)


@handles("info")
def info(w: Worker, a: Args, caller: Key) -> protocol.Info:
    b, sched = w.loaded()
    mi = b.info()
    return protocol.Info(
        **{k: getattr(mi, k) for k in protocol.ModelInfo.__dataclass_fields__},
        model=w.spec.model, adapters=b.adapters(), sampling=dict(w.default_sampling),
        scheduler=protocol.SchedulerStats(running=len(sched.running), queued=len(sched.queue),
                                          max_queue=sched.max_queue, ticks=sched.ticks,
                                          peak_running=sched.peak_running),
        cache=w.cache.stats() if w.cache is not None else None)


@handles("metrics")
def metrics(w: Worker, a: Args, caller: Key) -> protocol.WorkerMetrics:
    b, sched = w.loaded()
    c = sched.counters
    return protocol.WorkerMetrics(
        model=w.spec.model, pid=os.getpid(), generation=w.spec.generation,
        requests_running=len(sched.running), requests_waiting=len(sched.queue),
        prompt_tokens=c.prompt_tokens, cached_tokens=c.cached_tokens,
        generated_tokens=c.generated_tokens, drafted_tokens=c.drafted_tokens,
        accepted_tokens=c.accepted_tokens, prefix_cache_queries=c.prefix_cache_queries,
        prefix_cache_hits=c.prefix_cache_hits,
        kv_used_tokens=sum(b.seq_len(s) for s in range(b.info().n_seq_max)),
        kv_capacity_tokens=b.info().n_ctx, finished=dict(c.finish_reasons),
        failed=dict(c.error_codes), histograms=c.histogram_wire())


@handles("tokenize")
def tokenize(w: Worker, a: Args, caller: Key) -> protocol.Tokens:
    b, _ = w.loaded()
    return protocol.Tokens(tokens=b.tokenize(a["text"], a["add_special"], a["parse_special"]))


@handles("detokenize")
def detokenize(w: Worker, a: Args, caller: Key) -> protocol.Text:
    b, _ = w.loaded()
    return protocol.Text(text=b.detokenize(a["tokens"], special=a["special"]))


@handles("cancel")
def cancel(w: Worker, a: Args, caller: Key) -> protocol.CancelResult:
    _, sched = w.loaded()
    # a client can only cancel its own requests
    return protocol.CancelResult(cancelled=sched.cancel((caller[0], a["target"])))


@handles("prefill")
def prefill(w: Worker, a: Args, caller: Key) -> protocol.SeqLength:
    b, _ = w.loaded()
    if not a["tokens"]:
        raise BadRequest("prefill: tokens must not be empty")
    b.prefill(a["seq"], a["tokens"])
    return protocol.SeqLength(n_tokens=b.seq_len(a["seq"]))


@handles("decode")
def decode(w: Worker, a: Args, caller: Key) -> protocol.Decoded:
    b, _ = w.loaded()
    seq = a["seq"]
    if a["sampling"] is not None:
        b.set_sampling(seq, w.sampling(a["sampling"]))
    token = b.sample(seq)
    if token is None:
        return protocol.Decoded(token=None, piece="", eog=True, reason="grammar",
                                n_tokens=b.seq_len(seq))
    eog = b.is_eog(token)
    if not eog:
        b.evaluate([(seq, [token])])
    piece = b.token_to_piece(token, special=False)
    return protocol.Decoded(token=token, piece=piece.decode("utf-8", errors="replace"),
                            bytes=piece, eog=eog, reason="eog" if eog else None,
                            n_tokens=b.seq_len(seq))


@handles("kv_pack")
def kv_pack(w: Worker, a: Args, caller: Key) -> protocol.KvBlob:
    b, _ = w.loaded()
    data = b.kv_pack(a["seq"])
    return protocol.KvBlob(data=data, n_tokens=b.seq_len(a["seq"]))


@handles("kv_unpack")
def kv_unpack(w: Worker, a: Args, caller: Key) -> protocol.SeqLength:
    b, _ = w.loaded()
    return protocol.SeqLength(n_tokens=b.kv_unpack(a["seq"], bytes(a["data"])))


@handles("seq_clear")
def seq_clear(w: Worker, a: Args, caller: Key) -> protocol.Empty:
    b, _ = w.loaded()
    b.seq_clear(a["seq"])
    return protocol.Empty()


@handles("set_sampling")
def set_sampling(w: Worker, a: Args, caller: Key) -> protocol.Empty:
    b, _ = w.loaded()
    b.set_sampling(a["seq"], w.sampling(a["sampling"]))
    return protocol.Empty()


@handles("set_grammar")
def set_grammar(w: Worker, a: Args, caller: Key) -> protocol.Empty:
    b, _ = w.loaded()
    params = SamplingParams(temperature=0.0, grammar=a["grammar"], json_schema=a["json_schema"])
    params.validate()
    b.set_sampling(a["seq"], params)
    return protocol.Empty()


@handles("load_adapter")
def load_adapter(w: Worker, a: Args, caller: Key) -> protocol.AdapterLoaded:
    b, _ = w.loaded()
    if "lora" not in b.info().features:
        raise NotSupported(f"the {b.name or type(b).__name__} backend does not support LoRA "
                           "adapters")
    if len(b.adapters()) >= protocol.MAX_ADAPTERS:
        raise BadRequest(f"at most {protocol.MAX_ADAPTERS} adapters may be loaded")
    loaded = dict(b.load_adapter(a["name"], w.confine(a["path"], "adapter_dirs")))
    return protocol.AdapterLoaded(name=str(loaded.pop("name", a["name"])),
                                  path=str(loaded.pop("path", "")), extra=loaded)


@handles("unload_adapter")
def unload_adapter(w: Worker, a: Args, caller: Key) -> protocol.Empty:
    b, _ = w.loaded()
    b.unload_adapter(a["name"])
    return protocol.Empty()


@handles("set_adapters")
def set_adapters(w: Worker, a: Args, caller: Key) -> protocol.Adapters:
    b, _ = w.loaded()
    b.set_adapters({k: float(v) for k, v in a["scales"].items()})
    return protocol.Adapters(adapters=b.adapters())


@handles("embed")
def embed(w: Worker, a: Args, caller: Key) -> protocol.Embeddings:
    b, _ = w.loaded()
    return protocol.Embeddings(embeddings=b.embed(a["texts"], normalize=a["normalize"]))


@handles("apply_chat_template")
def apply_chat_template(w: Worker, a: Args, caller: Key) -> protocol.Prompt:
    b, _ = w.loaded()
    messages = list(a["messages"])
    if a["system"] is not None:
        messages = [{"role": "system", "content": a["system"]}] + messages
    return protocol.Prompt(prompt=b.apply_chat_template(
        messages, add_generation_prompt=a["add_generation_prompt"],
        enable_thinking=a["enable_thinking"], tools=a["tools"]))


@handles("generate")
def generate(w: Worker, a: Args, caller: Key) -> None:
    """Validate and queue a generation; the scheduler sends its chunks and result."""
    b, sched = w.loaded()
    if a["prompt"] is not None and a["tokens"] is not None:
        raise BadRequest("generate: give either prompt or tokens, not both")
    if a["seq"] is not None and a["session"] is not None:
        raise BadRequest("generate: a session uses its own sequence; do not give seq")
    if a["tokens"] is not None:
        prompt_tokens = list(a["tokens"])
        b.check_tokens(prompt_tokens)
    else:
        prompt_tokens = b.tokenize(a["prompt"], a["add_special"], a["parse_special"])
    params = w.sampling(a["sampling"])
    mi = b.info()
    continued = list(a["continue_tokens"])
    if continued:
        if a["seq"] is not None:
            raise BadRequest("generate: continue_tokens resumes a generation in a sequence "
                             "of its own; do not give seq")
        b.check_tokens(continued)  # at max_tokens already: it ends at once ("length")
    if a["keep_alive"] is not None:
        w.requested_keep_alive = float(a["keep_alive"])
    if a["logprobs"] is not None and "logprobs" not in mi.features:
        raise NotSupported(f"the {mi.backend} backend does not report logprobs")
    in_use = 0
    if a["seq"] is not None:
        w.check_seq(a["seq"])
        in_use = b.seq_len(a["seq"])
        if not prompt_tokens and in_use == 0:
            raise BadRequest(f"generate: sequence {a['seq']} is empty and no prompt was given")
    elif not prompt_tokens:
        raise BadRequest("generate: empty prompt")
    if in_use + len(prompt_tokens) + len(continued) + 1 > mi.n_ctx:
        raise BadRequest(f"prompt of {len(prompt_tokens)} tokens does not fit the context "
                         f"({mi.n_ctx} tokens, {in_use} in use)",
                         data={"n_ctx": mi.n_ctx, "prompt_tokens": len(prompt_tokens)})
    deadline = None
    if a["deadline_ms"] is not None:
        deadline = time.monotonic() + a["deadline_ms"] / 1000
    sched.submit(Generation(
        peer=caller[0], req_id=caller[1], stream=a["stream"], prompt_tokens=prompt_tokens,
        params=params, max_tokens=min(a["max_tokens"], mi.n_ctx - in_use - len(prompt_tokens)),
        stop=a["stop"], ignore_eos=a["ignore_eos"], seq=a["seq"], deadline=deadline,
        session=a["session"], model=w.spec.model, logprobs=a["logprobs"],
        continued=continued,
        continued_pieces=[b.token_to_piece(t, special=False) for t in continued],
        speculative=w.speculative(a["speculative"])))
    return None


check_table()
