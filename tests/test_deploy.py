"""The Kubernetes manifests in deploy/ hold together: the fleet file in the
ConfigMap loads, and the ports and key paths it names are the ones the
StatefulSet, the Service and the Secret provide (no cluster runs here)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from llamafleet.runtime.config import Config

yaml = pytest.importorskip("yaml")
DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"


def _docs() -> dict[str, dict[str, Any]]:
    out = {}
    for f in sorted(DEPLOY.glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            out[d["kind"]] = d
    return out


def test_the_manifests_agree_with_the_fleet_file() -> None:
    docs = _docs()
    raw = tomllib.loads(docs["ConfigMap"]["data"]["fleet.toml"].replace("@POD_IP@", "10.1.2.3"))
    cfg = Config.from_dict(raw)
    sup = cfg.supervisor
    assert sup.curve and sup.transport == "tcp" and sup.tcp_host == "10.1.2.3"
    port = int(sup.control_address().rpartition(":")[2])
    spec = docs["StatefulSet"]["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert [p["containerPort"] for p in container["ports"]] == [port]
    service = docs["Service"]["spec"]
    assert service["clusterIP"] == "None" and [p["port"] for p in service["ports"]] == [port]
    assert spec["serviceName"] == docs["Service"]["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    keys = next(v for v in pod["volumes"] if v["name"] == "keys")["secret"]
    assert keys["secretName"] == docs["Secret"]["metadata"]["name"]
    paths = {f"{mounts['keys']}/{i['path']}" for i in keys["items"]}
    assert str(sup.curve_server_key) in paths
    assert any(p.startswith(str(sup.curve_authorized_clients) + "/") for p in paths)
    assert str(cfg.models["chat"].options["path"]).startswith(mounts["models"])
    assert pod["terminationGracePeriodSeconds"] > sup.shutdown_grace
