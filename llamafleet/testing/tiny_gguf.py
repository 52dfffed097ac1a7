"""Tiny random-weight GGUF models for tests, written with llama.cpp's ``gguf`` package.

Nothing is downloaded: a model of a few hundred KiB is generated in a few milliseconds,
deterministically (same spec -> byte-identical file), and loads in llama.cpp.

Vocabulary (SentencePiece style, ``tokenizer.ggml.model = "llama"``, 512 tokens)::

    0        <unk>           UNKNOWN
    1        <s>             CONTROL  (BOS, added by the tokenizer: add_bos_token = True)
    2        </s>            CONTROL  (llama.cpp still counts it as end-of-generation)
    3..258   <0x00>..<0xFF>  BYTE     (fallback for anything not in the vocab, e.g. "\\n", "é")
    259      <|im_start|>    CONTROL
    260      <|im_end|>      CONTROL  (EOS and EOT: what ends a chat turn)
    261..    "▁" + the 94 printable non-space ASCII characters, then common English
             words ("▁the", "▁hello", ...) and suffixes ("ing", "ed", ...) with
             every prefix needed to reach them by SPM merges   NORMAL

Scores grow with the piece length, so SPM merging prefers longer pieces.  Plain ASCII text
never needs byte tokens except for newlines and tabs (as in real Llama vocabularies); any
non-ASCII character is spelled with its UTF-8 byte tokens.

Weights are float32 from ``numpy.random.default_rng(spec.seed)``; norms are 1.  Greedy output
is gibberish that depends on the prompt (often including byte tokens, so the detokenized
bytes need not be valid UTF-8) and rarely ends by itself; ``TinyModelSpec(eos_after=".")``
gives a model whose greedy continuation of a prompt ending in "." is ``<|im_end|>``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

__all__ = [
    "CHATML_TEMPLATE",
    "TinyModelSpec",
    "write_tiny_model",
    "write_lora_adapter",
    "tiny_vocab",
    "N_VOCAB",
    "UNK_ID",
    "BOS_ID",
    "EOS_ID",
    "IM_START_ID",
    "IM_END_ID",
    "BYTE_BASE_ID",
    "SPM_SPACE",
]

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

SPM_SPACE = "\u2581"  # '▁', how SentencePiece writes a space

UNK_ID = 0
BOS_ID = 1
EOS_TEXT_ID = 2  # "</s>": not the EOS id of this vocab, but llama.cpp marks it EOG by its text
BYTE_BASE_ID = 3  # "<0x00>" .. "<0xFF>" are ids 3 .. 258
IM_START_ID = 259
IM_END_ID = 260
EOS_ID = IM_END_ID  # chatml models (Qwen2, SmolLM2-Instruct) use <|im_end|> as EOS
N_VOCAB = 512

_WORDS = (
    # common English words, most useful first (written with the SPM space prefix); the
    # list is cut where the vocabulary is full
    "the a and to of in is it hello world you that he was for on are with as i his they be"
    " at one have this from or had by not but what all were we when your can said there"
    " use each which she do how their if will up other about out many then them these so"
    " some her would make like him into time has look two more write go see number no way"
).split()
_SUFFIXES = ("ing", "ed", "er", "es", "ly", "th", "en", "on", "an", "at")


def tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """Return (tokens, scores, token_types) of the tiny SPM vocabulary (``N_VOCAB`` tokens)."""
    T = gguf.TokenType
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [int(T.UNKNOWN), int(T.CONTROL), int(T.CONTROL)]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [int(T.BYTE)] * 256
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [int(T.CONTROL)] * 2
    assert tokens[IM_START_ID] == "<|im_start|>" and tokens[IM_END_ID] == "<|im_end|>"

    pieces: list[str] = [SPM_SPACE] + [chr(c) for c in range(0x21, 0x7F)]
    seen = set(pieces)

    def add_with_prefixes(piece: str) -> None:
        for end in range(2, len(piece) + 1):
            p = piece[:end]
            if p not in seen:
                seen.add(p)
                pieces.append(p)

    n_free = N_VOCAB - len(tokens)
    words = [SPM_SPACE + w for w in _WORDS]
    for word in words[:20] + list(_SUFFIXES) + words[20:]:
        before = len(pieces)
        add_with_prefixes(word)
        if len(pieces) > n_free:  # whole words only: drop a partly added one
            for p in pieces[before:]:
                seen.discard(p)
            del pieces[before:]
            break
    # Pad with two-letter pieces so the vocab size is exactly N_VOCAB.
    letters = "etaoinshrdlucmfwypvbgk"
    fillers = (a + b for a in letters for b in letters)
    while len(pieces) < n_free:
        p = next(fillers)
        if p not in seen:
            seen.add(p)
            pieces.append(p)
    del pieces[n_free:]

    tokens += pieces
    types += [int(T.NORMAL)] * len(pieces)
    # Special and byte tokens score 0 (never merged); normal pieces score by length, with a
    # small decreasing tie-break so that scores are distinct and earlier pieces win ties.
    scores = [0.0] * (len(tokens) - len(pieces))
    scores += [float(len(p)) - 1e-3 * i for i, p in enumerate(pieces)]
    assert len(tokens) == len(scores) == len(types) == N_VOCAB
    assert len(set(tokens)) == N_VOCAB
    return tokens, scores, types


@dataclass
class TinyModelSpec:
    arch: str = "llama"
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 2048
    seed: int = 0
    name: str = "tiny-llama"
    chat_template: str | None = CHATML_TEMPLATE
    # extras
    rope_freq_base: float = 10000.0
    rms_norm_eps: float = 1e-5
    weight_std: float = 0.1  # std of every random matrix except the embeddings
    embd_std: float = 1.0  # std of token_embd (the residual stream is RMS-normed anyway)
    # When set to a vocab piece (e.g. "."), the output row of <|im_end|> is aligned with that
    # piece's embedding, so greedy decoding emits EOS right after it: a model that stops.
    eos_after: str | None = None
    eos_strength: float = 0.7
    # Extra metadata written after the standard keys, e.g. the recommended sampling
    # ``{"general.sampling.temp": 0.7, "general.sampling.top_k": 20}``. A Python int is
    # written as int32, a float as float32, a bool as bool, a str as a string and a list
    # as an array; ``(value, gguf.GGUFValueType.X)`` picks the type (a wrong one on purpose).
    metadata: Mapping[str, Any] | None = None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError("n_embd must be a multiple of n_head")
        if self.n_head % self.n_head_kv:
            raise ValueError("n_head must be a multiple of n_head_kv")


def _matrix_shapes(spec: TinyModelSpec) -> dict[str, tuple[int, int]]:
    """Per-block 2-D weights as ``name -> (n_out, n_in)`` (numpy order; ggml ne is reversed)."""
    n_kv = spec.n_head_kv * spec.head_dim
    return {
        "attn_q": (spec.n_embd, spec.n_embd),
        "attn_k": (n_kv, spec.n_embd),
        "attn_v": (n_kv, spec.n_embd),
        "attn_output": (spec.n_embd, spec.n_embd),
        "ffn_gate": (spec.n_ff, spec.n_embd),
        "ffn_up": (spec.n_ff, spec.n_embd),
        "ffn_down": (spec.n_embd, spec.n_ff),
    }


def _add_metadata(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    """One extra KV pair; ``(value, GGUFValueType)`` gives the type explicitly."""
    T = gguf.GGUFValueType
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], T):
        value, vtype = value
    elif isinstance(value, bool):
        vtype = T.BOOL
    elif isinstance(value, int):
        vtype = T.INT32
    elif isinstance(value, float):
        vtype = T.FLOAT32
    elif isinstance(value, str):
        vtype = T.STRING
    elif isinstance(value, list) and value:
        w.add_key_value(key, value, T.ARRAY, sub_type=T.get_type(value[0]))
        return
    else:
        raise ValueError(f"metadata {key!r}: cannot write {value!r}")
    w.add_key_value(key, value, vtype)


def _write(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _prepare(path: str | os.PathLike[str]) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_tiny_model(
    path: str | os.PathLike[str], spec: TinyModelSpec = TinyModelSpec()
) -> pathlib.Path:
    """Write a random-weight model for ``spec`` to ``path`` and return the path."""
    path = _prepare(path)
    rng = np.random.default_rng(spec.seed)
    tokens, scores, types = tiny_vocab()
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(path, spec.arch)  # adds general.architecture
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(spec.name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(n_vocab)
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(spec.rope_freq_base)

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(UNK_ID)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_eot_token_id(IM_END_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if spec.chat_template is not None:
        w.add_chat_template(spec.chat_template)
    for key, value in (spec.metadata or {}).items():
        _add_metadata(w, key, value)

    def normal(shape: Sequence[int], std: float) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    ones = np.ones(spec.n_embd, dtype=np.float32)
    embd = normal((n_vocab, spec.n_embd), spec.embd_std)
    w.add_tensor("token_embd.weight", embd)
    for i in range(spec.n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for name, shape in _matrix_shapes(spec).items():
            if name == "ffn_gate":
                w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
            w.add_tensor(f"blk.{i}.{name}.weight", normal(shape, spec.weight_std))
    w.add_tensor("output_norm.weight", ones)
    output = normal((n_vocab, spec.n_embd), spec.weight_std)
    if spec.eos_after is not None:
        try:
            after = tokens.index(spec.eos_after)
        except ValueError:
            raise ValueError(f"eos_after={spec.eos_after!r} is not a token of the tiny vocab") from None
        e = embd[after].astype(np.float64)
        output[EOS_ID] = (spec.eos_strength * e / np.linalg.norm(e)).astype(np.float32)
    w.add_tensor("output.weight", output)
    _write(w)
    return path


def write_lora_adapter(
    path: str | os.PathLike[str],
    spec: TinyModelSpec = TinyModelSpec(),
    *,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 1,
    arch: str | None = None,
    targets: Iterable[str] = ("attn_q", "attn_v", "ffn_up"),
    std: float = 0.5,
    name: str | None = None,
) -> pathlib.Path:
    """Write a random LoRA adapter for the model of ``spec`` and return the path.

    ``arch`` overrides ``general.architecture`` (an adapter "for another model" that
    llama.cpp must refuse).  The update applied is ``scale * alpha / rank * B @ A``.
    """
    path = _prepare(path)
    shapes = _matrix_shapes(spec)
    targets = tuple(targets)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; choose from {sorted(shapes)}")
    rng = np.random.default_rng(seed)

    w = gguf.GGUFWriter(path, arch if arch is not None else spec.arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_name(name if name is not None else f"{spec.name}-lora")
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for i in range(spec.n_layer):
        for t in targets:
            n_out, n_in = shapes[t]
            # numpy (r, n_in) -> ggml ne [n_in, r]; numpy (n_out, r) -> ggml ne [r, n_out]
            a = (rng.standard_normal((rank, n_in), dtype=np.float32) * np.float32(std))
            b = (rng.standard_normal((n_out, rank), dtype=np.float32) * np.float32(std))
            w.add_tensor(f"blk.{i}.{t}.weight.lora_a", a.astype(np.float32))
            w.add_tensor(f"blk.{i}.{t}.weight.lora_b", b.astype(np.float32))
    _write(w)
    return path
