"""The bench's speculative-decoding phase: lookup against plain decoding, interleaved.

Single stream, greedy, through the fleet: each round generates the same prompt
plain (``speculative=None``) and then with prompt lookup (``speculative="lookup"``),
on an input-grounded prompt (repeat a given text of about 500 tokens, where lookup
helps) and on free text (where it should cost nothing). Reported per prompt: the
median of the per-round ratios of the worker's tokens/s and their spread, whether
the tokens were the same in every round, and the drafted/accepted counts.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from llamafleet.client import Client

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
    # not measured yet (see docs/benchmarks.md): llama-cpp-python's prompt lookup, eight
    # clients with speculation, draft models
    out.update(lookup_vs_llama_cpp_python=None, c8_ratio=None, draft_model_acceptance=None)
    return out
