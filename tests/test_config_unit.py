"""Configuration and argument checks, in-process: declared options, refused early."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llamafleet.runtime import fields, protocol
from llamafleet.runtime.config import WORKER_OPTIONS, Config
from llamafleet.runtime.errors import BadRequest, ConfigError, LlamafleetError, SetupError


def load(models: dict) -> Config:
    return Config.from_dict({"supervisor": {"runtime_dir": "/tmp/lf-unit"}, "models": models})


def test_unknown_backend_option_is_refused_when_the_config_loads() -> None:
    with pytest.raises(ConfigError, match=r"\[models.m\] \(fake backend\).*'n_ctxx'"):
        load({"m": {"backend": "fake", "n_ctxx": 64}})
    with pytest.raises(ConfigError, match="n_ctx has type str"):
        load({"m": {"backend": "fake", "n_ctx": "64"}})
    with pytest.raises(ConfigError, match="n_ctx must be >= 1"):
        load({"m": {"backend": "fake", "n_ctx": 0}})
    with pytest.raises(ConfigError, match="crash_on_load must be one of"):
        load({"m": {"backend": "fake", "crash_on_load": "explode"}})


def test_llama_options_are_checked_without_loading_libllama() -> None:
    with pytest.raises(ConfigError, match="path .* is required"):
        load({"m": {"backend": "llama"}})
    with pytest.raises(ConfigError, match="'threads'"):
        load({"m": {"backend": "llama", "path": "/x.gguf", "threads": 2}})
    with pytest.raises(ConfigError, match="type_k must be one of"):
        load({"m": {"backend": "llama", "path": "/x.gguf", "type_k": "q3"}})
    cfg = load({"m": {"backend": "llama", "path": "/x.gguf", "n_ctx": 512}})
    assert cfg.models["m"].options == {"path": "/x.gguf", "n_ctx": 512}


def test_unknown_backend_and_worker_option_types() -> None:
    with pytest.raises(ConfigError, match="unknown backend 'nope'"):
        load({"m": {"backend": "nope"}})
    with pytest.raises(ConfigError, match="cannot import"):
        load({"m": {"backend": "no.such.module:Backend"}})
    with pytest.raises(ConfigError, match="max_queue has type bool"):
        load({"m": {"max_queue": True}})
    w = load({"m": {}}).models["m"].worker
    defaults = fields.defaults(WORKER_OPTIONS)
    assert {k: w[k] for k in ("max_queue", "prefix_cache", "cache_min_tokens",
                              "stream_interval_ms")} == {
        k: defaults[k] for k in ("max_queue", "prefix_cache", "cache_min_tokens",
                                 "stream_interval_ms")}


def test_sampling_table() -> None:
    m = load({"m": {"sampling": {"temperature": 0.2, "top_p": 0.9}}}).models["m"]
    assert m.sampling == {"temperature": 0.2, "top_p": 0.9}
    with pytest.raises(ConfigError, match=r"\[models.m.sampling\] unknown sampling"):
        load({"m": {"sampling": {"temprature": 0.2}}})
    with pytest.raises(ConfigError, match=r"\[models.m.sampling\] top_p must be <= 1"):
        load({"m": {"sampling": {"top_p": 2}}})
    with pytest.raises(ConfigError, match="sampling must be a table"):
        load({"m": {"sampling": 0.2}})


def test_config_errors_are_not_wire_errors() -> None:
    assert issubclass(ConfigError, SetupError)
    assert not issubclass(ConfigError, LlamafleetError)


def test_serve_refuses_a_bad_option_before_starting(tmp_path: Path) -> None:
    cfg = tmp_path / "fleet.toml"
    cfg.write_text('[supervisor]\nruntime_dir = "/tmp/lf-unit-serve"\n\n'
                   '[models.m]\nbackend = "fake"\nn_ctxx = 64\n')
    proc = subprocess.run([sys.executable, "-m", "llamafleet", "serve", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "n_ctxx" in proc.stderr and "serving" not in proc.stdout
    assert not Path("/tmp/lf-unit-serve/supervisor.lock").exists()


# -- request arguments -------------------------------------------------------------------
def test_validate_args_fills_defaults_and_names_the_problem() -> None:
    a = protocol.validate_args("generate", {"prompt": "hi"})
    assert a["max_tokens"] == 256 and a["stop"] == [] and a["stream"] is True
    assert a["session"] is None
    cases = [
        ({"prompt": "hi", "bogus": 1}, "unknown argument"),
        ({"prompt": "hi", "max_tokens": True}, "'max_tokens' has type bool"),
        ({"prompt": "hi", "max_tokens": -1}, "'max_tokens' must be in"),
        ({"prompt": 5}, "'prompt' has type int"),
        ({}, "one of 'prompt', 'tokens' is required"),
        ({"tokens": [1, "x"]}, "integer token ids"),
        ({"prompt": "hi", "session": "a/b"}, "path separators"),
        ({"prompt": "hi", "stop": ["x"] * 17}, "more than 16"),
    ]
    for args, message in cases:
        with pytest.raises(BadRequest, match=message):
            protocol.validate_args("generate", args)
    with pytest.raises(BadRequest, match="missing argument 'seq'"):
        protocol.validate_args("prefill", {"tokens": [1]})
    with pytest.raises(BadRequest, match="unknown command"):
        protocol.validate_args("nope", {})
    with pytest.raises(BadRequest, match="args must be a map"):
        protocol.validate_args("ping", [1])


def test_bad_sampling_values_in_a_model_file_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    from llamafleet.worker.server import _usable
    got = _usable({"temperature": 0.7, "top_p": 7.0, "repeat_penalty": 0, "top_k": 20})
    assert got == {"temperature": 0.7, "top_k": 20}
    assert "top_p=7.0" in caplog.text and "repeat_penalty=0" in caplog.text
