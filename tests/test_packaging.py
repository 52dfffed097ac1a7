"""The built wheel works on its own, next to a service's own generic module names.

The project's folders (runtime/, worker/, client/, backends/) install as
``llamafleet.runtime`` and so on, and workers start as ``python -m
llamafleet.worker``. This test proves it from the outside: it builds a wheel from
a copy of the working tree, installs it into a fresh virtual environment (no
system site-packages, so the editable install cannot leak in), and from a
directory holding the user's own ``client.py``, ``worker.py``, ``runtime.py``,
``bench.py`` and ``backends/`` (first on ``sys.path``, through the working
directory and ``PYTHONPATH``) starts a fake fleet and generates text.

llama-cpp-python, a hard dependency that takes minutes to build, is left out:
the wheel goes in with ``--no-deps`` and its other requirements (read from the
wheel's metadata) are installed from the package index pip is configured with.

Skipped, with the reason, only when this machine cannot do it at all: not
Linux, no ``ensurepip`` (so no venv with pip), or pip cannot find the build or
runtime requirements in any index. Every other failure fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: requirements left out of the venv (a native build of minutes; unused by the fake backend)
HEAVY = {"llama-cpp-python"}
#: the service's own modules, named like llamafleet's folders
USER_MODULES = ("client", "worker", "runtime", "bench", "backends")
#: pip saying that an index has nothing (or is unreachable): the machine's limit, not ours
NOT_FOUND = re.compile(r"Could not find a version that satisfies the requirement[^\n]*|"
                       r"No matching distribution found for[^\n]*")
COPY_IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                     "*.pyc", ".pytest_cache", ".hypothesis", ".venv",
                                     ".mypy_cache", ".ruff_cache")

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="llamafleet's supervisor is Linux-only (pidfd, /proc)"),
    pytest.mark.timeout(300),
]


def _env() -> dict[str, str]:
    """The environment for pip and the venv: nothing pointing at the source tree."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
           and not k.startswith("LLAMAFLEET_")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONNOUSERSITE="1")
    return env


def _pip(python: Path | str, *args: str, what: str, timeout: float = 180) -> None:
    """Run pip; skip if an index lacks a requirement, fail on anything else."""
    cmd = [str(python), "-m", "pip", *args]
    try:
        proc = subprocess.run(cmd, env=_env(), cwd="/", capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"{what}: pip ran past {timeout}s: {' '.join(cmd)}\n{partial}")
    if proc.returncode != 0:
        out = proc.stdout + proc.stderr
        missing = NOT_FOUND.search(out)
        if missing:
            pytest.skip(f"{what}: no package index has it here ({missing.group(0)})")
        pytest.fail(f"{what} failed (rc {proc.returncode}): {' '.join(cmd)}\n{out}")


def _has(dist: str, min_major: int = 0) -> bool:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return int(version(dist).split(".")[0]) >= min_major
    except (PackageNotFoundError, ValueError):
        return False


def build_wheel(out: Path, work: Path) -> Path:
    """A wheel of a copy of the working tree (no build/ or egg-info left in the repo)."""
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=COPY_IGNORE)
    args = ["wheel", "--no-deps", "-w", str(out)]
    if _has("setuptools", 68) and _has("wheel"):
        args.append("--no-build-isolation")  # works offline with what is installed
    _pip(sys.executable, *args, str(src), what="building the wheel")
    [wheel] = out.glob("llamafleet-*.whl")
    return wheel


def runtime_requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist lines, minus extras and the heavy native one."""
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = zf.read(meta_name).decode()
    reqs = []
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if "extra ==" in req:
            continue
        name = re.match(r"[A-Za-z0-9._-]+", req)
        assert name, line
        if re.sub(r"[-_.]+", "-", name.group(0)).lower() not in HEAVY:
            reqs.append(req)
    return reqs


def user_app(app: Path) -> Path:
    """The service's own directory: generic module names that log who imports them."""
    log = app / "imports.log"
    body = textwrap.dedent('''\
        """The service's own {name!r} module: nothing to do with llamafleet."""
        import os
        MARKER = "user-{name}"
        with open({log!r}, "a") as _f:
            _f.write("{name} %d\\n" % os.getpid())
        ''')
    (app / "backends").mkdir(parents=True)
    for name in USER_MODULES:
        path = app / "backends" / "__init__.py" if name == "backends" else app / f"{name}.py"
        path.write_text(body.format(name=name, log=str(log)))
    (app / "check_install.py").write_text(CHECK_SCRIPT)
    return log


