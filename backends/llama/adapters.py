"""LoRA adapters: the loaded ones by name and the active set applied to a context."""

from __future__ import annotations

import hashlib
from typing import Any

from llamafleet.backends.llama.gguf_meta import check_model_file, file_identity, read_metadata
from llamafleet.backends.llama.native import LlamaAdapter, LlamaContext, LlamaModel, NullHandle
from llamafleet.runtime.errors import BadRequest, InternalError


class LoraSet:
    """Adapters loaded for ``model`` (name -> file facts and handle) and the active
    set on ``ctx`` (name -> scale). Names and scales are checked by the caller."""

    def __init__(self, model: LlamaModel, ctx: LlamaContext) -> None:
        self.model, self.ctx = model, ctx
        self.loaded: dict[str, dict[str, Any]] = {}
        self.active: dict[str, float] = {}

    def load(self, name: str, path: str, architecture: str) -> dict[str, Any]:
        """Load the LoRA file ``path`` under ``name`` (not applied); BadRequest when it
        is no LoRA adapter, is for another architecture, or does not fit the model."""
        apath = check_model_file(path, "adapter")
        meta = read_metadata(apath, {"general.architecture", "general.type", "adapter.type",
                                     "adapter.lora.alpha"})
        arch = meta.get("general.architecture")
        if meta.get("general.type") not in (None, "adapter") or \
                meta.get("adapter.type") not in (None, "lora"):
            raise BadRequest(f"{apath} is not a LoRA adapter (general.type="
                             f"{meta.get('general.type')!r}, adapter.type={meta.get('adapter.type')!r})")
        if arch != architecture:
            raise BadRequest(f"adapter architecture {arch!r} does not match the model's "
                             f"{architecture!r}")
        try:
            handle = LlamaAdapter(self.model, apath)
        except NullHandle:
            raise BadRequest(f"llama.cpp could not load the adapter {apath} (tensor shapes "
                             "do not fit this model, or the file is corrupt; see the worker log)"
                             ) from None
        alpha = meta.get("adapter.lora.alpha")
        self.loaded[name] = {"handle": handle, "path": apath, "file_id": file_identity(apath),
                             "alpha": alpha, "architecture": arch}
        return {"name": name, "path": apath, "architecture": arch, "alpha": alpha}

    def apply(self, scales: dict[str, float]) -> None:
        """Make ``scales`` (loaded names -> scale; empty clears) the active set."""
        names = list(scales)
        rc = self.ctx.set_adapters([self.loaded[k]["handle"] for k in names],
                                   [scales[k] for k in names])
        if rc != 0:
            raise InternalError(f"llama_set_adapters_lora failed ({rc})")
        self.active = dict(scales)

    def unload(self, name: str) -> None:
        """Free a loaded adapter, removing it from the active set first."""
        if name in self.active:
            self.apply({k: v for k, v in self.active.items() if k != name})
        self.loaded.pop(name)["handle"].close()

    def describe(self) -> dict[str, Any]:
        """name -> {"path", "scale" (None when inactive)}."""
        return {k: {"path": v["path"], "scale": self.active.get(k)}
                for k, v in self.loaded.items()}

    def identity(self) -> bytes:
        """16 bytes naming the active set (files and scales; zeros when empty)."""
        if not self.active:
            return b"\0" * 16
        h = hashlib.sha256()
        for name in sorted(self.active, key=lambda n: self.loaded[n]["file_id"]):
            h.update(self.loaded[name]["file_id"])
            h.update(repr(float(self.active[name])).encode())
        return h.digest()[:16]

    def close(self) -> None:
        """Deactivate and free every adapter (idempotent)."""
        if self.active and not self.ctx.closed:
            try:
                self.ctx.set_adapters([], [])
            except Exception:  # noqa: BLE001
                pass
        self.active = {}
        for a in self.loaded.values():
            a["handle"].close()
        self.loaded = {}
