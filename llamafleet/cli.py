"""The ``llamafleet`` command line.

    llamafleet serve --config fleet.toml      run a supervisor in the foreground
    llamafleet status [--json]                show the workers of a running fleet
    llamafleet generate --model NAME "prompt" [--max-tokens N] [--json]
    llamafleet chat ["message"]               chat with the default model (SmolLM2)
    llamafleet stop                           shut a running fleet down
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from typing import Any

from llamafleet.bench.run import build_parser as bench_parser
from llamafleet.bench.run import main as bench_main
from llamafleet.client import Client
from llamafleet.runtime import protocol
from llamafleet.runtime.config import (
    DEFAULT_MODEL_NAME,
    Config,
    default_address,
    default_model_table,
)
from llamafleet.runtime.errors import ConfigError, LlamafleetError, SetupError
from llamafleet.runtime.supervisor import Supervisor


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("temperature", "top_k", "top_p", "min_p", "seed", "repeat_penalty"):
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    return out


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=protocol.DEFAULT_MAX_TOKENS)
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-k", dest="top_k", type=int)
    p.add_argument("--top-p", dest="top_p", type=float)
    p.add_argument("--min-p", dest="min_p", type=float)
    p.add_argument("--repeat-penalty", dest="repeat_penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def cmd_serve(args: argparse.Namespace) -> int:
    config = Config.load(args.config)
    if args.http:
        config = config.with_http(args.http)
    sup = Supervisor(config)

    def started(s: Supervisor) -> None:
        print(f"llamafleet: supervisor at {s.address} "
              f"serving {', '.join(config.models) or 'no models'}", flush=True)
        for url in (s.http_url, s.metrics_url):
            if url is not None:
                print(url, flush=True)  # its own line, for scripts to read

    sup.serve_forever(on_started=started)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        workers = c.fleet_status(**({} if args.timeout is None else {"timeout": args.timeout}))
    if args.json:
        print(json.dumps(workers, indent=2))
        return 0
    nodes = any(w.get("node") for w in workers["workers"])  # a cluster (llamafleet ray)
    node_col = f"{'NODE':<13}" if nodes else ""
    print(f"{'MODEL':<16} {node_col}{'STATE':<11} {'PID':>7} {'RSS MB':>7} {'RESTARTS':>8}  "
          "LAST EXIT")
    for w in workers["workers"]:
        state = w["state"]
        if state in ("starting", "restarting") and w.get("load_progress"):
            state = f"{state} {w['load_progress'] * 100:.0f}%"
        name = w["model"] if not w.get("replica") else f"{w['model']}#{w['replica']}"
        rss = f"{w['rss_mb']:.0f}" if w.get("rss_mb") else "-"
        node = f"{w.get('node') or '-':<13}" if nodes else ""
        print(f"{name:<16} {node}{state:<11} {w['pid'] or '-':>7} {rss:>7} {w['restarts']:>8}  "
              f"{w['last_exit'] or '-'}")
    for s in workers["services"]:
        print(f"{'[' + s['name'] + ']':<16} {s['state']:<11} {s['pid'] or '-':>7} {'-':>7} "
              f"{s['restarts']:>8}  {s['last_exit'] or '-'}  {s['url'] or ''}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    with _client(args) as c:
        kwargs = dict(max_tokens=args.max_tokens, stop=args.stop, **_sampling(args))
        if args.json:
            r = c.generate(args.model, args.prompt, **kwargs)
            print(json.dumps(r.to_dict(), ensure_ascii=False))
            return 0
        stream = c.stream(args.model, args.prompt, **kwargs)
        for delta in stream:
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def _chat_loop(c: Client, model: str, args: argparse.Namespace) -> int:
    kwargs = dict(max_tokens=args.max_tokens, stop=args.stop, **_sampling(args))
    messages: list[dict[str, str]] = []
    one_shot = args.message is not None
    interactive = not one_shot
    if interactive:
        print(f"llamafleet chat with {model} (Ctrl-D or /exit to quit)", file=sys.stderr)
    while True:
        if one_shot:
            text = args.message
        else:
            try:
                text = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            if text.strip() in ("/exit", "/quit"):
                return 0
            if not text.strip():
                continue
        messages.append({"role": "user", "content": text})
        stream = c.chat_stream(model, messages, system=args.system, **kwargs)
        reply = []
        try:
            for delta in stream:
                reply.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.cancel()
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
        if one_shot:
            return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if args.address:
        with _client(args) as c:
            return _chat_loop(c, args.model or "default", args)
    if args.config:
        config = Config.load(args.config)
        model = args.model or next(iter(config.models), None)
        if model is None:
            raise ConfigError(f"{args.config} lists no models")
    else:
        model = args.model or DEFAULT_MODEL_NAME
        runtime_dir = tempfile.mkdtemp(prefix="llamafleet-chat-")
        config = Config.from_dict({
            "supervisor": {"runtime_dir": runtime_dir, "log_level": "warning"},
            "models": {model: default_model_table(
                n_seq_max=1, **({} if args.n_ctx is None else {"n_ctx": args.n_ctx}))}})
    if args.verbose:
        logging.getLogger("llamafleet").setLevel(logging.INFO)
    with Supervisor(config) as sup:
        print(f"llamafleet: loading {model}...", file=sys.stderr, flush=True)
        sup.wait_ready(timeout=config.supervisor.startup_timeout, models=[model])
        with Client(sup.address) as c:
            return _chat_loop(c, model, args)


#: how long a command waits for the supervisor at --address to answer before it says
#: that no fleet is running there
CLI_CONNECT_TIMEOUT = 1.5


def _client(args: argparse.Namespace) -> Client:
    return Client(args.address, control_timeout=CLI_CONNECT_TIMEOUT,
                  curve_server_key=getattr(args, "curve_server_key", None),
                  curve_client_cert=getattr(args, "curve_client_cert", None))


def cmd_keys(args: argparse.Namespace) -> int:
    from llamafleet.runtime.security import generate_keys
    paths = generate_keys(args.directory, client_name=args.client)
    print(f"""CURVE keys written to {args.directory}
  supervisor config:  curve_server_key = "{paths['server_secret']}"
                      curve_authorized_clients = "{paths['authorized']}"
  clients:            --curve-server-key {paths['server_public']}
                      --curve-client-cert {paths['client_secret']}
  (or LLAMAFLEET_CURVE_SERVER_KEY / LLAMAFLEET_CURVE_CLIENT_CERT)""")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c.shutdown_fleet()
    print("llamafleet: shutdown requested", file=sys.stderr)
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    with _client(args) as c:
        found = c.load(args.model, wait=args.wait)
    ready = ", ".join(e.endpoint for e in found.endpoints) or "loading"
    print(f"llamafleet: {args.model}: {ready}", file=sys.stderr)
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c.unload(args.model)
    print(f"llamafleet: {args.model}: unloading", file=sys.stderr)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    with _client(args) as c:
        done = c.reload()
    for what in ("added", "removed", "changed", "unchanged"):
        print(f"{what}: {', '.join(getattr(done, what)) or '-'}")
    return 0


def cmd_ray(args: argparse.Namespace) -> int:
    try:
        import llamafleet.ray as lfray
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SetupError(f"llamafleet ray needs Ray: pip install \"llamafleet[ray]\" ({exc})") \
            from None
    if args.ray_command == "up":
        for address in lfray.up(args.config, address=args.ray_address, timeout=args.timeout):
            print(address)
    elif args.ray_command == "down":
        if not lfray.down(address=args.ray_address):
            print("no llamafleet fleet on this Ray cluster", file=sys.stderr)
            return 1
    else:
        st = lfray.state(address=args.ray_address)
        if st is None:
            print("no llamafleet fleet on this Ray cluster", file=sys.stderr)
            return 1
        print(json.dumps(st, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    return bench_main(args=args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamafleet", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_address(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", default=None,
                       help=f"supervisor control address (default: {default_address()})")
        p.add_argument("--timeout", type=float, default=None, help="per-call timeout (s)")
        add_curve(p)

    def add_curve(p: argparse.ArgumentParser) -> None:
        p.add_argument("--curve-server-key", dest="curve_server_key", default=None,
                       help="server public key file (tcp:// with CURVE)")
        p.add_argument("--curve-client-cert", dest="curve_client_cert", default=None,
                       help="this client's .key_secret certificate")

    p = sub.add_parser("serve", help="run a supervisor in the foreground")
    p.add_argument("--config", required=True, help="fleet TOML file")
    p.add_argument("--http", default=None, metavar="HOST:PORT",
                   help="also serve the OpenAI-compatible HTTP API here (the [http] table's "
                        "listen)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="show the workers of a running fleet")
    with_address(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("generate", help="complete a prompt on a running fleet")
    with_address(p)
    p.add_argument("--model", required=True)
    p.add_argument("prompt")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat (default: SmolLM2 in a private fleet)")
    p.add_argument("message", nargs="?", help="one message; omit for an interactive chat")
    p.add_argument("--address", default=None, help="use a running fleet instead")
    add_curve(p)
    p.add_argument("--config", default=None, help="start this fleet instead of SmolLM2")
    p.add_argument("--model", default=None)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--n-ctx", dest="n_ctx", type=int, default=None,
                   help="context length (default: the llama backend's)")
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("bench", help="benchmark a model against llama.cpp peers "
                                     "(docs/benchmarks.md)")
    bench_parser(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("keys", help="generate CURVE key pairs for tcp:// endpoints")
    p.add_argument("directory")
    p.add_argument("--client", default="client", help="name of the client key pair")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("load", help="load a model now (making room under the limits)")
    with_address(p)
    p.add_argument("model")
    p.add_argument("--wait", type=float, default=120.0,
                   help="seconds to wait until it is ready (0: do not wait)")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("unload", help="stop a model's workers (they finish their requests)")
    with_address(p)
    p.add_argument("model")
    p.set_defaults(func=cmd_unload)

    p = sub.add_parser("reload", help="re-read the configuration file and apply the change "
                                      "(as SIGHUP to serve)")
    with_address(p)
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("ray", help="run the fleet across a Ray cluster (docs/scale-out.md)")
    ray_sub = p.add_subparsers(dest="ray_command", required=True)
    for name, doc in (("up", "place the fleet on the cluster and print the supervisors' "
                             "addresses"),
                      ("down", "stop the fleet's supervisors and workers"),
                      ("status", "the placement and the supervisors' addresses (JSON)")):
        rp = ray_sub.add_parser(name, help=doc)
        rp.add_argument("--address", dest="ray_address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else the local one)")
        if name == "up":
            rp.add_argument("--config", required=True, help="fleet TOML file")
            rp.add_argument("--timeout", type=float, default=120.0,
                            help="seconds to wait for every supervisor")
    p.set_defaults(func=cmd_ray)

    p = sub.add_parser("stop", help="shut a running fleet down gracefully")
    with_address(p)
    p.set_defaults(func=cmd_stop)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except LlamafleetError as exc:
        print(f"llamafleet: {exc}", file=sys.stderr)
        return 2
    except SetupError as exc:
        print(f"llamafleet: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
