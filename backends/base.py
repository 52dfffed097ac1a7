"""The contract every backend implements.

A backend owns one model and its inference context inside a worker process. It
knows nothing of ZeroMQ or of the protocol: the worker validates requests,
calls these methods from a single thread, and turns raised
:class:`runtime.errors.LlamafleetError` subclasses into typed replies.

Rules every implementation follows:

* Bad input raises :class:`~runtime.errors.BadRequest` (or ``NotFound``)
  *before* anything reaches native code; a request must never crash the process.
* A feature the backend lacks raises :class:`~runtime.errors.NotSupported`
  (the default of every optional method below).
* Sequences are numbered ``0 .. n_seq_max-1``. Each holds a token history (its
  KV state) and its own sampler. ``evaluate`` appends tokens; ``sample`` picks
  the next token from the logits of the last evaluated token of that sequence.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from llamafleet.runtime import fields
from llamafleet.runtime.errors import BadRequest, NotSupported
from llamafleet.runtime.fields import Field
from llamafleet.runtime.protocol import ModelInfo as ModelInfo
from llamafleet.runtime.protocol import TokenLogprob
from llamafleet.runtime.sampling import SamplingParams

#: Called during model loading with a fraction in [0, 1].
ProgressCallback = Callable[[float], None]


class Backend(ABC):
    """One model and its context. Methods are called from one thread only."""

    #: Registry name ("fake", "llama").
    name: str = ""
    #: Every option the backend takes, declared once (types, default, bounds). The
    #: configuration loader checks ``[models.NAME]`` tables against it before any
    #: process starts; the constructor checks again for direct use.
    OPTIONS: ClassVar[Mapping[str, Field]] = {}

    def __init__(self, options: Mapping[str, Any]) -> None:
        """Check the options against :attr:`OPTIONS` and keep them, defaults filled
        in (``self.options``); do not load yet.

        Unknown or badly typed options raise BadRequest.
        """
        if not isinstance(options, Mapping):
            raise BadRequest("backend options must be a mapping")
        self.options: dict[str, Any] = fields.parse(
            self.OPTIONS, options, f"{self.name or type(self).__name__} backend option",
            error=BadRequest)
        #: the sampler of a sequence nobody set one for (see set_default_sampling)
        self.default_params = SamplingParams()

    # -- lifecycle ---------------------------------------------------------
    @abstractmethod
    def load(self, progress: ProgressCallback | None = None) -> None:
        """Load the model and create the context, reporting progress in [0, 1].

        Raises BadRequest for a missing/unreadable/invalid model file.
        """

    @abstractmethod
    def info(self) -> ModelInfo:
        """Model metadata and context limits (valid after ``load``)."""

    def close(self) -> None:
        """Free native resources. Safe to call twice."""

    def set_default_sampling(self, params: SamplingParams) -> None:
        """Install the model's default sampler: what a sequence samples with until
        ``set_sampling`` gives it its own, and again after ``seq_clear``. The worker
        calls it after ``load`` with the configured and file defaults."""
        self.default_params = params

    def default_sampling(self) -> dict[str, Any]:
        """Sampling parameters the model file recommends (llama: the GGUF's
        ``general.sampling.*`` keys). The model's ``[models.NAME.sampling]`` table
        overrides them, and a request's own values override both."""
        return {}

    # -- vocabulary --------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str, add_special: bool = True,
                 parse_special: bool = False) -> list[int]:
        """Text to token ids. ``add_special`` adds BOS (and EOS if the model wants);
        ``parse_special`` lets special-token text like ``<|im_start|>`` map to its id."""

    @abstractmethod
    def token_to_piece(self, token: int, special: bool = True) -> bytes:
        """The raw bytes one token renders to (may be a partial UTF-8 sequence).
        BadRequest if the id is out of range."""

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """Token ids to text; invalid UTF-8 is replaced. BadRequest on bad ids.

        ``special=False`` drops control tokens such as BOS/EOS from the text."""
        self.check_tokens(tokens)
        out = b"".join(self.token_to_piece(t, special=special) for t in tokens)
        return out.decode("utf-8", errors="replace")

    @abstractmethod
    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT, ...)."""

    @abstractmethod
    def check_tokens(self, tokens: Sequence[int]) -> None:
        """Raise BadRequest unless every id is an int in ``[0, n_vocab)``."""

    # -- sequences ---------------------------------------------------------
    @abstractmethod
    def seq_len(self, seq: int) -> int:
        """Number of tokens held by the sequence (its next position)."""

    @abstractmethod
    def evaluate(self, batch: Sequence[tuple[int, Sequence[int]]]) -> None:
        """Append tokens to sequences and compute logits for the last token of each.

        ``batch`` lists ``(seq, tokens)`` pairs with distinct sequences; the backend
        may split the work into chunks of ``n_batch``. Raises BadRequest for a bad
        sequence id, bad token ids, or a sequence that would exceed ``n_ctx``;
        in that case no sequence of the batch is changed.
        """

    def evaluate_drafts(self, batch: Sequence[tuple[int, Sequence[int]]],
                        drafts: Mapping[int, Sequence[int]]) -> None:
        """:meth:`evaluate`, plus a draft after the tokens of some sequences, in the
        same computation (speculative decoding; list ``"speculative"`` in
        ``info().features``). ``drafts[seq]`` follows that sequence's tokens in
        ``batch`` (which must be there, non-empty), with logits for every draft
        position. The sequence then holds its batch tokens only (``seq_len``,
        ``seq_tokens``, ``sample`` as after :meth:`evaluate`); its draft is
        pending: :meth:`draft_accept` keeps the next draft token, :meth:`draft_reject`
        drops what is left. Same errors as ``evaluate``, and on error nothing changes."""
        raise NotSupported(f"{self.name} backend cannot verify drafts")

    def draft_accept(self, seq: int) -> None:
        """Keep the next token of the sequence's pending draft (``sample`` just chose
        it): it joins the sequence as if evaluated, and ``sample`` now reads the
        logits that followed it."""
        raise NotSupported(f"{self.name} backend cannot verify drafts")

    def draft_reject(self, seq: int) -> None:
        """Drop what is left of the sequence's pending draft (its KV cells are
        removed); nothing to drop is fine. Any other call on the sequence drops it
        first."""

    def prefill(self, seq: int, tokens: Sequence[int]) -> None:
        """Append ``tokens`` to one sequence (``evaluate`` of one pair)."""
        self.evaluate([(seq, tokens)])

    @abstractmethod
    def set_sampling(self, seq: int, params: SamplingParams) -> None:
        """Install the sampler of a sequence. An invalid grammar or JSON schema
        raises BadRequest and leaves the previous sampler in place (fail closed)."""

    @abstractmethod
    def sample(self, seq: int) -> int | None:
        """Choose the next token from the sequence's current logits and feed it to
        the sampler's state (penalties, grammar). Does not append it to the KV.

        Returns ``None`` when the grammar admits no further token (the caller
        ends the generation cleanly). Raises BadRequest if the sequence has no
        logits (nothing evaluated yet)."""

    def accept(self, seq: int, tokens: Sequence[int]) -> None:
        """Feed tokens produced earlier into the sequence's sampler state (grammar,
        penalties) as if :meth:`sample` had chosen them: a generation another worker
        began resumes here. Backends whose samplers keep state implement it."""
        raise NotSupported(f"{self.name} backend cannot resume a generation")

    def token_logprob(self, seq: int, token: int, top_n: int) -> TokenLogprob:
        """The logprob of ``token``, just sampled for ``seq``, and the ``top_n`` likeliest
        tokens of that step (a protocol.TokenLogprob map): the log-softmax of the
        model's raw logits, before sampling. Backends that list ``logprobs`` in
        ``info().features`` implement it; it is called right after :meth:`sample`."""
        raise NotSupported(f"{self.name} backend does not report logprobs")

    @abstractmethod
    def seq_clear(self, seq: int) -> None:
        """Drop the sequence's tokens, KV and sampler state."""

    @abstractmethod
    def seq_tokens(self, seq: int) -> list[int]:
        """The token history of the sequence (what its KV holds)."""

    # -- KV state ----------------------------------------------------------
    def kv_pack(self, seq: int) -> bytes:
        """Serialize the sequence's KV state (with a self-describing header)."""
        raise NotSupported(f"{self.name} backend does not support kv_pack")

    def kv_snapshot(self, seq: int) -> Callable[[], bytes]:
        """Read the sequence's KV now and return a function that builds the blob
        :meth:`kv_pack` would return. Only this call touches the context (the
        sequence may be cleared or reused as soon as it returns); the returned
        function touches nothing of the backend, so the scheduler runs it on
        another thread while decoding goes on. The default packs here."""
        blob = self.kv_pack(seq)
        return lambda: blob

    def kv_unpack(self, seq: int, data: bytes) -> int:
        """Replace the sequence's state with a blob from ``kv_pack``; returns its
        token count. A blob from another model or an incompatible context raises
        BadRequest and leaves the sequence empty. Afterwards ``sample`` works."""
        raise NotSupported(f"{self.name} backend does not support kv_unpack")

    def seq_truncate(self, seq: int, n_keep: int) -> None:
        """Keep the first ``n_keep`` (>= 1) tokens of the sequence and drop the rest,
        leaving fresh logits for the last kept token (so ``sample`` works)."""
        raise NotSupported(f"{self.name} backend does not support seq_truncate")

    def cache_namespace(self) -> str:
        """Identity of the model and the active adapter set: a KV blob packed under
        one namespace restores under the same one (the prefix cache's key)."""
        raise NotSupported(f"{self.name} backend does not support KV caching")

    # -- adapters ----------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Load a LoRA adapter file under ``name`` (not applied yet)."""
        raise NotSupported(f"{self.name} backend does not support LoRA adapters")

    def unload_adapter(self, name: str) -> None:
        """Free a loaded adapter (removing it from the active set). NotFound if unknown."""
        raise NotSupported(f"{self.name} backend does not support LoRA adapters")

    def set_adapters(self, scales: dict[str, float]) -> None:
        """Replace the active adapter set: name -> scale (empty clears).
        NotFound for an unknown name."""
        raise NotSupported(f"{self.name} backend does not support LoRA adapters")

    def adapters(self) -> dict[str, Any]:
        """Loaded adapters: name -> {"path", "scale" (None when inactive)}."""
        return {}

    # -- embeddings and chat -----------------------------------------------
    def embed(self, texts: Sequence[str], normalize: bool = True) -> list[list[float]]:
        """One pooled embedding per text (L2-normalized when ``normalize``)."""
        raise NotSupported(f"{self.name} backend does not support embeddings")

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], *,
                            add_generation_prompt: bool = True,
                            template: str | None = None,
                            enable_thinking: bool | None = None,
                            tools: Sequence[dict[str, Any]] | None = None) -> str:
        """Render chat messages with the model's template (or ``template``); ``tools``
        are OpenAI-style function declarations."""
        raise NotSupported(f"{self.name} backend does not support chat templates")

    # -- control -----------------------------------------------------------
    def abort(self, flag: bool) -> None:
        """Thread-safe switch, callable from any thread: while set, long work in
        ``evaluate`` stops as soon as it can and raises Cancelled, appending nothing."""
