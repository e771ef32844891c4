"""The alert rule file: promtool accepts it, a promtool unit test fires each alert,
and each alert links a runbook section that exists."""

from __future__ import annotations

import re
import subprocess

import yaml

from tests.conftest import REPO, promtool, require

RULES = REPO / "deploy" / "alerts" / "fovea-rules.yaml"
UNIT = REPO / "tests" / "alerts" / "fovea-rules.test.yaml"
ALERTS = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def run_promtool(*args) -> None:
    tool = promtool()
    require(tool is not None, "promtool (Debian package prometheus) is not installed")
    result = subprocess.run([tool, *args], capture_output=True, text=True, cwd=UNIT.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_rules():
    run_promtool("check", "rules", str(RULES))


def test_promtool_unit_tests_pass():
    run_promtool("test", "rules", str(UNIT))


def test_every_alert_has_a_unit_test_that_expects_it_to_fire():
    tests = yaml.safe_load(UNIT.read_text())["tests"]
    firing = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t.get("exp_alerts")}
    assert firing == {a["alert"] for a in ALERTS}


def test_every_alert_links_its_runbook():
    doc = (REPO / "docs" / "alerts.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^## (.+)$", doc, re.M)}
    for alert in ALERTS:
        url = alert["annotations"]["runbook_url"]
        assert url.endswith("docs/alerts.md#" + alert["alert"].lower()), url
        assert alert["alert"].lower() in anchors, f"docs/alerts.md has no section for {alert['alert']}"
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}


def test_the_documented_scrape_config_is_valid(tmp_path):
    """docs/install.md's scrape job for Prometheus without the Operator, with the rule file."""
    doc = (REPO / "docs" / "install.md").read_text()
    (job,) = [b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S) if "kubernetes_sd_configs" in b]
    jobs = yaml.safe_load(job)
    for j in jobs:  # Debian's Prometheus is built without Kubernetes discovery: check the rest of the job
        assert j.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        j["static_configs"] = [{"targets": ["127.0.0.1:9810"]}]
    config = {"rule_files": [str(RULES)], "scrape_configs": jobs}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    run_promtool("check", "config", str(tmp_path / "prometheus.yml"))
