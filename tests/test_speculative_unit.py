"""Speculative decoding in-process: the n-gram drafter, its adaptation, the
verification rule (a statistical check with a fixed seed), and the scheduler over
the fake backend with lookup on and off (same output, fewer evaluations)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from llamafleet.runtime import protocol
from llamafleet.runtime.config import Config, ConfigError
from llamafleet.runtime.errors import BadRequest
from llamafleet.runtime.protocol import Completion
from llamafleet.runtime.sampling import SamplingParams
from llamafleet.worker import speculative as sp
from llamafleet.worker.generation import Generation
from llamafleet.worker.speculative import Drafter, NgramIndex, SpecConfig, verify_draft
from tests.test_scheduler_unit import Rig


# -- the n-gram index ---------------------------------------------------------------------
def test_lookup_proposes_what_followed_the_latest_earlier_occurrence() -> None:
    assert (sp.NGRAM_MAX, sp.NGRAM_MIN) == (4, 3)
    idx = NgramIndex([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3], n_max=3, n_min=2)
    # suffix 3-gram (1, 2, 3) occurred at 0..2, followed by 4, 5, ...
    assert idx.lookup(4) == [4, 5, 9, 2]
    idx.extend([4])  # suffix (2, 3, 4): the occurrence at 1..3
    assert idx.lookup(3) == [5, 9, 2]
    # no 3-gram match: the 2-gram (2, 3) last seen at 6..7, followed by 7, 8
    assert NgramIndex([2, 3, 7, 8, 5, 2, 3], n_max=3, n_min=2).lookup(5) == [7, 8, 5, 2, 3]
    assert NgramIndex([2, 3, 7, 8, 5, 2, 3]).lookup(5) == []  # by default 3-grams at least
    # a continuation that reaches the present repeats with its period
    assert NgramIndex([5, 6, 7, 5, 6], n_min=2).lookup(7) == [7, 5, 6, 7, 5, 6, 7]
    assert NgramIndex([4, 4, 4, 4]).lookup(3) == [4, 4, 4]
    assert NgramIndex([1, 2, 3, 4]).lookup(3) == []  # nothing repeats
    assert NgramIndex([1, 2]).lookup(3) == [] and NgramIndex().lookup(3) == []
    assert NgramIndex([1, 2, 3, 1, 2, 3]).lookup(0) == []


def test_index_built_token_by_token_equals_one_built_at_once() -> None:
    rng = random.Random(3)
    hist = [rng.randrange(6) for _ in range(400)]
    grown = NgramIndex()
    for i, t in enumerate(hist):
        grown.extend([t])
        whole = NgramIndex(hist[:i + 1])
        assert grown.lookup(5) == whole.lookup(5)
        # and what it proposes follows an earlier occurrence of the suffix
        draft = whole.lookup(5)
        if draft:
            h = hist[:i + 1]
            ext = h + draft  # (continued with its own period past the present)
            assert any(h[j:j + n] == h[-n:] and ext[j + n:j + n + len(draft)] == draft
                       for n in (3, 4) for j in range(len(h) - n))


# -- adaptation ------------------------------------------------------------------------------
def test_draft_length_follows_acceptance_within_bounds() -> None:
    d = Drafter(SpecConfig(draft_min=2, draft_max=8), [1, 2, 3] * 20)
    assert d.k == 2 and len(d.propose(100)) == 2
    d.feedback(2, 2)
    assert d.k == 4
    d.feedback(4, 4)
    d.feedback(8, 8)
    assert d.k == 8 and len(d.propose(100)) == 8
    d.feedback(8, 8)
    assert d.k == 8  # never above draft_max
    d.feedback(8, 3)
    assert d.k == 4  # one more than what was kept
    d.feedback(4, 0)
    assert d.k == 2  # never below draft_min
    assert d.propose(1) == []  # a draft shorter than draft_min is not worth verifying


def test_a_sequence_whose_drafts_keep_failing_stops_drafting() -> None:
    d = Drafter(SpecConfig(draft_min=2, draft_max=8), [1, 2, 3] * 20)
    for _ in range(sp.MISS_LIMIT):
        assert d.propose(100)
        d.feedback(2, 0)
    assert d.paused == sp.COOLDOWN_FIRST and d.propose(100) == []
    for _ in range(sp.COOLDOWN_FIRST):
        d.push(1)
    assert d.paused == 0 and d.propose(100)
    # failing again: the pause doubles
    for _ in range(sp.MISS_LIMIT):
        d.feedback(4, 1)  # a quarter kept is a failure too
    assert d.paused == 2 * sp.COOLDOWN_FIRST
    for _ in range(d.paused):
        d.push(1)
    d.feedback(2, 2)  # a fully kept draft resets the pause
    assert d.cooldown == sp.COOLDOWN_FIRST and d.misses == 0


# -- verification ---------------------------------------------------------------------------
def test_verify_keeps_the_matching_prefix_plus_one() -> None:
    target = [5, 6, 7, 8, 9]
    assert verify_draft([5, 6, 7], lambda i: target[i]) == (3, [5, 6, 7, 8])
    assert verify_draft([5, 1, 7], lambda i: target[i]) == (1, [5, 6])
    assert verify_draft([4], lambda i: target[i]) == (0, [5])
    # the generation ends inside the draft: nothing more is sampled
    assert verify_draft([5, 6, 7], lambda i: None if i == 2 else target[i]) == (2, [5, 6])


def test_verification_is_the_speculative_sampling_rule_for_a_point_mass_draft() -> None:
    """Sampling the target and keeping the draft token when they agree accepts ``d``
    with probability p(d), and otherwise draws from p without d, renormalised: the
    standard rule for a deterministic drafter. The output is distributed as p."""
    p = [0.1, 0.3, 0.25, 0.2, 0.15]
    d = 1
    rng = random.Random(12345)
    n = 40_000
    first: Counter[int] = Counter()
    after_reject: Counter[int] = Counter()
    accepted = 0
    for _ in range(n):
        kept, out = verify_draft([d], lambda i: rng.choices(range(len(p)), weights=p)[0])
        first[out[0]] += 1
        if kept:
            accepted += 1
            assert out[0] == d and len(out) == 2
        else:
            after_reject[out[0]] += 1
            assert out[0] != d and len(out) == 1
    assert abs(accepted / n - p[d]) < 0.01
    for t, pt in enumerate(p):
        assert abs(first[t] / n - pt) < 0.01  # the output distribution is the target's
    rejected = n - accepted
    assert after_reject[d] == 0
    for t, pt in enumerate(p):
        if t != d:
            assert abs(after_reject[t] / rejected - pt / (1 - p[d])) < 0.015


# -- the scheduler with lookup (fake backend) -------------------------------------------------
def _gen(rig: Rig, req_id: int, tokens: list[int], spec: SpecConfig | None, *,
         max_tokens: int = 120, stop: list[str] | None = None, seq: int | None = None,
         session: str | None = None, logprobs: int | None = None, stream: bool = False,
         ignore_eos: bool = True, **sampling: Any) -> Generation:
    return Generation(peer=b"c", req_id=req_id, stream=stream, prompt_tokens=tokens,
                      params=SamplingParams(**{"temperature": 0.0, **sampling}),
                      max_tokens=max_tokens, stop=stop or [], ignore_eos=ignore_eos, seq=seq,
                      deadline=None, session=session, logprobs=logprobs, speculative=spec)


def _complete(spec: SpecConfig | None, tokens: list[int], rig: Rig | None = None,
              **kw: Any) -> tuple[Completion, Rig]:
    rig = rig or Rig()
    rig.sched.submit(_gen(rig, 1, tokens, spec, **kw))
    rig.run()
    return rig.results()[1], rig


@pytest.fixture(scope="module")
def echo() -> list[int]:
    """A prompt after which the fake model repeats text it already holds: a prefix,
    the model's own continuation of it, then the prefix again."""
    rig = Rig()
    head = rig.be.tokenize("Once upon a time, in a land far away")
    out, _ = _complete(None, head, max_tokens=150)
    return head + out.tokens + head[1:]


