"""The Helm chart with the real Helm engine (helm-python-sdk): lint, render with
defaults and with every option on, every object valid for a current Kubernetes,
RBAC exactly the declaration, the config a valid agent config, and every file
generated from one source up to date (deploy/daemonset.yaml included)."""

from __future__ import annotations

import copy
import importlib.util
import json
import re

import helm_python
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from agent import config as agent_config
from agent.k8s.access import agent_access, cluster_role_rules
from agent.plugins import REGISTRY
from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("manifests", REPO / "scripts" / "manifests.py")
manifests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(manifests)

CHART = REPO / "deploy" / "helm" / "fovea"
KUBE = latest_version()
ALL_ON = {
    "metrics": {"tls": {"enabled": True, "secretName": "fovea-tls"},
                "auth": {"enabled": True, "readers": [{"kind": "ServiceAccount", "name": "prometheus",
                                                       "namespace": "monitoring"}]}},
    "config": {"podLevel": {"allPods": True}, "interval": 10},
    "extraEnv": [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector.monitoring:4317"}],
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}, "tlsConfig": {"insecureSkipVerify": True}},
    "podMonitor": {"enabled": True, "bearerTokenSecret": {"name": "prometheus-token"}},
    "prometheusRule": {"enabled": True},
    "dashboards": {"enabled": True, "namespace": "grafana"},
    "privileged": True,
}
DEFAULT = manifests.render()
EVERYTHING = manifests.render(ALL_ON)


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("values", [{}, ALL_ON], ids=["defaults", "all-on"])
def test_lint_has_no_errors_or_warnings(values):
    report = helm_python.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE}.0")
    assert not report["errors"] and all(m["severity"] < 2 for m in report["messages"]), report


def test_schema_refuses_unknown_keys_and_wrong_types():
    with helm_python.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm_python.HelmValuesError, match="serviceMonitr"):
            chart.render({"serviceMonitr": {"enabled": True}}, name="fovea", namespace="fovea-system")
        with pytest.raises(helm_python.HelmValuesError, match="port"):
            chart.render({"metrics": {"port": "9810"}}, name="fovea", namespace="fovea-system")


CRDS = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "deploy" / "crds").glob("*.yaml"))]


@pytest.mark.parametrize("doc", [d for d in DEFAULT + EVERYTHING + CRDS if "monitoring.coreos.com" not in d["apiVersion"]],
                         ids=lambda d: d["kind"] + "/" + d["metadata"]["name"])
def test_builtin_objects_are_valid(doc):
    kubernetes_validate.validate(doc, KUBE, strict=True)


def test_generated_files_are_up_to_date():
    """deploy/daemonset.yaml is the default render, the chart's access rules the declaration,
    docs/values.md the schema."""
    for path, text in manifests.generated().items():
        want = manifests.plain_manifests() if text is None else text
        assert path.is_file() and path.read_text() == want, f"{path.relative_to(REPO)}: run `make manifests`"


def test_chart_ships_the_one_copy_of_crds_dashboards_and_rules():
    """Symbolic links, so that the chart can never drift from deploy/crds, dashboards/ and deploy/alerts."""
    with helm_python.Chart.load(str(CHART)) as chart:
        crds = {c["filename"] if "filename" in c else c["name"]: c["data"] for c in chart.crds}
    shipped = {f"crds/{p.name}": p.read_text() for p in sorted((REPO / "deploy" / "crds").glob("*.yaml"))}
    assert {k.split("/")[-1]: v for k, v in crds.items()} == {k.split("/")[-1]: v for k, v in shipped.items()}
    assert (CHART / "files" / "dashboards").resolve() == (REPO / "dashboards").resolve()
    assert (CHART / "files" / "fovea-rules.yaml").resolve() == (REPO / "deploy" / "alerts" / "fovea-rules.yaml").resolve()


