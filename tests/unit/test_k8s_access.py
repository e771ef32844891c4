import yaml

from agent.k8s.access import AGENT_ACCESS, cluster_role_rules
from tests.conftest import REPO


def test_daemonset_cluster_role_is_the_declaration():
    docs = list(yaml.safe_load_all((REPO / "deploy" / "daemonset.yaml").read_text()))
    role = next(d for d in docs if d and d["kind"] == "ClusterRole")
    assert role["rules"] == cluster_role_rules()


def test_declaration_is_least_privilege():
    for a in AGENT_ACCESS:
        assert "*" not in a.verbs and a.resource != "*" and a.group != "*"
        if a.resource == "secrets":
            assert a.verbs == ("get",), "Secrets are read by name only"


def test_token_reviews_only_with_metrics_auth():
    from agent.k8s.access import agent_access

    reviews = {"tokenreviews", "subjectaccessreviews"}
    assert not reviews & {a.resource for a in agent_access()}
    assert {(a.resource, a.verbs) for a in agent_access(metrics_auth=True) if a.resource in reviews} == {
        ("tokenreviews", ("create",)), ("subjectaccessreviews", ("create",))}
