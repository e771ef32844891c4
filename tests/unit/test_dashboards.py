"""Shipped Grafana dashboards: valid structure, the datasource as a variable (no
hard-coded UIDs), the template variables every dashboard shares."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO

PATHS = sorted((REPO / "dashboards").glob("*.json"))
VARIABLES = ["datasource", "cluster", "node", "namespace", "workload_name"]


def walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def test_the_promised_dashboards_are_shipped():
    titles = {json.loads(p.read_text())["title"] for p in PATHS}
    assert titles == {"Fovea / Node overview", "Fovea / Pod traffic and drops", "Fovea / DNS", "Fovea / TCP health",
                      "Fovea / Traffic map", "Fovea / Service map", "Fovea / Agent health"}
    assert len({json.loads(p.read_text())["uid"] for p in PATHS}) == len(PATHS)


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_dashboard_structure(path):
    dash = json.loads(path.read_text())
    variables = dash["templating"]["list"]
    assert [v["name"] for v in variables] == VARIABLES
    assert variables[0] == {"name": "datasource", "type": "datasource", "query": "prometheus", "current": {}}
    for node in walk(dash):
        ds = node.get("datasource")
        if isinstance(ds, dict):  # every datasource reference is the variable, never a UID of someone's Grafana
            assert ds == {"type": "prometheus", "uid": "${datasource}"}, ds
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, panel["title"]
        assert panel["type"] in {"timeseries", "heatmap", "table", "nodeGraph", "stat"}
        assert panel["targets"] and all(t["expr"].strip() and t["refId"] for t in panel["targets"]), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_panels_that_need_a_special_shape():
    by_title = {json.loads(p.read_text())["title"]: json.loads(p.read_text()) for p in PATHS}
    (graph,) = [p for p in by_title["Fovea / Traffic map"]["panels"] if p["type"] == "nodeGraph"]
    assert all("fovea_workload_flow_" in t["expr"] and t.get("format") == "table" for t in graph["targets"])
    heatmaps = [p for p in by_title["Fovea / TCP health"]["panels"] if p["type"] == "heatmap"]
    assert {("_rtt_" in p["targets"][0]["expr"], p["targets"][0]["format"]) for p in heatmaps} == {
        (True, "heatmap"), (False, "heatmap")}


EDGE_IDS = '"id", " -> ", "source", "target")'  # an edge's id, as label_join makes it of its ends


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_node_graphs_give_grafana_one_edges_frame_and_one_nodes_frame(path):
    """Grafana's Node Graph takes a frame with a `source` field as its edges and another as its
    nodes. So: one query makes id, source and target; one makes the node ids; any further query
    (a statistic of an edge) carries only the edge's id and is joined into the edges frame; each
    value column is renamed to a field the Node Graph shows."""
    for panel in [p for p in json.loads(path.read_text())["panels"] if p["type"] == "nodeGraph"]:
        targets = {t["refId"]: t["expr"] for t in panel["targets"]}
        assert all(t.get("format") == "table" and t.get("instant") for t in panel["targets"]), panel["title"]
        (edges,) = [r for r, e in targets.items() if e.startswith("label_join(") and e.endswith(EDGE_IDS)]
        stats = [r for r, e in targets.items() if e.startswith("sum by (id) (") and e.endswith(EDGE_IDS + ")")]
        (nodes,) = set(targets) - {edges, *stats}
        assert targets[nodes].startswith("sum by (id) (") and " -> " not in targets[nodes]
        joins = [t for t in panel.get("transformations", []) if t["id"] == "joinByField"]
        if stats:
            (join,) = joins
            assert join["options"] == {"byField": "id", "mode": "outer"}
            assert join["filter"] == {"id": "byRefId", "options": "|".join([edges, *stats])}
        else:
            assert not joins
        (organize,) = [t for t in panel["transformations"] if t["id"] == "organize"]
        names = organize["options"]["renameByName"]
        assert names[f"Value #{edges}"] == names[f"Value #{nodes}"] == "mainstat"
        shown = [names[f"Value #{r}"] for r in stats]
        assert all(n == "secondarystat" or n.startswith("detail__") for n in shown) and len(set(shown)) == len(shown)
