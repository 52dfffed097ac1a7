"""``llamafleet bench --quick --tiny --json`` runs end to end and reports every figure."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

pytestmark = [pytest.mark.llama, pytest.mark.timeout(120)]


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def doc() -> dict:
    proc = subprocess.run([sys.executable, "-m", "llamafleet", "bench", "--quick", "--tiny", "--json"],
                          cwd="/", capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[bench" in proc.stderr  # progress goes to stderr
    return json.loads(proc.stdout)  # exactly one JSON document on stdout


def test_top_level(doc: dict) -> None:
    for key in ("single_stream", "concurrency", "llama_server", "rtt_us", "kv", "recovery_s",
                "model", "threads", "library_version", "machine"):
        assert key in doc, key
    assert doc["threads"] == 2
    assert doc["model"] and isinstance(doc["model"], str)
    assert doc["library_version"] and doc["library_version"].startswith("0.3.")
    m = doc["machine"]
    assert m["cpu"] and _positive(m["cores"]) and m["python"].count(".") == 2
    assert doc["llama_server"] is None  # --quick skips it
    assert doc["goals"]["c8_vs_llama_server"]["met"] is None
    assert doc["goals"]["c8_vs_llama_server"]["spread"] is None


def test_speculative(doc: dict) -> None:
    sp = doc["speculative"]
    assert sp["rounds"] >= 3
    for name in ("grounded", "free"):
        row = sp[name]
        assert len(row["ratios"]) == sp["rounds"] and all(_positive(x) for x in row["ratios"])
        assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
        assert row["drafted_tokens"] >= row["accepted_tokens"] >= 0
    assert sp["lookup_ratio"] == sp["grounded"]["ratio"]
    assert isinstance(sp["same_tokens"], bool)
    assert doc["goals"]["speculative_lookup"]["value"] == sp["lookup_ratio"]


def _check_interleaved(row: dict, ours: str, peer: str) -> None:
    """A median of per-round ratios ours / peer, with its spread."""
    assert row["rounds"] >= 3
    assert len(row[ours]) == len(row[peer]) == row["rounds"]
    assert all(_positive(x) for x in row[ours] + row[peer])
    per_round = sorted(o / p for o, p in zip(row[ours], row[peer]))
    assert row["ratio"] == pytest.approx(per_round[len(per_round) // 2])
    assert row["ratio_spread"] == pytest.approx([per_round[0], per_round[-1]])


def test_speculative_peers(doc: dict) -> None:
    sp, gl = doc["speculative"], doc["goals"]
    # llama-cpp-python's LlamaPromptLookupDecoding on the same grounded prompt
    lk = sp["llama_cpp_python_lookup"]
    if "skipped" in lk:
        assert sp["lookup_vs_llama_cpp_python"] is None and lk["skipped"]
    else:
        _check_interleaved(lk, "ours_tokens_per_s", "peer_tokens_per_s")
        assert sp["lookup_vs_llama_cpp_python"] == lk["ratio"]
        assert lk["tokens"] == sp["tokens"] and lk["num_pred_tokens"] >= 1
        assert lk["prompt_tokens"] > 0 and isinstance(lk["same_tokens"], bool)
        assert (lk["first_difference"] is None) == lk["same_tokens"]
    assert gl["speculative_vs_llama_cpp_python"]["value"] == sp["lookup_vs_llama_cpp_python"]
    # eight clients with lookup against the same run without it
    _check_interleaved(sp["c8"], "lookup_tokens_per_s", "plain_tokens_per_s")
    assert sp["c8_ratio"] == sp["c8"]["ratio"] and sp["c8_ratio_spread"] == sp["c8"]["ratio_spread"]
    assert gl["speculative_c8"]["value"] == sp["c8_ratio"]
    assert sp["c8"]["drafted_tokens"] >= sp["c8"]["accepted_tokens"] >= 0
    # draft models: the model as its own greedy draft keeps every draft
    dm = sp["draft_model"]
    own = dm["self"]
    assert own["drafted_tokens"] > 0 and own["accepted_tokens"] == own["drafted_tokens"]
    assert sp["draft_model_acceptance"] == own["acceptance"] == 1.0
    assert own["same_tokens"] is True and gl["draft_model_self_acceptance"]["met"] is True
    pair = dm["pair"]  # a tiny GGUF pair (random weights: any acceptance)
    assert pair["drafted_tokens"] >= pair["accepted_tokens"] >= 0
    if pair["drafted_tokens"]:
        assert pair["acceptance"] == pair["accepted_tokens"] / pair["drafted_tokens"]
    assert pair["same_tokens"] is True  # greedy output unchanged by the drafts
    # batch_invariant on: lookup keeps the plain greedy tokens, bit for bit
    bi = sp["batch_invariant"]
    assert bi["same_tokens"] is True and sp["invariant_same_tokens"] is True
    assert gl["speculative_invariant_same_tokens"]["met"] is True
    for name in ("grounded", "free"):
        row = bi[name]
        assert row["same_tokens"] is True
        for key in ("lookup_vs_plain", "vs_default_plain", "plain_vs_default_plain"):
            lo, hi = row[f"{key}_spread"]
            assert _positive(row[key]) and lo <= row[key] <= hi
        assert row["drafted_tokens"] >= row["accepted_tokens"] >= 0
    assert sp["invariant_lookup_vs_plain"] == bi["grounded"]["vs_default_plain"]


def test_single_stream(doc: dict) -> None:
    ss = doc["single_stream"]
    for key in ("tokens_per_s", "inprocess_tokens_per_s", "ratio", "client_tokens_per_s"):
        assert _positive(ss[key]), (key, ss[key])
    assert 0 < ss["ratio"] < 10
    # interleaved rounds (ours, in-process, ...): the median of the per-round ratios
    assert ss["rounds"] >= 3
    assert len(ss["samples"]["worker"]) == len(ss["samples"]["inprocess"]) == ss["rounds"]
    per_round = sorted(w / i for w, i in zip(ss["samples"]["worker"], ss["samples"]["inprocess"]))
    assert ss["ratio"] == pytest.approx(per_round[len(per_round) // 2])
    assert ss["ratio_spread"] == pytest.approx([per_round[0], per_round[-1]])
    assert "llama_bench_tokens_per_s" in ss
    assert ss["llama_bench_tokens_per_s"] is None or _positive(ss["llama_bench_tokens_per_s"])
    # greedy through the worker and greedy in-process agree token for token
    assert ss["same_tokens_as_inprocess"] is True


def test_concurrency(doc: dict) -> None:
    rows = doc["concurrency"]
    assert [r["clients"] for r in rows] == [1, 2, 4, 8]
    for r in rows:
        assert _positive(r["tokens_per_s"]) and _positive(r["ttft_ms_p50"])
        assert r["requests"] >= r["clients"]
    # llama.cpp's own batched decode, where bench/build_peers.sh built it: the ceiling
    bb = doc["llama_batched_bench"]
    ceiling = doc["goals"]["c8_vs_single"]["ceiling"]
    if bb is None:
        assert ceiling is None
    else:
        assert set(bb["tg_tokens_per_s"]) == {"1", "2", "4", "8"}
        assert all(_positive(v) for v in bb["tg_tokens_per_s"].values())
        assert ceiling == bb["scaling_8"] and _positive(ceiling)


def _check_rtt(rtt: dict) -> None:
    for key in ("ipc_p50", "ipc_p99", "tcp_p50", "tcp_p99", "bare_p50", "bare_p99",
                "sync_p50", "sync_p99", "async_vs_bare", "sync_vs_bare"):
        assert _positive(rtt[key]), key
    assert rtt["ipc_p50"] <= rtt["ipc_p99"] and rtt["tcp_p50"] <= rtt["tcp_p99"]
    assert rtt["bare_p50"] <= rtt["bare_p99"] and rtt["sync_p50"] <= rtt["sync_p99"]
    assert rtt["rounds"] >= 3
    tcp = rtt["tcp"]
    assert tcp["bare_endpoint"].startswith("tcp://127.0.0.1:")
    assert tcp["async_p50"] == rtt["tcp_p50"] and _positive(tcp["sync_p50"])
    for d in (rtt, tcp):
        for side in ("async", "sync"):
            lo, hi = d[f"{side}_vs_bare_spread"]
            assert lo <= d[f"{side}_vs_bare"] <= hi
        # our ping is the bare round trip plus work: never faster than it by much
        assert d["sync_vs_bare"] > 0.5 and d["async_vs_bare"] > 0.5


def test_rtt_kv_recovery(doc: dict) -> None:
    _check_rtt(doc["rtt_us"])
    kv = doc["kv"]
    for key in ("restore_ms", "reprefill_ms", "speedup", "pack_mb_s", "unpack_mb_s",
                "blob_bytes"):
        assert _positive(kv[key]), key
    assert kv["restored_continues_alike"] is True
    assert _positive(doc["recovery_s"]) and doc["recovery_s"] < 60


def test_rtt_only() -> None:
    proc = subprocess.run([sys.executable, "-m", "llamafleet", "bench", "--quick", "--tiny",
                           "--rtt-only", "--json"], cwd="/", capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert "single_stream" not in doc and "kv" not in doc
    _check_rtt(doc["rtt_us"])
