"""The llama backend's options (worker config ``[models.NAME]``) and their value tables.

:data:`OPTIONS` is the one declaration of every option: type, default, bounds and
description; :attr:`LlamaBackend.OPTIONS` is this mapping, so the configuration
loader checks a model's table against it without loading libllama. The tables map
option strings to llama.cpp's enum values.

Notes on options whose meaning is more than their one-line doc:

* ``n_ctx`` is per sequence and capped to the training context; the context holds
  ``n_ctx * n_seq_max`` cells in all.
* ``n_ubatch`` is at most ``n_batch``, and also the longest text ``embed`` accepts.
* ``n_threads`` defaults to the CPUs this process may use; ``n_threads_batch`` to
  ``n_threads``.
* ``flash_attn`` also takes booleans (true = "on"). A quantized V cache
  (``type_v`` other than f16/f32/bf16) needs flash attention.
* ``pooling`` "unspecified" is the model's default (mean when it has none).
* ``seed`` is used when a request's seed is negative.
* ``batch_invariant`` makes a token's logits and KV independent of how it was
  batched: on llama.cpp's CPU backend a lone token can take other matmul kernels
  than a batch of two or more, flash attention depends on the batch size at long
  contexts, llama.cpp splits a batch whose sequences bring different token counts
  into ubatches (some of them lone tokens), a ubatch spanning several sequences'
  KV streams computes attention differently at some lengths, and in a unified KV a
  sequence's cells interleave with others'. Logits moved by up to ~0.9 here,
  enough to change greedy text. With it: flash attention off (``flash_attn =
  "on"`` is refused), a KV stream per sequence (``kv_unified`` is refused), one
  llama_decode call per sequence (so sequences no longer share a decode's weight
  reads), and a lone token decoded beside a throwaway token of its own sequence
  (removed at once). Greedy output then does not depend on the load, the prefix
  cache or speculative decoding (checked bitwise on SmolLM2). It slows decoding,
  most where sequences run together (see docs/benchmarks.md); it promises nothing
  on GPU backends.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from llamafleet.runtime.fields import Field

#: KV cache types: option value -> ``enum ggml_type``
_GGML_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7,
                              "q8_0": 8, "iq4_nl": 20, "bf16": 30}
#: embedding pooling -> ``enum llama_pooling_type``
_POOLING: dict[str, int] = {"unspecified": -1, "none": 0, "mean": 1, "cls": 2, "last": 3,
                           "rank": 4}
#: flash attention -> ``enum llama_flash_attn_type``
_FLASH: dict[str, int] = {"auto": -1, "off": 0, "on": 1}
#: how weights are read -> ``enum llama_load_mode``
_LOAD_MODE: dict[str, int] = {"auto": -1, "none": 0, "mmap": 1, "mlock": 2, "mmap_mlock": 3,
                             "direct_io": 4}


def _check_flash(value: Any) -> str | None:
    if isinstance(value, bool) or value.lower() in _FLASH:
        return None
    return f"must be one of {', '.join(_FLASH)}"


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def thread_counts(options: Mapping[str, Any]) -> tuple[int, int]:
    """``(n_threads, n_threads_batch)`` with their defaults: the usable CPUs, and
    ``n_threads``."""
    n_threads = options["n_threads"] or usable_cpus()
    return n_threads, options["n_threads_batch"] or n_threads


def flash_mode(value: str | bool) -> str:
    """The ``flash_attn`` option as one of :data:`_FLASH`'s keys."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value.lower()


OPTIONS: dict[str, Field] = {
    "path": Field((str,), required=True, doc="the GGUF model file"),
    "name": Field((str,), doc="model name reported by info (default: the file's)"),
    "n_ctx": Field((int,), default=4096, min=16, max=1 << 24, doc="context length"),
    "n_seq_max": Field((int,), default=4, min=1, max=256, doc="sequence slots"),
    "n_batch": Field((int,), default=512, min=1, max=1 << 20, doc="logical batch size"),
    "n_ubatch": Field((int,), default=512, min=1, max=1 << 20, doc="physical batch size"),
    "n_threads": Field((int,), min=1, max=1024, doc="decode threads (default: usable cores)"),
    "n_threads_batch": Field((int,), min=1, max=1024, doc="prompt threads (default: n_threads)"),
    "n_gpu_layers": Field((int,), default=0, min=-1, max=1 << 16,
                          doc="layers offloaded to a GPU (-1: all)"),
    "flash_attn": Field((str, bool), default="auto", doc="auto, on or off", check=_check_flash),
    "kv_unified": Field((bool,), default=False, doc="one KV buffer for all sequences"),
    "batch_invariant": Field((bool,), default=False,
                             doc="logits independent of batching (slower; see above)"),
    "type_k": Field((str,), default="f16", choices=tuple(_GGML_TYPES), doc="K cache type"),
    "type_v": Field((str,), default="f16", choices=tuple(_GGML_TYPES), doc="V cache type"),
    "embeddings": Field((bool,), default=False,
                        doc="create the embedding context at load, not on first embed"),
    "pooling": Field((str,), default="unspecified", choices=tuple(_POOLING),
                     doc="embedding pooling"),
    "seed": Field((int,), default=-1, min=-(1 << 63), max=(1 << 32) - 1,
                  doc="default sampler seed (-1: random)"),
    "load_mode": Field((str,), default="auto", choices=tuple(_LOAD_MODE),
                       doc="how weights are read"),
}