@pytest.fixture(scope="module")
def noisy(echo: list[int]) -> list[int]:
    """``echo`` with every 9th token of the model's earlier continuation changed: its
    drafts are partly rejected."""
    n_head = len(Rig().be.tokenize("Once upon a time, in a land far away"))
    out = list(echo)
    for i in range(n_head + 4, len(echo) - n_head, 9):
        out[i] = 2 + ord("#")
    return out


LOOKUP = SpecConfig(draft_min=2, draft_max=16)


def test_greedy_lookup_gives_the_same_tokens_in_fewer_evaluations(echo: list[int]) -> None:
    plain, rig_p = _complete(None, echo)
    spec, rig_s = _complete(LOOKUP, echo)
    assert spec.tokens == plain.tokens and spec.text == plain.text
    assert plain.stats.drafted_tokens == 0
    assert spec.stats.accepted_tokens > 60 and spec.stats.drafted_tokens >= \
        spec.stats.accepted_tokens
    assert rig_s.sched.ticks < rig_p.sched.ticks / 2
    assert rig_s.sched.counters.accepted_tokens == spec.stats.accepted_tokens
    assert rig_s.sched.counters.drafted_tokens == spec.stats.drafted_tokens


def test_seeded_sampling_gives_the_same_tokens(echo: list[int]) -> None:
    for seed in (1, 2, 3):
        kw: dict[str, Any] = {"temperature": 0.9, "top_k": 8, "seed": seed}
        plain, _ = _complete(None, echo, **kw)
        spec, _ = _complete(LOOKUP, echo, **kw)
        assert spec.tokens == plain.tokens


