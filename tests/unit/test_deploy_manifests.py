"""The Kubernetes manifests in deploy/ (a base and the lab and production
overlays, rendered by `kubectl kustomize` from Debian's kubernetes-client)
validate against a current Kubernetes schema (kubernetes-validate, strict:
unknown fields are errors), pass the policy scanner checkov (every finding
accepted is skipped in the manifest with its reason), and hold what the relay
needs: host networking, bpffs without mount propagation, no privilege beyond
four capabilities, probes that do not depend on Redis, a flow pool outside the
ephemeral and NodePort ranges, rediss:// behind a NetworkPolicy, and a
relayd.toml that relayd itself accepts."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from manager.relay.config import RelaydConfig, SignalingConfig
from manager.relay.port_ranges import check_flow_ports
from tests.support.image import IMAGE
from tests.support.paths import REPO

DEPLOY = REPO / "deploy"
BASE = DEPLOY / "base"
OVERLAYS = ("lab", "production")
K8S_VERSION = latest_version()
LINUX_EPHEMERAL = (32768, 60999)  # net.ipv4.ip_local_port_range's default
NODE_PORTS = (30000, 32767)       # Kubernetes' default Service NodePort range
CHECKOV = Path(sys.executable).parent / "checkov"  # installed beside the interpreter running the tests


def base_documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(BASE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


@functools.cache
def rendered_text(overlay: str) -> str:
    """`kubectl kustomize deploy/overlays/<overlay>` (Debian 12's kubectl,
    kustomize v2, reads the overlays as written; newer ones do too)."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: `make setup` installs Debian's kubernetes-client"
    proc = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def rendered(overlay: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(rendered_text(overlay)) if d]


def find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def by_kind(kind: str, name: str) -> dict:
    return find([d for _, d in base_documents()], kind, name)


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]) for d in docs
            if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


def containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


# --- schema -------------------------------------------------------------------------

