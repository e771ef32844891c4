"""What a reviewer checks in the Dockerfile (tests/e2e/test_image.py builds and runs it)."""

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
    assert [ln.split()[1] for ln in froms] == ["${DEBIAN}", "${DEBIAN}", "build", "build", "${DEBIAN}"]
    assert "latest" not in TEXT


def final_stage() -> str:
    return TEXT[TEXT.rindex("\nFROM "):]


def test_bcc_comes_from_debian_and_only_header_files_reach_the_image():
    assert "python3-bpfcc" in final_stage()
    assert not re.search(r"pip install[^\n]*\bbcc\b", TEXT)  # the PyPI "bcc" is unrelated
    assert "--system-site-packages" in TEXT
    # linux-headers pulls gcc, binutils and perl: installed in a stage of its own only.
    assert "linux-headers-$(dpkg --print-architecture)" in TEXT
    assert "linux-headers" not in final_stage().replace("kernel-headers", "")
    assert "COPY --from=headers /out /usr/share/fovea/kernel-headers" in final_stage()
    assert LINES[-2:] == ['ENTRYPOINT ["fovea"]', 'CMD ["agent"]']


def test_python_dependencies_are_the_hashed_lock_and_pip_stays_behind():
    assert "--require-hashes --no-deps -r requirements.lock" in TEXT
    assert "pip uninstall -q -y pip setuptools" in TEXT
    assert "python3-venv" not in final_stage() and "COPY --from=venv /opt/fovea /opt/fovea" in final_stage()
    lock = (REPO / "requirements.lock").read_text()
    pins = re.findall(r"^([a-z0-9._-]+)==\S+ \\\n\s+--hash=sha256:", lock, re.M)
    assert "kubernetes" in pins and "pyroute2" in pins


def test_build_credentials_are_secrets_never_layers():
    # The builder's pip configuration, CA bundle and apt proxy are mounted for one RUN only.
    assert "--mount=type=secret,id=pip.conf,target=/etc/pip.conf" in TEXT
    assert "--mount=type=secret,id=ca.crt" in TEXT
    assert TEXT.count("--mount=type=secret,id=apt.conf,") == TEXT.count("apt-get update")
    assert not re.search(r"^(COPY|ADD|ENV)\b.*(pip\.conf|\.crt|proxy)", TEXT, re.M | re.I)


def test_image_tools_and_labels():
    for pkg in ("iproute2", "iptables", "nftables", "conntrack", "util-linux", "libpcap0.8"):
        assert re.search(rf"\s{re.escape(pkg)}\b", final_stage()), pkg
    for label in ("source", "revision", "version"):
        assert f"org.opencontainers.image.{label}=" in final_stage()


def test_versions_agree_chart_image_package():
    chart = yaml.safe_load((REPO / "deploy" / "helm" / "fovea" / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"] == __version__
    assert f"ghcr.io/fovea-dev/fovea:{__version__}" in (REPO / "deploy" / "daemonset.yaml").read_text()
