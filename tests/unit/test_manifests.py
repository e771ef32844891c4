"""deploy/daemonset.yaml: every object valid for a current Kubernetes."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

DOCS = list(yaml.safe_load_all((REPO / "deploy" / "daemonset.yaml").read_text()))


@pytest.mark.parametrize("doc", DOCS, ids=[d["kind"] for d in DOCS])
def test_object_is_valid(doc):
    kubernetes_validate.validate(doc, "1.31", strict=True)


def test_agent_runs_with_the_api_and_its_own_service_account():
    ds = next(d for d in DOCS if d["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "fovea" and spec["hostNetwork"] and spec["hostPID"]
    container = spec["containers"][0]
    assert "--standalone" not in container["args"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in container["env"]
    assert ds["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "fovea"