@pytest.mark.parametrize(("where", "doc"), base_documents(), ids=[w for w, _ in base_documents()])
def test_manifest_validates_against_the_kubernetes_schema(where: str, doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_and_validates(overlay: str) -> None:
    docs = rendered(overlay)
    assert {d["kind"] for d in docs} >= {"DaemonSet", "Deployment", "StatefulSet", "NetworkPolicy",
                                         "PodDisruptionBudget", "ConfigMap", "Namespace", "Service"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_broken_manifest_is_refused() -> None:
    doc = by_kind("DaemonSet", "splitrelay-relay")
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["spec"]["template"]["spec"]["hostNetwrok"] = True  # a typo strict mode must catch
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_templates() -> None:
    listed = set(yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert listed == present


# --- policy: checkov and our own rules ---------------------------------------------------

def _mutated(change) -> str:
    docs = [d for _, d in base_documents() if d["kind"] != "Secret"]
    change(find(docs, "DaemonSet", "splitrelay-relay")["spec"]["template"]["spec"]["containers"][0])
    return yaml.safe_dump_all(docs)


def _bpffs_bidirectional(c: dict) -> None:
    next(m for m in c["volumeMounts"] if m["mountPath"] == "/sys/fs/bpf")["mountPropagation"] = "Bidirectional"


def base_text() -> str:
    return "---\n".join(p.read_text() for p in sorted(BASE.glob("*.yaml"))
                        if p.name not in ("kustomization.yaml", "secrets.example.yaml"))


# What the policy checks see: the base, both overlays rendered, and the base
# with one rule broken each (the checks must catch those).
VARIANTS = {
    "base": base_text,
    **{o: functools.partial(rendered_text, o) for o in OVERLAYS},
    "privileged": lambda: _mutated(lambda c: c["securityContext"].update(privileged=True)),
    "bidirectional": lambda: _mutated(_bpffs_bidirectional),
    "sys-admin": lambda: _mutated(lambda c: c["securityContext"]["capabilities"]["add"].append("SYS_ADMIN")),
}


@functools.cache
def checkov_results() -> dict[str, tuple[list[tuple[str, str]], list[dict]]]:
    """checkov's failed checks (id, resource) and skipped ones for each
    variant, in one run (it takes seconds to start); offline
    (--skip-download: no platform look-ups)."""
    with tempfile.TemporaryDirectory() as d:
        for name, text in VARIANTS.items():
            (Path(d) / f"{name}.yaml").write_text(text())
        proc = subprocess.run([str(CHECKOV), "-d", d, "--framework", "kubernetes", "--skip-download",
                               "-o", "json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    results = json.loads(proc.stdout)["results"]
    assert not results.get("parsing_errors"), results["parsing_errors"]
    out: dict = {name: ([], []) for name in VARIANTS}
    for c in results.get("failed_checks", []):
        out[Path(c["file_abs_path"]).stem][0].append((c["check_id"], c["resource"]))
    for c in results.get("skipped_checks", []):
        out[Path(c["file_abs_path"]).stem][1].append(c)
    return out


def own_findings(docs: list[dict]) -> list[str]:
    """What checkov does not check, or checks only in part."""
    out = []
    for where, spec in pod_specs(docs):
        if spec.get("hostPID") or spec.get("hostIPC"):
            out.append(f"{where}: hostPID/hostIPC")
        if spec.get("hostNetwork") and where != "DaemonSet/splitrelay-relay":
            out.append(f"{where}: hostNetwork (only the relay needs it)")
        for c in containers(spec):
            sc = c.get("securityContext", {})
            if sc.get("privileged"):
                out.append(f"{where}/{c['name']}: privileged")
            if sc.get("allowPrivilegeEscalation") is not False:
                out.append(f"{where}/{c['name']}: allowPrivilegeEscalation not false")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                out.append(f"{where}/{c['name']}: capabilities not dropped")
            added = set(sc.get("capabilities", {}).get("add", []))
            if added - {"BPF", "PERFMON", "NET_ADMIN", "NET_RAW"}:
                out.append(f"{where}/{c['name']}: capabilities {sorted(added)}")
            for m in c.get("volumeMounts", []):
                if m.get("mountPropagation", "None") != "None":
                    out.append(f"{where}/{c['name']}: {m['mountPath']} mountPropagation {m['mountPropagation']}")
            res = c.get("resources", {})
            if "cpu" not in res.get("requests", {}) or "memory" not in res.get("limits", {}):
                out.append(f"{where}/{c['name']}: no CPU request or memory limit")
    return out


def policy_findings(variant: str) -> list[str]:
    failed, skipped = checkov_results()[variant]
    out = [f"checkov {cid} on {res}" for cid, res in failed]
    out += [f"checkov skip of {s['check_id']} without a reason" for s in skipped
            if len(s["check_result"].get("suppress_comment") or "") < 10]
    return out + own_findings([d for d in yaml.safe_load_all(VARIANTS[variant]()) if d])


@pytest.mark.parametrize("variant", ["base", *OVERLAYS])
def test_the_manifests_pass_the_policy_checks(variant: str) -> None:
    assert policy_findings(variant) == []


def test_the_policy_checks_refuse_privileged_mount_propagation_and_sys_admin() -> None:
    """The checks above hold the rules: a privileged relay, its bpffs mounted
    with propagation (which the API server refuses unprivileged), or
    SYS_ADMIN added, fails."""
    relay = "DaemonSet.splitrelay.splitrelay-relay"
    assert f"checkov CKV_K8S_16 on {relay}" in policy_findings("privileged")
    assert "DaemonSet/splitrelay-relay/relayd: privileged" in policy_findings("privileged")
    assert policy_findings("bidirectional") == [
        "DaemonSet/splitrelay-relay/relayd: /sys/fs/bpf mountPropagation Bidirectional"]
    assert f"checkov CKV_K8S_39 on {relay}" in policy_findings("sys-admin")
    assert "DaemonSet/splitrelay-relay/relayd: capabilities ['BPF', 'NET_ADMIN', 'NET_RAW', 'PERFMON', 'SYS_ADMIN']" \
        in policy_findings("sys-admin")


def test_accepted_findings_are_skipped_with_reasons() -> None:
    skipped = {(s["check_id"], s["resource"]) for s in checkov_results()["base"][1]}
    assert ("CKV_K8S_19", "DaemonSet.splitrelay.splitrelay-relay") in skipped  # hostNetwork
    assert not any(cid == "CKV_K8S_16" for cid, _ in skipped)  # privileged is never skipped


# --- what the relay needs ------------------------------------------------------------------

def test_the_relay_daemonset_has_what_relayd_needs() -> None:
    spec = by_kind("DaemonSet", "splitrelay-relay")["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    (c,) = spec["containers"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    bpffs = mounts["/sys/fs/bpf"]
    assert volumes[bpffs["name"]]["hostPath"]["path"] == "/sys/fs/bpf"  # pins outlive the pod
    assert "mountPropagation" not in bpffs
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert set(c["securityContext"]["capabilities"]["add"]) == {"BPF", "PERFMON", "NET_ADMIN", "NET_RAW"}
    ports = {p["name"]: p for p in c["ports"]}
    assert ports["media"]["protocol"] == "UDP"
    for name in ("hint-key", "pki"):
        assert volumes[name]["secret"]["defaultMode"] == 0o400  # relayd refuses secrets others can read
    assert volumes["redis"]["projected"]["defaultMode"] == 0o400



def test_the_systemd_unit_grants_relayd_what_the_daemonset_grants() -> None:
    """One set of capabilities for relayd wherever it runs: the unit's
    bounding and ambient sets name the DaemonSet's, and nothing more."""
    (c,) = by_kind("DaemonSet", "splitrelay-relay")["spec"]["template"]["spec"]["containers"]
    granted = {f"CAP_{cap}" for cap in c["securityContext"]["capabilities"]["add"]}
    unit = (REPO / "docs" / "splitrelay-relayd.service").read_text().splitlines()
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        (line,) = [ln for ln in unit if ln.startswith(key + "=")]
        assert set(line.split("=", 1)[1].split()) == granted, key

def test_images_are_what_make_image_tags() -> None:
    for where, spec in pod_specs([d for _, d in base_documents()]):
        for c in containers(spec):
            if "redis" not in where:
                assert c["image"] == IMAGE, (where, c["name"])
    prod = {c["image"] for _, s in pod_specs(rendered("production")) for c in containers(s)}
    assert prod == {"registry.example.com/splitrelay:" + IMAGE.rsplit(":", 1)[1], "redis:7.0"}


def test_the_transceiver_runs_as_the_images_user_with_no_privilege() -> None:
    spec = by_kind("Deployment", "splitrelay-transceiver")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    for c in containers(spec):
        assert "add" not in c["securityContext"]["capabilities"]
    (c,) = spec["containers"]
    assert c["command"] == ["splitrelay-transceiver"]


def _pre_stop_delay(container: dict) -> float:
    """Seconds a preStop hook holds the SIGTERM back: a `sleep N`, or none."""
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    command = hook.get("exec", {}).get("command", [])
    assert len(command) == 2 and command[0] == "sleep", f"a preStop of unknown length: {hook}"
    return float(command[1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_periods_hold_the_drains(overlay: str) -> None:
    """Kubernetes kills at the grace period, counted from the preStop hook:
    the transceiver's SIGTERM drain (its deadline, then relayd's hang-ups of
    what could not move) and relayd's graceful stop must both fit."""
    from manager.transceiver.drain import GRACE
    from manager.transceiver.service import TransceiverConfig

    docs = rendered(overlay)
    tx = find(docs, "Deployment", "splitrelay-transceiver")["spec"]["template"]["spec"]
    (c,) = tx["containers"]
    given = [a.split("=", 1)[1] for a in c.get("args", []) if a.startswith("--drain-deadline=")]
    deadline = float(given[-1]) if given else TransceiverConfig(id=1).drain_deadline
    needed = _pre_stop_delay(c) + deadline + GRACE
    assert tx["terminationGracePeriodSeconds"] > needed, (tx["terminationGracePeriodSeconds"], needed)
    relay = find(docs, "DaemonSet", "splitrelay-relay")["spec"]["template"]["spec"]
    toml = find(docs, "ConfigMap", "splitrelay-relayd")["data"]["relayd.toml"]
    stop = SignalingConfig.model_validate(tomllib.loads(toml).get("signaling", {})).stop_deadline
    (r,) = relay["containers"]
    assert relay["terminationGracePeriodSeconds"] > _pre_stop_delay(r) + stop, (relay, stop)


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


def test_the_flow_pool_is_outside_the_ephemeral_and_nodeport_ranges() -> None:
    cfg = tomllib.loads(by_kind("ConfigMap", "splitrelay-relayd")["data"]["relayd.toml"])["datapath"]
    flow = (cfg["flow_port_min"], cfg["flow_port_max"])
    check_flow_ports(flow, LINUX_EPHEMERAL, [])
    check_flow_ports(flow, NODE_PORTS, [])  # the same overlap rule, against kube-proxy's ports


def test_redis_is_tls_only_behind_a_network_policy() -> None:
    registry = tomllib.loads(by_kind("ConfigMap", "splitrelay-relayd")["data"]["relayd.toml"])["registry"]
    assert registry["url"].startswith("rediss://") and registry["tls_ca_file"]
    redis = by_kind("StatefulSet", "splitrelay-redis")["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(redis["command"])
    assert "--port 0 --tls-port 6379" in command  # no plain-text port at all
    policy = by_kind("NetworkPolicy", "splitrelay-redis")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "splitrelay-redis"}
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"} and policy["egress"] == []
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}] and "ipBlock" in rule["from"][0]
    deny = by_kind("NetworkPolicy", "splitrelay-default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}


def test_disruption_budgets_cover_the_relays_and_transceivers() -> None:
    workloads = {"splitrelay-relay": by_kind("DaemonSet", "splitrelay-relay"),
                 "splitrelay-transceiver": by_kind("Deployment", "splitrelay-transceiver")}
    for name, workload in workloads.items():
        pdb = by_kind("PodDisruptionBudget", name)["spec"]
        assert pdb["maxUnavailable"] == 1
        assert pdb["selector"]["matchLabels"] == workload["spec"]["template"]["metadata"]["labels"]


def test_secrets_in_the_repository_are_placeholders() -> None:
    secrets = [d for _, d in base_documents() if d["kind"] == "Secret"]
    assert {s["metadata"]["name"] for s in secrets} >= {"splitrelay-redis", "splitrelay-redis-tls"}
    for doc in secrets:
        assert all("REPLACE" in v for v in doc["stringData"].values()), doc["metadata"]["name"]
