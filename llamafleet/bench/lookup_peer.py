"""The prompt-lookup peer: llama-cpp-python's own ``LlamaPromptLookupDecoding``.

Run as a separate process (``python llamafleet/bench/lookup_peer.py --model M
--threads N --n-ctx C --num-pred-tokens K``) so it shares nothing with the
benchmark process. It loads ``Llama(model_path=M, draft_model=
LlamaPromptLookupDecoding(num_pred_tokens=K))`` once and prints ``{"ready": ...}``
(or ``{"error": ...}`` when llama-cpp-python's Python API cannot be used), then
answers each stdin line ``{"tokens": [prompt ids], "n": N}`` with one JSON line:
``Llama.generate`` greedy (``temp=0``), the first N tokens whatever they are (EOS
included: like ``ignore_eos``), timed like the worker times its generations:
``(N - 1) / (time from the first generated token to the last)``.

``logits_all=True`` is what llama-cpp-python uses with a draft model anyway (it sets
``_logits_all``), but its score buffer is sized from the argument: without it, the
first verification past ``n_batch`` positions fails ("could not broadcast input
array ... into shape (0,)", llama-cpp-python 0.3.36).

It imports nothing from llamafleet on purpose.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--n-ctx", type=int, required=True)
    ap.add_argument("--num-pred-tokens", type=int, default=10)
    args = ap.parse_args()
    try:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        llm = llama_cpp.Llama(
            model_path=args.model, n_ctx=args.n_ctx, n_threads=args.threads,
            n_threads_batch=args.threads, verbose=False, logits_all=True,
            draft_model=LlamaPromptLookupDecoding(num_pred_tokens=args.num_pred_tokens))
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 2

    def run(prompt: list[int], n: int) -> dict[str, object]:
        out: list[int] = []
        t_first = t_end = time.perf_counter()
        for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            t_end = time.perf_counter()
            if not out:
                t_first = t_end
            out.append(int(tok))
            if len(out) >= n:
                break
        tps = (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else None
        return {"tokens_per_s": tps, "tokens": out}

    print(json.dumps({"ready": True, "version": getattr(llama_cpp, "__version__", None),
                      "num_pred_tokens": args.num_pred_tokens}), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        req = json.loads(line)
        if req.get("quit"):
            break
        try:
            print(json.dumps(run([int(t) for t in req["tokens"]], int(req["n"]))), flush=True)
        except Exception as exc:  # report, keep serving
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