@pytest.mark.parametrize("values,auth", [({}, False), (ALL_ON, True)], ids=["defaults", "metrics-auth"])
def test_cluster_role_is_exactly_the_declaration(values, auth):
    docs = manifests.render(values)
    role = next(d for d in of_kind(docs, "ClusterRole") if d["metadata"]["name"] == "fovea")
    assert role["rules"] == cluster_role_rules(agent_access(metrics_auth=auth))
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"]


def test_config_map_is_a_valid_agent_config(tmp_path):
    for docs, auth in ((DEFAULT, False), (EVERYTHING, True)):
        path = tmp_path / "config.yaml"
        path.write_text(of_kind(docs, "ConfigMap")[0]["data"]["config.yaml"])
        cfg = agent_config.load(str(path)).validate(REGISTRY)
        assert cfg.port == 9810 and cfg.metricsAuth.enabled is auth and bool(cfg.tls.certFile) is auth
    ds = of_kind(EVERYTHING, "DaemonSet")[0]["spec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in ds["containers"][0]["volumeMounts"]}
    assert cfg.tls.certFile.rsplit("/", 1)[0] in mounts  # the agent reads the certificate where the Secret is


def test_daemonset_runs_on_every_node_with_the_documented_capabilities():
    ds = of_kind(DEFAULT, "DaemonSet")[0]
    spec = ds["spec"]["template"]["spec"]
    agent = spec["containers"][0]
    assert spec["hostNetwork"] and spec["hostPID"] and spec["tolerations"] == [{"operator": "Exists"}]
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert ds["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "fovea"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent["env"]}
    assert env == {"NODE_NAME": "spec.nodeName", "POD_NAMESPACE": "metadata.namespace"}
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    sc = agent["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"]["drop"] == ["ALL"]
    security = (REPO / "docs" / "security.md").read_text()
    for cap in sc["capabilities"]["add"]:
        assert f"`CAP_{cap}`" in security, f"docs/security.md does not say why the agent needs CAP_{cap}"
    host_paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert host_paths == {"/sys/fs/bpf", "/sys/kernel/tracing", "/sys/kernel/btf", "/lib/modules", "/usr/src",
                          "/run/netns", "/var/lib/fovea/captures", "/var/cache/fovea/programs"}
    # Compiled programs outlive the pod (kernel.cacheDir's programs/); prepared headers do not.
    assert {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}["programs"] == agent_config.Config().kernel.cacheDir + "/programs"
    # The host's header directories never cover the image's own (agent/kernel/headers.py).
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert (mounts["modules"], mounts["usr-src"]) == ("/host/lib/modules", "/host/usr/src")
    assert not any(p.startswith(("/usr/share/fovea", "/opt/fovea")) for p in mounts.values())
    privileged = of_kind(EVERYTHING, "DaemonSet")[0]["spec"]["template"]["spec"]["containers"][0]
    assert privileged["securityContext"] == {"privileged": True}
    assert privileged["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_uninstall_runs_cleanup_on_every_node_with_what_it_needs():
    """A pre-delete hook Job: the agent's image runs `fovea cleanup`, one pod per node, in the node's
    network namespace with the host's bpffs and the capabilities docs/security.md names."""
    (job,) = of_kind(DEFAULT, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    assert "hook-succeeded" in job["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    ds = of_kind(DEFAULT, "DaemonSet")[0]["spec"]
    pod = job["spec"]["template"]
    spec, (container,) = pod["spec"], pod["spec"]["containers"]
    assert container["image"] == ds["template"]["spec"]["containers"][0]["image"] and container["args"] == ["cleanup"]
    assert spec["hostNetwork"] is True
    assert spec["tolerations"] == ds["template"]["spec"]["tolerations"]
    assert spec["nodeSelector"] == ds["template"]["spec"]["nodeSelector"]
    volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    assert volumes == {"bpffs": "/sys/fs/bpf", "programs": "/var/cache/fovea/programs"}  # pins, compiled programs
    assert container["volumeMounts"] == [{"name": "bpffs", "mountPath": "/sys/fs/bpf"},
                                         {"name": "programs", "mountPath": "/var/cache/fovea/programs"}]
    sc = container["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == {"BPF", "SYS_ADMIN", "NET_ADMIN"}
    security = (REPO / "docs" / "security.md").read_text()
    assert all(f"`CAP_{cap}`" in security for cap in sc["capabilities"]["add"])
    # One pod per node: never two on one node, never one the agents' selectors pick up.
    (term,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert not ds["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # Rendered without a cluster the node count is unknown: one pod.
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1
    # The agents keep their programs for the next one; the plain manifests carry no hook.
    config = yaml.safe_load(of_kind(DEFAULT, "ConfigMap")[0]["data"]["config.yaml"])
    assert config["lifecycle"]["keepAttached"] is True
    assert not of_kind(manifests.render({"cleanupOnUninstall": False}), "Job")
    assert "kind: Job" not in manifests.plain_manifests()


def test_monitors_keep_pod_labels_and_name_the_node():
    for kind, key in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        (monitor,) = of_kind(EVERYTHING, kind)
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "fovea"
        (endpoint,) = monitor["spec"][key]
        assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True and endpoint["scheme"] == "https"
        assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"} in endpoint["relabelings"]
    (service,) = of_kind(EVERYTHING, "Service")
    assert service["spec"]["ports"][0]["name"] == "metrics"
    assert of_kind(EVERYTHING, "ServiceMonitor")[0]["metadata"]["labels"]["release"] == "prometheus"
    assert not of_kind(DEFAULT, "ServiceMonitor") and not of_kind(DEFAULT, "PrometheusRule")


def test_prometheus_rule_is_the_rule_file():
    (rule,) = of_kind(EVERYTHING, "PrometheusRule")
    source = yaml.safe_load((REPO / "deploy" / "alerts" / "fovea-rules.yaml").read_text())
    assert rule["spec"] == source and rule["spec"]["groups"]
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
            assert r["expr"] and ("alert" in r) != ("record" in r)


def test_dashboards_are_config_maps_for_the_grafana_sidecar():
    maps = [d for d in of_kind(EVERYTHING, "ConfigMap") if "-dashboard-" in d["metadata"]["name"]]
    shipped = sorted(p.name for p in (REPO / "dashboards").glob("*.json"))
    assert sorted(k for m in maps for k in m["data"]) == shipped
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1" and m["metadata"]["namespace"] == "grafana"
        (name, text), = m["data"].items()
        assert json.loads(text) == json.loads((REPO / "dashboards" / name).read_text())


def fovea_examples() -> list[tuple[str, dict]]:
    """Fovea objects shown to users: YAML files under deploy/ and YAML blocks in the docs."""
    found = []
    texts = [(p, p.read_text()) for p in sorted(REPO.glob("deploy/**/*.yaml")) if "helm" not in p.parts]
    for p in sorted([*REPO.glob("docs/*.md"), REPO / "README.md"]):
        texts += [(p, block) for block in re.findall(r"```yaml\n(.*?)```", p.read_text(), re.S)]
    for path, text in texts:
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError:
            continue  # a fragment, not an object
        found += [(str(path.relative_to(REPO)), d) for d in docs
                  if isinstance(d, dict) and str(d.get("apiVersion", "")).startswith("fovea.dev/")]
    return found


def test_fovea_custom_objects_match_the_crd_schemas():
    """Every Fovea object shown to users is accepted by its CRD's schema and CEL rules, as the
    API server would (tests/crd_schema.py)."""
    from tests.crd_schema import api_errors

    kinds = {crd["spec"]["names"]["kind"] for crd in CRDS}
    examples = fovea_examples()
    assert examples, "docs show no Capture"
    for where, doc in examples:
        assert doc["kind"] in kinds, f"{where}: no CRD for {doc['apiVersion']} {doc['kind']}"
        assert api_errors(copy.deepcopy(doc)) == [], where
