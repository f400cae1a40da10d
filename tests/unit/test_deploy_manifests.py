"""The Kubernetes manifests in deploy/ validate against a current Kubernetes
schema (kubernetes-validate, strict: unknown fields are errors), and hold what
the relay needs: host networking, bpffs, probes that do not depend on Redis,
a relayd.toml that relayd itself accepts."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from manager.relay.config import RelaydConfig
from tests.support.paths import REPO

DEPLOY = REPO / "deploy"
K8S_VERSION = latest_version()


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


def by_kind(kind: str, name: str) -> dict:
    return next(d for _, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize(("where", "doc"), documents(), ids=[w for w, _ in documents()])
def test_manifest_validates_against_the_kubernetes_schema(where: str, doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_broken_manifest_is_refused() -> None:
    doc = by_kind("DaemonSet", "splitrelay-relay")
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["spec"]["template"]["spec"]["hostNetwrok"] = True  # a typo strict mode must catch
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_templates() -> None:
    listed = set(yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert listed == present


def test_the_relay_daemonset_has_what_relayd_needs() -> None:
    spec = by_kind("DaemonSet", "splitrelay-relay")["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    (c,) = spec["containers"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    bpffs = mounts["/sys/fs/bpf"]
    assert volumes[bpffs["name"]]["hostPath"]["path"] == "/sys/fs/bpf"
    assert bpffs["mountPropagation"] == "Bidirectional"  # pins outlive the pod
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert {"BPF", "NET_ADMIN", "NET_RAW"} <= set(c["securityContext"]["capabilities"]["add"])
    ports = {p["name"]: p for p in c["ports"]}
    assert ports["media"]["protocol"] == "UDP"
    for name in ("hint-key", "pki", "redis"):
        assert volumes[name]["secret"]["defaultMode"] == 0o400  # relayd refuses secrets others can read


def test_the_configmaps_relayd_toml_is_accepted_by_relayd(tmp_path: Path) -> None:
    text = by_kind("ConfigMap", "splitrelay-relayd")["data"]["relayd.toml"]
    data = tomllib.loads(text)
    # The files the pod mounts from Secrets, made here with the same modes.
    for section, key, content in (("", "hint_key_file", os.urandom(32).hex()),
                                  ("registry", "password_file", "secret")):
        path = tmp_path / key
        path.write_text(content + "\n")
        path.chmod(0o400)
        (data[section] if section else data)[key] = str(path)
    cfg = RelaydConfig.model_validate(data)
    assert cfg.registry.backend == "redis" and cfg.registry.password() == "secret"
    assert cfg.metrics.port == 9100
    probes = by_kind("DaemonSet", "splitrelay-relay")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in probes["ports"]}
    assert ports["metrics"] == cfg.metrics.port and ports["signaling"] == cfg.signaling.port
    assert ports["media"] == cfg.datapath.vips[0].port


def test_secrets_in_the_repository_are_placeholders() -> None:
    for where, doc in documents():
        if doc["kind"] == "Secret":
            assert all("REPLACE" in v for v in doc["stringData"].values()), where
