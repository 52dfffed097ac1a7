"""The llama.cpp backend: our own cffi binding to libllama.

libllama is opened on the first ``load()``, not on import, so the configuration
loader can read :attr:`LlamaBackend.OPTIONS` cheaply.
"""

from llamafleet.backends.llama.backend import LlamaBackend

__all__ = ["LlamaBackend"]
