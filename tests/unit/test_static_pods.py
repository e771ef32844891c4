"""Standalone pods from a YAML file."""

from __future__ import annotations

import pytest

from agent.errors import FoveaError
from agent.k8s.static import StaticPods


def test_entries_with_several_ips_make_one_pod(tmp_path):
    f = tmp_path / "pods.yaml"
    f.write_text(
        "pods:\n"
        "  - {ip: 10.1.1.2, namespace: shop, pod: web-1, workloadKind: Deployment, workloadName: web, observe: true}\n"
        "  - {ip: 'fd00::2', namespace: shop, pod: web-1, workloadKind: Deployment, workloadName: web, observe: true}\n"
        "  - {ip: 10.1.2.2, namespace: shop, pod: db-0}\n"
    )
    pods = StaticPods.load(str(f))
    web = pods.pod_by_ip("fd00::2")
    assert web is pods.pod_by_ip("10.1.1.2")
    assert (web.ips, web.workload_kind, web.workload_name, web.observe) == (("10.1.1.2", "fd00::2"), "Deployment", "web", True)
    db = pods.pod_by_ip("10.1.2.2")
    assert (db.workload_kind, db.workload_name, pods.pod_observed(db)) == ("Pod", "db-0", False)
    assert len(pods.local_pods()) == 2 and pods.synced


@pytest.mark.parametrize("text, message", [
    ("pods: {}\n", "needs a list under 'pods'"),
    ("pods:\n  - {ip: 10.0.0.1, pod: x}\n", "pods[0] must have ip, namespace, pod"),
    ("pods:\n  - {ip: nope, namespace: a, pod: x}\n", "pods[0]: 'nope' is not an IP address"),
    ("pods:\n  - {ip: 10.0.0.1, namespace: a, pod: x, color: red}\n", "pods[0] must have"),
    ("pods: [\n", "is not valid YAML"),
])
def test_bad_files_name_the_entry(tmp_path, text, message):
    f = tmp_path / "pods.yaml"
    f.write_text(text)
    with pytest.raises(FoveaError) as exc:
        StaticPods.load(str(f))
    assert message in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(FoveaError) as exc:
        StaticPods.load(str(tmp_path / "none.yaml"))
    assert "cannot read static pods file" in str(exc.value)
