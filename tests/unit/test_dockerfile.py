"""The Dockerfile cannot be built here: check what a reviewer would."""

from __future__ import annotations

import re
import tomllib

import yaml

from agent import __version__
from tests.conftest import REPO

TEXT = (REPO / "Dockerfile").read_text()
LINES = [ln for ln in TEXT.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_base_is_pinned_debian_bookworm_and_multi_stage():
    (base,) = re.findall(r"^ARG DEBIAN=(\S+)$", TEXT, re.M)
    assert re.fullmatch(r"debian:bookworm-\d{8}-slim(@sha256:[0-9a-f]{64})?", base)
    froms = [ln for ln in LINES if ln.startswith("FROM ")]
    assert len(froms) == 2 and all(ln.split()[1] == "${DEBIAN}" for ln in froms)
    assert "latest" not in TEXT


def test_bcc_comes_from_debian_and_headers_are_the_fallback():
    assert "python3-bpfcc" in TEXT and "linux-headers-$(dpkg --print-architecture)" in TEXT
    assert not re.search(r"pip install[^\n]*\bbcc\b", TEXT)  # the PyPI "bcc" is unrelated
    assert "--system-site-packages" in TEXT
    assert LINES[-2:] == ['ENTRYPOINT ["fovea"]', 'CMD ["agent"]']


def test_versions_agree_chart_image_package():
    chart = yaml.safe_load((REPO / "deploy" / "helm" / "fovea" / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"] == __version__
    assert f"ghcr.io/fovea-dev/fovea:{__version__}" in (REPO / "deploy" / "daemonset.yaml").read_text()
