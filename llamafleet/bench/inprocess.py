"""The in-process peer: llama-cpp-python's low-level API driving libllama directly.

Run as a separate process (``python llamafleet/bench/inprocess.py --model M --threads N
--n-ctx C``) so it shares nothing with the benchmark process. It loads the
model once, prints ``{"ready": ...}``, then answers each stdin line
``{"prompt": ..., "tokens": N}`` with one JSON line: a greedy decode of N
tokens after the prompt (llama_batch_get_one + llama_decode +
llama_get_logits_ith + numpy argmax), timed like the worker times its
generations: ``(N - 1) / (time from the first sampled token to the last)``.

It imports nothing from llamafleet on purpose.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time

import numpy as np

_LOG_CB = None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--n-ctx", type=int, required=True)
    ap.add_argument("--n-batch", type=int, default=512)
    args = ap.parse_args()

    import llama_cpp as L

    # keep a reference: llama.cpp calls it for as long as the process lives
    global _LOG_CB
    _LOG_CB = L.llama_log_callback(lambda level, text, data: None)
    L.llama_log_set(_LOG_CB, ctypes.c_void_p())
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(args.model.encode(), mp)
    if not model:
        print(json.dumps({"error": f"could not load {args.model}"}), flush=True)
        return 2
    cp = L.llama_context_default_params()
    cp.n_ctx = args.n_ctx
    cp.n_batch = args.n_batch
    cp.n_ubatch = args.n_batch
    cp.n_seq_max = 1
    cp.n_threads = args.threads
    cp.n_threads_batch = args.threads
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        print(json.dumps({"error": "could not create the context"}), flush=True)
        return 2
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    mem = L.llama_get_memory(ctx)

    def tokenize(text: str) -> list[int]:
        raw = text.encode()
        buf = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, False)
        if n < 0:
            raise RuntimeError("tokenize failed")
        return list(buf[:n])

    def decode(tokens: list[int]) -> int:
        arr = (L.llama_token * len(tokens))(*tokens)
        rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    def run(prompt: str, n: int) -> dict:
        L.llama_memory_clear(mem, True)
        prompt_tokens = tokenize(prompt)
        t0 = time.perf_counter()
        tok = decode(prompt_tokens)           # prefill; first sampled token
        t_first = time.perf_counter()
        out = [tok]
        while len(out) < n:
            tok = decode([tok])
            out.append(tok)
        t_end = time.perf_counter()
        tps = (n - 1) / (t_end - t_first) if n > 1 else None
        return {"tokens_per_s": tps, "ttft_ms": (t_first - t0) * 1e3,
                "prompt_tokens": len(prompt_tokens), "tokens": out}

    print(json.dumps({"ready": True, "n_vocab": n_vocab,
                      "version": getattr(L, "__version__", None)}), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        req = json.loads(line)
        if req.get("quit"):
            break
        try:
            print(json.dumps(run(req["prompt"], int(req["tokens"]))), flush=True)
        except Exception as exc:  # report, keep serving
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
