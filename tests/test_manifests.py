"""deploy/kubernetes/: valid for the Kubernetes versions the README names (kubernetes-validate,
offline, strict), and consistent: what each object references exists and agrees with the
image, the policy file and monitoring/."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import ValidationError

from watchdog.alerts.health import HEALTHZ, READYZ
from watchdog.config.policy import load_config

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "kubernetes"
# The README's "Kubernetes and containers" section names the same range.
VERSIONS = ["1.30", "1.31", "1.32", "1.33", "1.34", "1.35", "1.36", "1.37"]
# Custom resources of the Prometheus Operator: kubernetes-validate has no schema for them.
OPERATOR = "monitoring.coreos.com/v1"
Doc = dict[str, Any]


def documents() -> dict[str, Doc]:
    """Every object of the kustomization, by kind (one of each)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: dict[str, Doc] = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            assert doc["kind"] not in docs, f"two {doc['kind']} objects"
            docs[doc["kind"]] = doc
    return docs


DOCS = documents()
POD = DOCS["StatefulSet"]["spec"]["template"]["spec"]
WATCHDOG = next(c for c in POD["containers"] if c["name"] == "pg-watchdog")
RELOADER = next(c for c in POD["containers"] if c["name"] == "reloader")


def mount(container: Doc, volume: str) -> str:
    (path,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
    return str(path)


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_pass_kubernetes_validate(version: str) -> None:
    for kind, doc in DOCS.items():
        if doc["apiVersion"] == OPERATOR:
            continue
        assert kubernetes_validate.validate(doc, version, strict=True) == version, kind


def test_validation_is_strict_enough_to_catch_a_typo() -> None:
    doc = copy.deepcopy(DOCS["StatefulSet"])
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)
    doc = copy.deepcopy(DOCS["StatefulSet"])
    doc["spec"]["replicas"] = "2"
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)


def test_operator_resources_have_the_fields_the_operator_reads() -> None:
    monitor, rule = DOCS["ServiceMonitor"], DOCS["PrometheusRule"]
    assert monitor["apiVersion"] == rule["apiVersion"] == OPERATOR
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    assert set(rule["spec"]) == {"groups"}


def test_prometheusrule_is_the_shipped_rule_file() -> None:
    shipped = yaml.safe_load((REPO / "monitoring" / "pg-watchdog.rules.yml").read_text())
    assert DOCS["PrometheusRule"]["spec"]["groups"] == shipped["groups"], (
        "run deploy/kubernetes/sync-rules"
    )


def policy_file(tmp_path: Path) -> tuple[str, Path]:
    """The ConfigMap's policy file, the path pg-watchdog reads it from, and a copy on disk."""
    config_map = DOCS["ConfigMap"]
    volume = next(v for v in POD["volumes"] if v["name"] == "policies")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    args = WATCHDOG["args"]
    path = args[args.index("-c") + 1]
    directory, _, key = path.rpartition("/")
    assert directory == mount(WATCHDOG, "policies")
    assert key in config_map["data"]
    copy_ = tmp_path / key
    copy_.write_text(config_map["data"][key])
    return path, copy_


def test_configmap_holds_a_valid_policy_file_at_the_path_both_containers_use(
    tmp_path: Path,
) -> None:
    path, local = policy_file(tmp_path)
    config = load_config(str(local))  # strict validation, as at start
    assert WATCHDOG["args"][0] == "run"
    assert RELOADER["command"][-1] == path
    assert mount(RELOADER, "policies") == mount(WATCHDOG, "policies")
    assert config.dry_run, "the shipped ConfigMap starts in dry run"

    # The password file is the Secret's key, where the Secret is mounted.
    (target,) = config.targets
    secret = next(v for v in POD["volumes"] if v["name"] == "credentials")["secret"]
    (item,) = secret["items"]
    assert str(target.password_file) == f"{mount(WATCHDOG, 'credentials')}/{item['path']}"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in WATCHDOG["env"]}
    assert env["SENTRY_DSN"]["name"] == secret["secretName"]
    # The README's command creates that Secret with those keys.
    readme = (REPO / "README.md").read_text()
    create = re.search(r"create secret generic (\S+)((?:\s+\\?\s*--from-\S+)+)", readme)
    assert create is not None and create.group(1) == secret["secretName"]
    assert f"--from-file={item['key']}=" in create.group(2)
    assert f"--from-literal={env['SENTRY_DSN']['key']}=" in create.group(2)

    # The audit log lives on the pod's claim.
    assert str(config.audit.path).startswith(mount(WATCHDOG, "audit") + "/")
    (claim,) = DOCS["StatefulSet"]["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "audit"

    # Metrics and probes on the port the policy file listens on.
    assert config.metrics is not None and config.metrics.host == "0.0.0.0"
    (port,) = WATCHDOG["ports"]
    assert port["containerPort"] == config.metrics.port and port["name"] == "metrics"
    assert WATCHDOG["livenessProbe"]["httpGet"] == {"path": HEALTHZ, "port": "metrics"}
    assert WATCHDOG["readinessProbe"]["httpGet"] == {"path": READYZ, "port": "metrics"}
    (service_port,) = DOCS["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == "metrics" == service_port["name"]
    assert DOCS["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == service_port["name"]


def test_selectors_match_the_pods() -> None:
    pod_labels = DOCS["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    for selector in (
        DOCS["StatefulSet"]["spec"]["selector"]["matchLabels"],
        DOCS["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        DOCS["Service"]["spec"]["selector"],
    ):
        assert selector.items() <= pod_labels.items()
    monitor = DOCS["ServiceMonitor"]["spec"]["selector"]["matchLabels"]
    assert monitor.items() <= DOCS["Service"]["metadata"]["labels"].items()
    assert DOCS["StatefulSet"]["spec"]["serviceName"] == DOCS["Service"]["metadata"]["name"]
    assert POD["serviceAccountName"] == DOCS["ServiceAccount"]["metadata"]["name"]


def test_pods_are_locked_down_and_match_the_image() -> None:
    containerfile = (REPO / "deploy" / "container" / "Containerfile").read_text()
    uid = int(re.search(r"ARG APP_UID=(\d+)", containerfile).group(1))  # type: ignore[union-attr]
    security = POD["securityContext"]
    assert security["runAsUser"] == security["fsGroup"] == uid
    assert security["runAsNonRoot"] and security["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in POD["containers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"]
        assert "limits" in container["resources"] and "requests" in container["resources"]
        assert container["image"] == WATCHDOG["image"]
    assert POD["shareProcessNamespace"], "the reloader signals pg-watchdog"
    assert POD["automountServiceAccountToken"] is False
    reloader = Path(RELOADER["command"][0])  # installed into the image's venv by assemble
    assert (REPO / "deploy" / "container" / reloader.name).exists()
    assert f"--extra /build/{reloader.name}" in containerfile
    assert str(reloader.parent) == "/opt/pg-watchdog/bin"
    # SIGTERM waits for the sweep in flight: at most its timeout (20 s) and 5 s more.
    assert POD["terminationGracePeriodSeconds"] >= 30
    assert DOCS["StatefulSet"]["spec"]["replicas"] == 2
    assert DOCS["PodDisruptionBudget"]["spec"]["minAvailable"] == 1