@pytest.mark.parametrize("case", ["stop", "max_tokens", "grammar", "bias_penalties",
                                  "logprobs", "eog"])
def test_features_behave_as_without_speculation(noisy: list[int], case: str) -> None:
    echo = noisy
    text = _complete(None, echo)[0].text  # what the model says: a stop string from it
    kw: dict[str, Any] = {
        "stop": {"stop": [text[60:64]]},
        "max_tokens": {"max_tokens": 37},
        "grammar": {"grammar": 'root ::= [a-z ]+ "." [a-z ]*'},
        "bias_penalties": {"logit_bias": {ord("e") + 2: -3.0, ord("t") + 2: 1.5},
                           "repeat_penalty": 1.3, "frequency_penalty": 0.2,
                           "presence_penalty": 0.1, "repeat_last_n": 16},
        "logprobs": {"logprobs": 3},
        "eog": {"ignore_eos": False},
    }[case]
    plain, _ = _complete(None, echo, **kw)
    spec, _ = _complete(LOOKUP, echo, **kw)
    assert (spec.tokens, spec.text, spec.finish_reason, spec.stop, spec.logprobs) == \
        (plain.tokens, plain.text, plain.finish_reason, plain.stop, plain.logprobs)
    if case == "stop":
        assert spec.finish_reason == "stop" and spec.stats.accepted_tokens > 0
    if case == "max_tokens":
        assert len(spec.tokens) == 37 and spec.stats.accepted_tokens > 0


def test_rejected_drafts_leave_nothing_in_a_kept_sequence(noisy: list[int]) -> None:
    """A caller's sequence keeps every returned token in its KV and nothing else."""
    spec, rig = _complete(LOOKUP, noisy, seq=0, max_tokens=90)
    assert spec.stats.drafted_tokens > spec.stats.accepted_tokens > 0  # some were rejected
    assert rig.be.seq_tokens(0) == noisy + spec.tokens
    plain, other = _complete(None, noisy, seq=0, max_tokens=90)
    assert plain.tokens == spec.tokens and other.be.kv_pack(0) == rig.be.kv_pack(0)


def test_drafts_of_one_evaluation_are_cut_to_one_length() -> None:
    drafts = {0: [1, 2, 3, 4], 3: [5, 6], 5: [7, 8, 9]}
    assert sp.even_drafts(drafts) == 3
    assert drafts == {0: [1, 2], 3: [5, 6], 5: [7, 8]}
    alone = {2: [1, 2, 3]}
    assert sp.even_drafts(alone) == 0 and alone == {2: [1, 2, 3]}


