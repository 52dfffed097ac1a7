"""The bench's speculative-decoding phase: lookup against plain decoding, interleaved.

Single stream, greedy, through the fleet: each round generates the same prompt
plain (``speculative=None``) and then with prompt lookup (``speculative="lookup"``),
on an input-grounded prompt (repeat a given text of about 500 tokens, where lookup
helps) and on free text (where it should cost nothing). Reported per prompt: the
median of the per-round ratios of the worker's tokens/s and their spread, whether
the tokens were the same in every round, and the drafted/accepted counts.

:func:`phase_speculative_peers` adds, in the same run: lookup against llama-cpp-python's
``LlamaPromptLookupDecoding`` (``lookup_peer.py``) on the grounded prompt, eight clients
with lookup against eight without, and draft models (the model as its own draft, a tiny
GGUF pair) on a second fleet.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from llamafleet.bench.peers import LineProcess, concurrent_run, ratios
from llamafleet.client import Client

#: starts a supervisor serving the given models (name to options), stops it on exit
Fleet = Callable[[dict[str, dict[str, Any]]], AbstractContextManager[Any]]

#: about 500 SmolLM2 tokens of plain prose
TEXT = (
    "The harbour town woke slowly in the grey light of early spring. Fishing boats rocked "
    "against the stone quay, their ropes creaking, while gulls circled above the market "
    "square and argued over scraps. Anna opened the bakery at six, as her mother had done "
    "for thirty years, and the smell of fresh bread drifted down the narrow street toward "
    "the water. The first customers were always the same: the harbour master, who bought "
    "two rolls and a newspaper; the schoolteacher, who never had the right change; and old "
    "Peter, who came for the warmth of the ovens more than for the bread. By eight the queue "
    "reached the door. Anna worked quickly, wrapping loaves in brown paper, counting coins, "
    "asking after children and boats and the price of diesel. Nobody in the town hurried, "
    "but everybody was busy, and the morning passed in a steady rhythm of small talk and "
    "warm crusts. In the afternoon the wind turned and came in from the sea. Clouds gathered "
    "over the headland, dark and heavy, and the fishermen began to bring their boats into "
    "the shelter of the inner harbour. Anna closed the shutters early and walked down to "
    "the quay to watch. Her brother was still out beyond the point, and she knew that the "
    "tide would turn within the hour. She stood with the other families in silence, hands "
    "in pockets, eyes on the horizon. When the small blue boat finally rounded the rocks, "
    "someone laughed with relief, and the crowd slowly broke apart. That evening the storm "
    "arrived in earnest. Rain drummed on the roofs, the harbour lights swung on their "
    "cables, and the sea threw spray over the wall. Inside the bakery Anna lit the ovens "
    "for the next day, listening to the wind, and thought that the town had survived "
    "worse nights than this one, and would survive many more.")
PROMPTS = {
    "grounded": "Repeat the following text exactly, word for word:\n\n" + TEXT,
    "free": "Write a long story about a dragon who learns to cook.",
}


def _one(c: Client, model: str, prompt: str, n: int, speculative: str | None
         ) -> dict[str, Any]:
    r = c.generate(model, prompt, max_tokens=n, temperature=0, ignore_eos=True,
                   speculative=speculative)
    return {"tokens_per_s": r.stats.tokens_per_s, "tokens": list(r.tokens),
            "drafted": r.stats.drafted_tokens, "accepted": r.stats.accepted_tokens}


def phase_speculative(sup: Any, model: str, q: dict[str, Any],
                      progress: Callable[[str], None]) -> dict[str, Any]:
    """Lookup vs plain on SmolLM2 (or the bench's model), ``q["rounds"]`` interleaved
    rounds of ``q["tokens"]`` tokens (at least 3 rounds)."""
    n, rounds = q["tokens"], max(3, q["rounds"])
    out: dict[str, Any] = {"tokens": n, "rounds": rounds}
    with Client(sup.address) as c:
        _one(c, model, PROMPTS["free"], 8, "lookup")  # warm-up
        for name, prompt in PROMPTS.items():
            ratios: list[float] = []
            same = True
            drafted = accepted = 0
            for r in range(rounds):
                progress(f"speculative: {name} prompt, round {r + 1}/{rounds}")
                plain = _one(c, model, prompt, n, None)
                spec = _one(c, model, prompt, n, "lookup")
                same = same and plain["tokens"] == spec["tokens"]
                drafted += spec["drafted"]
                accepted += spec["accepted"]
                if plain["tokens_per_s"] and spec["tokens_per_s"]:
                    ratios.append(spec["tokens_per_s"] / plain["tokens_per_s"])
            out[name] = {
                "ratio": statistics.median(ratios) if ratios else None,
                "ratio_min": min(ratios, default=None), "ratio_max": max(ratios, default=None),
                "ratios": ratios, "same_tokens": same, "drafted_tokens": drafted,
                "accepted_tokens": accepted,
                "acceptance": accepted / drafted if drafted else None}
    out["lookup_ratio"] = out["grounded"]["ratio"]
    out["free_text_ratio"] = out["free"]["ratio"]
    out["same_tokens"] = out["grounded"]["same_tokens"] and out["free"]["same_tokens"]
    return out


def phase_speculative_peers(sup: Any, model: str, q: dict[str, Any],
                            progress: Callable[[str], None], model_path: Path, threads: int,
                            n_ctx: int, fleet: Fleet) -> dict[str, Any]:
    """The figures beside lookup vs plain: llama-cpp-python's prompt lookup on the
    grounded prompt, eight clients with and without lookup, and draft models (on a
    second fleet from ``fleet(models)``)."""
    with Client(sup.address) as c:
        peer = lookup_vs_llama_cpp_python(c, model, q, progress, model_path, threads, n_ctx)
        c8 = c8_lookup(c, model, q, progress)
    drafts = draft_models(fleet, model_path, threads, q["tokens"], progress)
    invariant = batch_invariant_lookup(fleet, model_path, threads, n_ctx, q, progress)
    self_draft = drafts["self"]
    return {"llama_cpp_python_lookup": peer, "c8": c8, "draft_model": drafts,
            "batch_invariant": invariant,
            "invariant_same_tokens": invariant["same_tokens"],
            "invariant_lookup_vs_plain": invariant["grounded"]["vs_default_plain"],
            "lookup_vs_llama_cpp_python": peer.get("ratio"), "c8_ratio": c8["ratio"],
            "c8_ratio_spread": c8["ratio_spread"],
            "draft_model_acceptance": self_draft.get("acceptance")}


class LookupPeer(LineProcess):
    """llamafleet/bench/lookup_peer.py in a subprocess, driven line by line."""

    name = "llama-cpp-python lookup peer"

    def __init__(self, model: Path, threads: int, n_ctx: int, num_pred_tokens: int) -> None:
        super().__init__([sys.executable, str(Path(__file__).with_name("lookup_peer.py")),
                          "--model", str(model), "--threads", str(threads),
                          "--n-ctx", str(n_ctx), "--num-pred-tokens", str(num_pred_tokens)])

    def run(self, tokens: list[int], n: int) -> dict[str, Any]:
        return self.request({"tokens": tokens, "n": n})


#: llama-cpp-python's default draft length (its docs suggest 2 on CPU-only machines;
#: 10 is its default, and our drafts go up to draft_max = 16 on the grounded prompt)
NUM_PRED_TOKENS = 10


def lookup_vs_llama_cpp_python(c: Client, model: str, q: dict[str, Any],
                               progress: Callable[[str], None], model_path: Path,
                               threads: int, n_ctx: int) -> dict[str, Any]:
    """Ours with lookup vs ``Llama(draft_model=LlamaPromptLookupDecoding(...))`` on the
    grounded prompt (the same token ids), greedy, interleaved rounds; tokens/s as
    each side times it (first generated token to the last)."""
    n, rounds = q["tokens"], max(3, q["rounds"])
    prompt = PROMPTS["grounded"]
    progress(f"speculative: starting llama-cpp-python's LlamaPromptLookupDecoding "
             f"(num_pred_tokens {NUM_PRED_TOKENS})")
    peer = LookupPeer(model_path, threads, n_ctx, NUM_PRED_TOKENS)
    try:
        if "error" in peer.hello:
            progress(f"speculative: llama-cpp-python's lookup skipped: {peer.hello['error']}")
            return {"ratio": None, "skipped": peer.hello["error"]}
        ids = c.tokenize(model, prompt)
        peer.run(ids, 8)  # warm-up (ours was warmed up by phase_speculative)
        ours: list[dict[str, Any]] = []
        theirs: list[dict[str, Any]] = []
        for r in range(rounds):
            progress(f"speculative: vs llama-cpp-python lookup, round {r + 1}/{rounds}")
            ours.append(_one(c, model, prompt, n, "lookup"))
            theirs.append(peer.run(ids, n))
    finally:
        peer.close()
    ratio, spread = ratios([o["tokens_per_s"] for o in ours],
                           [t["tokens_per_s"] for t in theirs])
    return {"ratio": ratio, "ratio_spread": spread, "tokens": n, "rounds": rounds,
            "num_pred_tokens": NUM_PRED_TOKENS, "prompt_tokens": len(ids),
            "ours_tokens_per_s": [o["tokens_per_s"] for o in ours],
            "peer_tokens_per_s": [t["tokens_per_s"] for t in theirs],
            "same_tokens": all(o["tokens"] == t["tokens"] for o, t in zip(ours, theirs)),
            # where the two greedy outputs part (llama.cpp's batched vs single-token
            # logits differ slightly; see docs/benchmarks.md), None if they never do
            "first_difference": min((_first_difference(o["tokens"], t["tokens"])
                                     for o, t in zip(ours, theirs)), default=None,
                                    key=lambda x: n if x is None else x),
            "peer_version": peer.hello.get("version")}


def batch_invariant_lookup(fleet: Fleet, model_path: Path, threads: int, n_ctx: int,
                           q: dict[str, Any], progress: Callable[[str], None]
                           ) -> dict[str, Any]:
    """Lookup with ``batch_invariant`` on (a second fleet: the same model twice, with
    and without it), interleaved rounds per prompt: default plain, invariant plain,
    invariant lookup. With it, lookup's greedy tokens must be the plain ones; the
    ratios say what that costs against the default plain decode."""
    base = {"backend": "llama", "path": str(model_path), "n_ctx": n_ctx, "n_seq_max": 1,
            "n_threads": threads, "n_threads_batch": threads}
    n, rounds = q["tokens"], max(3, q["rounds"])
    out: dict[str, Any] = {"tokens": n, "rounds": rounds}
    progress("speculative: batch_invariant (a second fleet: the model with and without it)")
    with fleet({"default": base, "invariant": {**base, "batch_invariant": True}}) as sup, \
            Client(sup.address) as c:
        for m in ("default", "invariant"):
            _one(c, m, PROMPTS["free"], 8, "lookup")  # warm-up
        for name, prompt in PROMPTS.items():
            rows: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []
            for r in range(rounds):
                progress(f"speculative: batch_invariant, {name} prompt, round {r + 1}/{rounds}")
                rows.append((_one(c, "default", prompt, n, None),
                             _one(c, "invariant", prompt, n, None),
                             _one(c, "invariant", prompt, n, "lookup")))
            tps = [[x[i]["tokens_per_s"] for x in rows] for i in range(3)]
            lookup, lookup_spread = ratios(tps[2], tps[1])
            vs_default, vs_default_spread = ratios(tps[2], tps[0])
            cost, cost_spread = ratios(tps[1], tps[0])
            out[name] = {
                "same_tokens": all(x[1]["tokens"] == x[2]["tokens"] for x in rows),
                # where the default plain decode parts from the invariant one (None: never)
                "default_first_difference": _first_difference(rows[0][0]["tokens"],
                                                              rows[0][1]["tokens"]),
                "lookup_vs_plain": lookup, "lookup_vs_plain_spread": lookup_spread,
                "vs_default_plain": vs_default, "vs_default_plain_spread": vs_default_spread,
                "plain_vs_default_plain": cost, "plain_vs_default_plain_spread": cost_spread,
                "accepted_tokens": sum(x[2]["accepted"] for x in rows),
                "drafted_tokens": sum(x[2]["drafted"] for x in rows)}
    out["same_tokens"] = all(out[p]["same_tokens"] for p in PROMPTS)
    return out


def _first_difference(a: list[int], b: list[int]) -> int | None:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return None if a == b else i


def c8_lookup(c: Client, model: str, q: dict[str, Any], progress: Callable[[str], None]
              ) -> dict[str, Any]:
    """Eight clients (one shared Client) on grounded prompts with lookup, then the same
    without it, interleaved rounds after a warm-up; aggregate tokens/s, the median
    per-round ratio."""
    n, rounds, per_client = q["conc_tokens"], max(3, q["rounds"]), q["requests_per_client"]
    counts = {"drafted": 0, "accepted": 0}  # the measured lookup runs'
    lock = threading.Lock()

    def runner(speculative: str | None, count: bool = False
               ) -> Callable[[int, int], dict[str, Any]]:
        def one(i: int, r: int) -> dict[str, Any]:
            res = c.generate(model, f"Request {r} from client {i}. " + PROMPTS["grounded"],
                             max_tokens=n, temperature=0, ignore_eos=True,
                             speculative=speculative)
            if count:
                with lock:
                    counts["drafted"] += res.stats.drafted_tokens
                    counts["accepted"] += res.stats.accepted_tokens
            return {"tokens": len(res.tokens), "ttft_s": (res.stats.ttft_ms or 0.0) / 1e3}
        return one

    on: list[dict[str, Any]] = []
    off: list[dict[str, Any]] = []
    # warm-up: every prompt once, so that each measured run finds them in the prefix
    # cache alike (the first one would pay all the prefills otherwise)
    progress(f"speculative: 8 clients, warm-up ({per_client} request(s) each)")
    concurrent_run(runner(None), 8, per_client)
    for r in range(rounds):
        progress(f"speculative: 8 clients, round {r + 1}/{rounds}: lookup, then plain "
                 f"({per_client} request(s) x {n} tokens)")
        on.append(concurrent_run(runner("lookup", count=True), 8, per_client))
        off.append(concurrent_run(runner(None), 8, per_client))
    ratio, spread = ratios([x["tokens_per_s"] for x in on], [x["tokens_per_s"] for x in off])
    return {"ratio": ratio, "ratio_spread": spread, "rounds": rounds, "tokens": n,
            "requests_per_client": per_client,
            "lookup_tokens_per_s": [x["tokens_per_s"] for x in on],
            "plain_tokens_per_s": [x["tokens_per_s"] for x in off],
            "drafted_tokens": counts["drafted"], "accepted_tokens": counts["accepted"]}


def draft_models(fleet: Fleet, model_path: Path,
                 threads: int, n: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Draft-model mechanics on a second fleet (stopped before returning): the bench's model as its own draft
    (greedy: every draft kept) and a tiny GGUF pair (a 2-layer target, a 1-layer draft
    of the same vocabulary), one greedy generation each with and without drafts."""
    base = {"backend": "llama", "n_ctx": 1024, "n_seq_max": 1, "n_threads": threads,
            "n_threads_batch": threads}
    models = {"self": {**base, "path": str(model_path), "draft_model": str(model_path)}}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lfb-draft-") as d:
        try:
            from llamafleet.testing.tiny_gguf import TinyModelSpec, write_tiny_model
            target = write_tiny_model(Path(d) / "target.gguf", TinyModelSpec())
            draft = write_tiny_model(Path(d) / "draft.gguf", TinyModelSpec(n_layer=1))
            models["pair"] = {**base, "path": str(target), "draft_model": str(draft)}
        except ImportError as exc:
            out["pair"] = {"skipped": f"llamafleet.testing.tiny_gguf needs gguf: {exc}"}
        progress("speculative: draft models (a second fleet: " + ", ".join(models) + ")")
        with fleet(models) as sup, Client(sup.address) as c:
            for name in models:
                _one(c, name, PROMPTS["free"], 8, "draft")  # warm-up
                plain = _one(c, name, PROMPTS["free"], n, None)
                spec = _one(c, name, PROMPTS["free"], n, "draft")
                out[name] = {
                    "drafted_tokens": spec["drafted"], "accepted_tokens": spec["accepted"],
                    "acceptance": spec["accepted"] / spec["drafted"] if spec["drafted"]
                    else None,
                    "same_tokens": plain["tokens"] == spec["tokens"], "tokens": n,
                    "ratio_to_plain": spec["tokens_per_s"] / plain["tokens_per_s"]
                    if spec["tokens_per_s"] and plain["tokens_per_s"] else None}
    out["self"]["model"] = model_path.name
    return out
