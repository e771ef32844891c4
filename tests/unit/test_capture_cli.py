"""`fovea capture` / `kubectl fovea capture` against the API emulator (no root, no agent):
the objects the flags make, and API errors as one line a person can act on."""

from __future__ import annotations

import pytest

from agent.cli.kubectl import kubectl_main
from tests.crd_schema import api_errors, crd
from tests.k8s_emulator import K8sEmulator, make_namespace


@pytest.fixture
def api(tmp_path):
    api = K8sEmulator().start()
    for plural in ("captures", "clustercaptures"):
        api.register_crd(crd(plural), validate=api_errors)
    api.create(make_namespace("shop"))
    api.kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig", namespace="shop"))
    yield api
    api.stop()


def run(api, capsys, *argv):
    code = kubectl_main(["capture", *argv[:1], "--kubeconfig", api.kubeconfig, *argv[1:]])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_create_makes_the_capture_the_flags_say(api, capsys):
    code, out, err = run(api, capsys, "create", "web-debug", "--pod-selector", "app=web,tier=front",
                         "--duration", "30s", "--filter", "tcp port 80", "--max-bytes", "10Mi", "--max-packets",
                         "500", "--snap-length", "128", "--no-metadata")
    assert code == 0 and out == "capture.fovea.dev/web-debug created\n", err
    obj = api.get("captures", "web-debug", "shop")  # the context's namespace
    assert obj["spec"] == {"target": {"podSelector": {"matchLabels": {"app": "web", "tier": "front"}}},
                           "duration": "30s", "filter": "tcp port 80", "maxBytes": "10Mi", "maxPackets": 500,
                           "snapLength": 128, "includeMetadata": False, "output": {"hostPath": {}}}


def test_create_cluster_and_outputs(api, capsys):
    code, _, err = run(api, capsys, "create", "edge", "--cluster", "--node", "node-a", "--node", "node-b",
                       "--s3-endpoint", "https://s3.example.com", "--s3-bucket", "caps", "--s3-secret", "creds",
                       "--s3-prefix", "edge/")
    assert code == 0, err
    spec = api.get("clustercaptures", "edge")["spec"]
    assert spec["target"] == {"nodeNames": ["node-a", "node-b"]}
    assert spec["output"] == {"s3": {"endpoint": "https://s3.example.com", "bucket": "caps",
                                     "secretRef": {"name": "creds"}, "prefix": "edge/"}}
    assert spec["maxBytes"] == "100Mi" and spec["snapLength"] == 262144  # the CRD's defaults
    code, _, err = run(api, capsys, "create", "blob", "-n", "shop", "--pod", "web-1", "--azure-secret", "sas")
    assert code == 0, err
    assert api.get("captures", "blob", "shop")["spec"]["output"] == {"azureBlob": {"secretRef": {"name": "sas"}}}


@pytest.mark.parametrize("flags, says", [
    (["--pod-selector", "app=web", "--pod", "x"], "exactly one of --pod-selector and --pod"),
    (["--node", "node-a"], "--namespace-selector, --node and --node-selector need --cluster"),
    (["--pod", "x", "--duration", "2h"], "at most 1h"),
    (["--pod", "x", "--duration", "soon"], "spec.duration 'soon' is not a duration"),
    (["--pod", "x", "--max-bytes", "2Gi"], "at most 1Gi"),
    (["--pod", "other/x"], "is not an object name"),
    (["--pod-selector", "app"], "is not a label selector"),
])
def test_bad_flags_are_one_line_before_the_api(api, capsys, flags, says):
    api.clear_requests()
    code, _, err = run(api, capsys, "create", "c", *flags)
    assert code == 1 and says in err and err.count("\n") == 1, err
    assert not [r for r in api.requests if r.method == "POST"]