def test_eight_speculating_sequences_in_one_batch_match_their_solo_runs(echo: list[int]) -> None:
    rig = Rig(n_seq_max=8)
    lengths: list[list[int]] = []  # the draft lengths of each evaluation
    evaluate_drafts = rig.be.evaluate_drafts

    def spy(batch: Any, drafts: Any) -> None:
        lengths.append([len(d) for d in drafts.values()])
        evaluate_drafts(batch, drafts)

    rig.be.evaluate_drafts = spy  # type: ignore[method-assign]
    # they start one tick apart (prompts of different lengths) and end apart
    prompts = [echo[3 * i:] for i in range(8)]
    lens = [60 - 5 * i for i in range(8)]
    solo = [_complete(None, p, max_tokens=n)[0].tokens for p, n in zip(prompts, lens)]
    for i, p in enumerate(prompts):
        rig.sched.submit(_gen(rig, i, p, LOOKUP, max_tokens=lens[i]))
    rig.run()
    res = rig.results()
    assert [res[i].tokens for i in range(8)] == solo
    assert sum(res[i].stats.accepted_tokens for i in range(8)) > 0
    assert rig.sched.peak_running == 8
    # several sequences drafted together, always with drafts of one length (left to
    # themselves, their lengths differ: see test_drafts_of_one_evaluation_are_cut...)
    assert max(len(x) for x in lengths) > 1 and all(len(set(x)) <= 1 for x in lengths)


def test_streamed_chunks_add_up_to_the_result(echo: list[int]) -> None:
    spec, rig = _complete(LOOKUP, echo, stream=True)
    chunks = rig.chunks(1)
    assert "".join(c.text for c in chunks) == spec.text
    assert [t for c in chunks for t in c.tokens] == spec.tokens


# -- configuration and protocol ----------------------------------------------------------------
def _worker_options(**table: Any) -> dict[str, Any]:
    cfg = Config.from_dict({"supervisor": {"runtime_dir": "/tmp/lf-unit"},
                            "models": {"m": {"backend": "fake", **table}}})
    return cfg.models["m"].worker


def test_model_options_and_request_field() -> None:
    w = _worker_options(speculative="lookup", draft_min=3, draft_max=12)
    assert (w["speculative"], w["draft_min"], w["draft_max"]) == ("lookup", 3, 12)
    assert _worker_options()["speculative"] == "off"
    with pytest.raises(ConfigError, match="draft_min"):
        _worker_options(draft_min=9, draft_max=4)
    with pytest.raises(ConfigError, match="speculative"):
        _worker_options(speculative="magic")
    assert protocol.validate_args("generate", {"prompt": "x"})["speculative"] == "model"
    assert protocol.validate_args("generate", {"prompt": "x", "speculative": "LOOKUP"})[
        "speculative"].lower() == "lookup"
    with pytest.raises(BadRequest, match="speculative"):
        protocol.validate_args("generate", {"prompt": "x", "speculative": "magic"})
    # a draft model: speculative defaults to "draft" (an explicit "off" stays off)
    w = _worker_options(draft_model="/models/draft.gguf")
    assert (w["speculative"], w["draft_model"]) == ("draft", "/models/draft.gguf")
    assert _worker_options(draft_model="/m/d.gguf", speculative="off")["speculative"] == "off"
    with pytest.raises(ConfigError, match="needs a draft_model"):
        _worker_options(speculative="draft")


def test_a_draft_model_that_cannot_draft_only_stops_drafting(echo: list[int]) -> None:
    from llamafleet.backends import get_backend
    from llamafleet.worker.draft_model import DraftModel

    short = get_backend("fake")({"n_seq_max": 2, "n_ctx": 64})  # shorter than the prompt
    short.load()
    cfg = SpecConfig(method="draft", model=DraftModel(short))
    spec, rig = _complete(cfg, echo, max_tokens=30)
    plain, _ = _complete(None, echo, max_tokens=30)
    assert spec.tokens == plain.tokens and spec.stats.drafted_tokens == 0
    # a draft model that fits drafts its own greedy continuation: all kept
    fits = get_backend("fake")({"n_seq_max": 2})
    fits.load()
    spec, _ = _complete(SpecConfig(method="draft", model=DraftModel(fits)), echo,
                        max_tokens=30)
    assert spec.tokens == plain.tokens
    assert spec.stats.accepted_tokens == spec.stats.drafted_tokens > 10
    assert all(fits.seq_len(s) == 0 for s in range(2))  # released with the generation