#: run by the venv's python, from the user's directory
CHECK_SCRIPT = r'''
import importlib.metadata as md
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

repo = Path(sys.argv[1]).resolve()
site = Path(sysconfig.get_paths()["purelib"]).resolve()
assert sys.prefix != sys.base_prefix, "not running in the venv"

import llamafleet
from llamafleet import Client, Config, Supervisor
from llamafleet.testing import fake_client, fake_fleet

fast = {"heartbeat_interval": 0.1, "heartbeat_timeout": 1.5, "startup_timeout": 60.0,
        "shutdown_grace": 5.0}
rd = tempfile.mkdtemp(prefix="lf-", dir="/tmp")
try:
    cfg = Config.from_dict({"supervisor": {"runtime_dir": rd, **fast},
                            "models": {"tiny": {"backend": "fake"}}})
    with Supervisor(cfg) as sup:
        sup.wait_ready(timeout=60)
        workers = []
        for w in sup.status():
            pid = int(w["pid"])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
            environ = dict(e.split(b"=", 1) for e in
                           Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
            workers.append({"pid": pid, "cmdline": [c.decode() for c in cmdline],
                            "pythonpath": environ.get(b"PYTHONPATH", b"").decode()})
        with Client(sup.address) as c:
            text = c.generate("tiny", "Hello", max_tokens=8, temperature=0).text
    with fake_fleet() as sup2, fake_client(sup2) as c2:   # the installed testing helpers
        text2 = c2.generate("fake", "Hello", max_tokens=8, temperature=0).text
finally:
    shutil.rmtree(rd, ignore_errors=True)

import backends, bench, client, runtime, worker   # the service's own, not llamafleet's
markers = {m.__name__: m.MARKER for m in (backends, bench, client, runtime, worker)}

def inside(f, d):
    try:
        return Path(f).resolve().is_relative_to(d)
    except (TypeError, OSError):
        return False

llamafleet_files = {name: m.__file__ for name, m in sys.modules.items()
                    if name == "llamafleet" or name.startswith("llamafleet.")
                    if getattr(m, "__file__", None)}
dist = md.distribution("llamafleet")
eps = {(ep.group, ep.name): ep.value for ep in dist.entry_points}
print(json.dumps({
    "text": text, "text2": text2, "workers": workers, "executable": sys.executable,
    "markers": markers, "version": dist.version, "pid": os.getpid(),
    "dist_in_site": inside(dist.locate_file("llamafleet/__init__.py"), site),
    "outside_site": sorted(n for n, f in llamafleet_files.items() if not inside(f, site)),
    "n_llamafleet_modules": len(llamafleet_files),
    "from_repo": sorted(n for n, m in sys.modules.items()
                        if inside(getattr(m, "__file__", None), repo)),
    "repo_on_path": [p for p in sys.path if p and inside(p, repo)],
    "llamafleet_file": llamafleet.__file__, "site": str(site),
    "entry_points": {f"{g}:{n}": v for (g, n), v in eps.items()},
}))
'''


def test_wheel_in_a_clean_venv_beside_generic_user_modules(tmp_path: Path) -> None:
    try:
        import ensurepip  # noqa: F401
    except ImportError:
        pytest.skip("this Python has no ensurepip, so no venv with pip "
                    "(Debian/Ubuntu: apt install python3-venv)")

    wheel = build_wheel(tmp_path / "wheels", tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in ("", "/runtime", "/worker", "/client", "/backends", "/backends/llama",
                "/bench", "/testing"):
        assert f"llamafleet{pkg}/__init__.py" in names, pkg
    assert {"llamafleet/worker/__main__.py", "llamafleet/testing/plugin.py",
            "llamafleet/testing/tiny_gguf.py", "llamafleet/bench/build_peers.sh",
            "llamafleet/runtime/py.typed", "llamafleet/cli.py"} <= names
    assert not [n for n in names if n.split("/")[0] in (*USER_MODULES, "tests")]

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, clear=True)  # no system site-packages
    python = env_dir / "bin" / "python"
    reqs = runtime_requirements(wheel)
    assert reqs and not any(r.lower().startswith("llama") for r in reqs)
    _pip(python, "install", "--quiet", *reqs, what="installing the runtime requirements")
    _pip(python, "install", "--quiet", "--no-deps", str(wheel), what="installing the wheel")

    app = tmp_path / "app"
    log = user_app(app)
    env = _env()
    env["PYTHONPATH"] = str(app)
    proc = subprocess.run([str(python), "check_install.py", str(ROOT)], cwd=app, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])

    # llamafleet came from the venv's site-packages, all of it; nothing from the repository
    site = Path(report["site"])
    assert site.is_relative_to(env_dir.resolve()), report["site"]
    assert Path(report["llamafleet_file"]).is_relative_to(site)
    assert report["dist_in_site"] and report["outside_site"] == []
    assert report["n_llamafleet_modules"] > 10
    assert report["from_repo"] == [] and report["repo_on_path"] == []
    assert report["version"] == wheel.name.split("-")[1]
    eps = report["entry_points"]
    assert eps["llamafleet.backends:fake"] == "llamafleet.backends.fake:FakeBackend"
    assert eps["pytest11:llamafleet"] == "llamafleet.testing.plugin"
    assert eps["console_scripts:llamafleet"] == "llamafleet.cli:main"
    assert (env_dir / "bin" / "llamafleet").exists()

    # the fleet worked, its workers started from the venv as `python -m llamafleet.worker`
    assert report["text"] and report["text2"]
    [w] = report["workers"]
    assert w["cmdline"] == [report["executable"], "-m", "llamafleet.worker"]
    assert Path(report["executable"]).parent == env_dir / "bin"
    assert w["pythonpath"] == str(app)  # the user's directory, and nothing else

    # the service's own generic modules stayed the service's: only the check script
    # imported them, never llamafleet in the script or in a worker process
    assert report["markers"] == {name: f"user-{name}" for name in USER_MODULES}
    lines = log.read_text().splitlines()
    assert sorted(lines) == sorted(f"{name} {report['pid']}" for name in USER_MODULES), lines
