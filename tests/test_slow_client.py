"""A client that stops reading (SIGSTOP) mid-stream: its replies wait in the worker,
its generation pauses, other clients are served; past stall_timeout_s it gets a
typed error instead of waiting out its whole timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llamafleet.client import Client
from llamafleet.runtime.supervisor import Supervisor
from tests.conftest import ROOT, kill, wait_for
from tests.figures import merge_figures

#: one chunk per token, fast: the socket buffers fill within a second of the stop
FAST = {"backend": "fake", "stream_interval_ms": 0, "n_ctx": 40_000, "n_seq_max": 4}
PROMPT = "a long stream"
TOKENS = 6_000

#: streams one long greedy generation; prints progress lines, then one JSON line
CHILD = """
import json, sys, time
from llamafleet.client import Client
from llamafleet.runtime.errors import LlamafleetError

address, out, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(out, "w", buffering=1) as f, Client(address, timeout=60) as c:
    s = c.stream("fast", "a long stream", max_tokens=max_tokens, ignore_eos=True,
                 temperature=0)
    seen = 0
    try:
        for _ in s:
            if len(s.tokens) >= seen + 500:
                seen = len(s.tokens)
                f.write(f"{seen}\\n")
        end = {"tokens": s.result.tokens}
    except LlamafleetError as exc:
        end = {"error": exc.code, "message": exc.message, "seen": len(s.tokens)}
    end["t"] = time.monotonic()
    f.write(json.dumps(end) + "\\n")
"""


def _progress(path: Path) -> int:
    lines = path.read_text().splitlines() if path.exists() else []
    return int(lines[-1]) if lines and lines[-1].isdigit() else 0


def _end(path: Path) -> dict[str, Any] | None:
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None


def _pause_client(sup: Supervisor, tmp: Path, stop_s: float, meanwhile: bool = True,
                  ) -> tuple[dict[str, Any], float, int, int]:
    """Start the streaming client, SIGSTOP it mid-stream for ``stop_s`` while this
    process keeps generating (unless not ``meanwhile``), SIGCONT it. Returns its last
    line, seconds from SIGCONT to that line, generations still running on the worker
    just before SIGCONT, and the calls this process completed during the stop."""
    out = tmp / "child.out"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, sup.address, str(out), str(TOKENS)],
                            cwd=ROOT, env=env)
    try:
        with Client(sup.address, timeout=60) as c:
            wait_for(lambda: _progress(out) >= 3000 or proc.poll() is not None, timeout=30,
                     interval=0.005)
            assert _end(out) is None, "the stream ended before the stop"
            kill(proc.pid, signal.SIGSTOP)
            served = 0
            t_stop = time.monotonic()
            while time.monotonic() - t_stop < stop_s:
                if not meanwhile:
                    time.sleep(0.05)
                    continue
                r = c.generate("fast", f"meanwhile {served}", max_tokens=20, temperature=0)
                assert len(r.tokens) == 20 or r.finish_reason != "length"
                served += 1
                time.sleep(0.2)
            running = c.info("fast").scheduler.running
            kill(proc.pid, signal.SIGCONT)
            t_cont = time.monotonic()
            assert proc.wait(30) == 0
        end = _end(out)
        assert end is not None
        return end, end["t"] - t_cont, running, served
    finally:
        if proc.poll() is None:
            kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


def test_a_paused_client_finishes_its_stream_after_resuming(fleet, tmp_path: Path) -> None:
    sup = fleet({"fast": FAST})
    with Client(sup.address, timeout=60) as c:
        t0 = time.monotonic()
        solo = c.generate("fast", PROMPT, max_tokens=TOKENS, ignore_eos=True, temperature=0)
        solo_s = time.monotonic() - t0
    end, resume_s, running, served = _pause_client(sup, tmp_path, stop_s=5.0)
    # the stream was paused on the worker, not dropped and not run to its end
    assert running == 1
    assert served >= 5  # another client was served throughout
    assert end.get("error") is None, end
    assert end["tokens"] == solo.tokens
    # what was left went at about full speed (a whole solo run bounds the rest of it)
    assert resume_s < 1.5 + solo_s, (resume_s, solo_s)
    merge_figures({"slow_client": {"pause_s": 5.0, "tokens": TOKENS,
                                   "finished_after_resume_s": round(resume_s, 3),
                                   "served_during_pause": served}})


def test_a_client_stalled_past_the_bound_gets_a_typed_error(fleet, tmp_path: Path) -> None:
    sup = fleet({"fast": {**FAST, "stall_timeout_s": 1.0}})
    end, resume_s, running, served = _pause_client(sup, tmp_path, stop_s=4.0)
    assert running == 0  # cancelled on the worker after 1 s, slot freed
    assert served >= 4
    assert end.get("error") == "timeout", end
    assert "did not read its replies for 1 s" in end["message"]
    assert resume_s < 3.0, resume_s  # not after its whole 60 s timeout
    merge_figures({"slow_client": {"stalled_pause_s": 4.0, "stall_timeout_s": 1.0,
                                   "error_after_resume_s": round(resume_s, 3)}})


def test_a_paused_stream_alone_is_not_taken_for_a_wedged_worker(fleet, tmp_path: Path) -> None:
    """The only work is a stream whose client is stopped, for longer than
    progress_timeout: the worker waits on its client, it is not wedged, and the
    watchdog leaves it alone (its loop keeps turning, and the progress counter with
    it; only a decode that never returns stops that). stall_timeout_s alone ends
    such a wait."""
    sup = fleet({"fast": FAST}, progress_timeout=1.0)
    with Client(sup.address, timeout=60) as c:
        solo = c.generate("fast", PROMPT, max_tokens=TOKENS, ignore_eos=True, temperature=0)
    end, _, running, _ = _pause_client(sup, tmp_path, stop_s=3.0, meanwhile=False)
    assert running == 1
    assert end.get("error") is None, end
    assert end["tokens"] == solo.tokens
    worker = sup.status()[0]
    assert worker["restarts"] == 0 and worker["state"] == "ready", worker