def test_api_errors_read_like_sentences(api, capsys):
    run(api, capsys, "create", "dup", "--pod", "web-1")
    code, _, err = run(api, capsys, "create", "dup", "--pod", "web-1")
    assert code == 1 and "already exists" in err and "pick another name" in err and err.count("\n") == 1

    code, _, err = run(api, capsys, "get", "nope")
    assert code == 1 and 'captures.fovea.dev "nope" not found' in err and "check the name" in err

    api.set_rbac([{"apiGroups": ["fovea.dev"], "resources": ["captures"], "verbs": ["get", "list"]}])
    code, _, err = run(api, capsys, "create", "denied", "--pod", "web-1")
    assert code == 1 and err.startswith("error: not allowed to create Capture shop/denied") and "Role" in err
    assert err.count("\n") == 1
    code, _, err = run(api, capsys, "delete", "dup")
    assert code == 1 and "not allowed to delete capture dup" in err


def test_the_api_server_rejects_what_the_plugin_let_through(api, capsys, tmp_path):
    """The plugin checks like the agent; an older plugin would meet the CRD's rules."""
    import kubernetes

    client = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(api.client_configuration()))
    bad = {"apiVersion": "fovea.dev/v1alpha1", "kind": "Capture", "metadata": {"name": "bad"},
           "spec": {"target": {"podNames": ["a"], "podSelector": {}}, "duration": "30s"}}
    with pytest.raises(kubernetes.client.exceptions.ApiException) as e:
        client.create_namespaced_custom_object("fovea.dev", "v1alpha1", "shop", "captures", bad)
    assert e.value.status == 422 and "exactly one of podSelector and podNames" in e.value.body
    from agent.cli.capture import _problem

    assert "the API server says the capture is invalid" in str(_problem(e.value, "create Capture shop/bad"))


def test_list_get_delete(api, capsys):
    run(api, capsys, "create", "one", "--pod", "web-1")
    api.patch("captures", "one", {"status": {"phase": "Succeeded", "nodesDone": "1/1", "packets": 42,
                                             "expectedNodes": ["node-a"],
                                             "nodes": {"node-a": {"phase": "Succeeded", "packets": 42}}}}, "shop")
    code, out, _ = run(api, capsys, "list")
    assert code == 0 and out.split("\n")[0].split() == ["NAME", "PHASE", "NODES", "PACKETS", "AGE"]
    assert out.split("\n")[1].split()[:4] == ["one", "Succeeded", "1/1", "42"]
    code, out, _ = run(api, capsys, "describe", "one")
    assert "Phase:      Succeeded" in out and "node-a: Succeeded  packets=42" in out
    code, out, _ = run(api, capsys, "delete", "one")
    assert code == 0 and api.get("captures", "one", "shop") is None
    code, out, _ = run(api, capsys, "list")
    assert out == "No captures found in shop\n"


def test_kubeconfig_context(api, capsys, tmp_path):
    import yaml

    doc = yaml.safe_load(open(api.kubeconfig))
    doc["contexts"].append({"name": "other", "context": {"cluster": "emulator", "user": "emulator",
                                                          "namespace": "default"}})
    open(api.kubeconfig, "w").write(yaml.safe_dump(doc))
    api.create(make_namespace("default"))
    code, _, err = run(api, capsys, "create", "ctx", "--context", "other", "--pod", "web-1")
    assert code == 0, err
    assert api.get("captures", "ctx", "default") is not None
    code, _, err = run(api, capsys, "list", "--context", "missing")
    assert code == 1 and "cannot use kubeconfig" in err
    code, _, err = kubectl_main(["capture", "list", "--kubeconfig", str(tmp_path / "none")]), None, None
    assert code == 1 and "does not exist" in capsys.readouterr().err


def test_fovea_capture_is_the_same_command(api, capsys):
    from agent.cli.fovea import main

    assert main(["capture", "create", "same", "--kubeconfig", api.kubeconfig, "--pod", "web-1"]) == 0
    assert api.get("captures", "same", "shop")["spec"]["target"] == {"podNames": ["web-1"]}
    assert main(["capture", "get", "nope", "--kubeconfig", api.kubeconfig]) == 1
    assert "not found" in capsys.readouterr().err
