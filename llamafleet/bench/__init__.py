"""llamafleet benchmarks: ``llamafleet bench`` / ``python -m llamafleet.bench``.

Measures, for one model and one thread count, every peer in the same run:

1. single-stream decode tokens/s through client -> worker, against an
   in-process llama-cpp-python low-level loop on the same libllama (in a
   subprocess) and llama.cpp's own ``llama-bench`` (tg128) when built;
2. aggregate tokens/s and time to first token at 1, 2, 4, 8 concurrent
   clients, against ``llama-server -np 8`` when built;
3. ``ping`` round-trip latency over ipc:// and tcp://;
4. KV restore (``kv_unpack``) against re-prefill of a 1000-token prefix;
5. crash-to-serving time after SIGKILL of a worker.

See docs/benchmarks.md for the figures and llamafleet/bench/build_peers.sh for the peers.
"""

from llamafleet.bench.run import main

__all__ = ["main"]
