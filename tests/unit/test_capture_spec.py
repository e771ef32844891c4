"""The CRDs (schema + CEL rules, as the API server applies them) and the agent's own
validation (capture/spec.py) agree on every example: valid ones pass both, invalid
ones fail both."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from capture import spec as spec_mod
from capture.spec import SpecError
from tests.crd_schema import CRDS, api_errors, crd

POD = {"podSelector": {"matchLabels": {"app": "web"}}}


def obj(kind="Capture", **spec):
    spec.setdefault("target", POD)
    spec.setdefault("duration", "30s")
    meta = {"name": "web-debug"} if kind == "ClusterCapture" else {"name": "web-debug", "namespace": "shop"}
    return {"apiVersion": "fovea.dev/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}


def cluster(**spec):
    spec.setdefault("target", {"namespaceSelector": {}})
    return obj("ClusterCapture", **spec)


S3 = {"endpoint": "https://s3.example.com", "bucket": "caps", "prefix": "p/", "region": "eu", "secretRef": {"name": "s3"}}

VALID = {
    "minimal": obj(),
    "pod names": obj(target={"podNames": ["web-7d9c-abcde", "web-2"]}),
    "match expressions": obj(target={"podSelector": {"matchExpressions": [
        {"key": "app", "operator": "In", "values": ["web", "api"]}, {"key": "canary", "operator": "DoesNotExist"}]}}),
    "everything": obj(filter="tcp port 443", duration="1m30s", maxBytes="100Mi", maxPackets=1000, snapLength=96,
                      includeMetadata=False, output={"s3": S3}),
    "azure": obj(output={"azureBlob": {"secretRef": {"name": "blob-sas"}}}),
    "one hour": obj(duration="1h"),
    "millis": obj(duration="500ms"),
    "bytes as an integer": obj(maxBytes=1048576),
    "the byte cap": obj(maxBytes="1Gi"),
    "cluster: all namespaces": cluster(),
    "cluster: namespaces and pods": cluster(target={"namespaceSelector": {"matchLabels": {"team": "a"}},
                                                    "podSelector": {"matchLabels": {"app": "web"}}}),
    "cluster: node names": cluster(target={"nodeNames": ["node-a"]}),
    "cluster: node selector": cluster(target={"nodeSelector": {"matchLabels": {"pool": "edge"}}}),
}

INVALID = {
    "no target kind": obj(target={}),
    "both target kinds": obj(target={"podSelector": {}, "podNames": ["a"]}),
    "namespaced: namespaceSelector": obj(target={"namespaceSelector": {}}),
    "namespaced: node names": obj(target={"nodeNames": ["node-a"]}),
    "pod name with a namespace": obj(target={"podNames": ["other/cli-1"]}),
    "no duration": {**obj(), "spec": {"target": POD}},
    "duration zero": obj(duration="0s"),
    "duration over the cap": obj(duration="61m"),
    "duration without unit": obj(duration="30"),
    "duration words": obj(duration="soon"),
    "maxBytes over the cap": obj(maxBytes="2Gi"),
    "maxBytes integer over the cap": obj(maxBytes=(1 << 30) + 1),
    "maxBytes zero": obj(maxBytes=0),
    "maxBytes garbage": obj(maxBytes="lots"),
    "maxPackets zero": obj(maxPackets=0),
    "maxPackets over the cap": obj(maxPackets=10_000_001),
    "snapLength too small": obj(snapLength=10),
    "snapLength too big": obj(snapLength=262145),
    "filter too long": obj(filter="tcp or " * 200 + "udp"),
    "two outputs": obj(output={"hostPath": {}, "s3": S3}),
    "no output kind": obj(output={}),
    "hostPath with a path": obj(output={"hostPath": {"path": "/etc"}}),
    "s3 without secret": obj(output={"s3": {k: v for k, v in S3.items() if k != "secretRef"}}),
    "s3 endpoint not a URL": obj(output={"s3": {**S3, "endpoint": "file:///etc/passwd"}}),
    "unknown spec field": obj(command="rm -rf /"),
    "expression: In without values": obj(target={"podSelector": {"matchExpressions": [
        {"key": "app", "operator": "In"}]}}),
    "expression: Exists with values": obj(target={"podSelector": {"matchExpressions": [
        {"key": "app", "operator": "Exists", "values": ["x"]}]}}),
    "expression: bad operator": obj(target={"podSelector": {"matchExpressions": [{"key": "app", "operator": "Is"}]}}),
    "cluster: no target kind": cluster(target={}),
    "cluster: two target kinds": cluster(target={"namespaceSelector": {}, "nodeNames": ["a"]}),
    "cluster: podSelector alone": cluster(target={"podSelector": {}}),
    "cluster: podNames": cluster(target={"podNames": ["a"]}),
}


@pytest.mark.parametrize("name", VALID)
def test_valid_examples_pass_the_api_server_and_the_agent(name):
    o = copy.deepcopy(VALID[name])
    assert api_errors(o) == []
    spec_mod.parse(o)  # the stored (defaulted) object
    spec_mod.parse(VALID[name])  # and one from an API server that did not default


@pytest.mark.parametrize("name", INVALID)
def test_invalid_examples_fail_the_api_server_and_the_agent(name):
    o = copy.deepcopy(INVALID[name])
    assert api_errors(o), "the API server would accept it"
    with pytest.raises(SpecError):
        spec_mod.parse(o)


def test_every_cel_rule_is_exercised():
    """Each rule of each CRD fails for at least one invalid example (so each is tested)."""
    import tests.crd_schema as cs

    failed = set()
    for o in INVALID.values():
        o = copy.deepcopy(o)
        s = cs.kind_schema(o["kind"])
        cs.apply_defaults(s, o)
        failed |= {e.split(": ", 1)[1] for e in cs.cel_errors(s, o)}
    rules = set()

    def walk(s):
        rules.update(v["message"] for v in s.get("x-kubernetes-validations") or [])
        for sub in (s.get("properties") or {}).values():
            walk(sub)
        if isinstance(s.get("additionalProperties"), dict):
            walk(s["additionalProperties"])
        if "items" in s:
            walk(s["items"])

    for kind in ("Capture", "ClusterCapture"):
        walk(cs.kind_schema(kind))
    assert rules - failed == set()


def test_parsed_values():
    s = spec_mod.parse(VALID["everything"])
    assert (s.duration, s.max_bytes, s.max_packets, s.snap_length, s.include_metadata) == (90, 100 << 20, 1000, 96,
                                                                                          False)
    assert s.output.kind == "s3" and s.output.secret == "s3" and s.output.s3.endpoint == "https://s3.example.com"
    d = spec_mod.parse(VALID["minimal"])
    assert (d.max_bytes, d.max_packets, d.snap_length, d.include_metadata, d.output.kind) == (
        100 << 20, 0, 262144, True, "hostPath")
    sel = spec_mod.parse(VALID["match expressions"]).target.pod_selector
    assert sel.to_query() == "app in (web,api),!canary"


def test_the_limits_in_spec_py_are_the_crds():
    props = crd("captures")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert props["filter"]["maxLength"] == spec_mod.MAX_FILTER
    assert props["maxPackets"]["maximum"] == spec_mod.MAX_PACKETS
    assert (props["snapLength"]["minimum"], props["snapLength"]["maximum"], props["snapLength"]["default"]) == (
        spec_mod.MIN_SNAP, spec_mod.MAX_SNAP, spec_mod.DEFAULT_SNAP)
    assert props["target"]["properties"]["podNames"]["maxItems"] == spec_mod.MAX_POD_NAMES


def test_both_crds_share_everything_but_the_target():
    a = crd("captures")["spec"]["versions"][0]
    b = crd("clustercaptures")["spec"]["versions"][0]
    sa, sb = (v["schema"]["openAPIV3Schema"] for v in (a, b))
    for s in (sa, sb):
        del s["properties"]["spec"]["properties"]["target"]
        for ref in ("s3", "azureBlob"):  # the description names where the Secret is read
            del s["properties"]["spec"]["properties"]["output"]["properties"][ref]["properties"]["secretRef"][
                "description"]
    assert sa == sb and a["additionalPrinterColumns"] == b["additionalPrinterColumns"]
    assert [c["name"] for c in a["additionalPrinterColumns"] if not c.get("priority")] == [
        "Phase", "Nodes", "Packets", "Age"]
    assert a["subresources"] == {"status": {}}


def test_bad_filter_is_named():
    def check(expr):
        raise ValueError("syntax error in filter expression")

    with pytest.raises(SpecError, match=r"spec.filter 'tcp prot 80' does not compile: syntax error"):
        spec_mod.parse(obj(filter="tcp prot 80"), check_filter=check)


def test_crd_files_pass_kubernetes_validate():
    files = sorted(str(p) for p in CRDS.glob("*.yaml"))
    assert len(files) == 2
    r = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", *files], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
