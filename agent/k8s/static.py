"""Standalone pods: a YAML file naming pods by IP, answering like the Kubernetes cache.

    pods:
      - {ip: 10.1.1.2, namespace: shop, pod: web-1, workloadKind: Deployment, workloadName: web, observe: true}
"""

from __future__ import annotations

import ipaddress

import yaml

from agent.errors import FoveaError
from agent.k8s.records import NamespaceRecord, PodRecord

_KEYS = {"ip", "namespace", "pod", "workloadKind", "workloadName", "observe"}


class StaticPods:
    synced = True

    def __init__(self, pods: list[PodRecord]):
        self._by_ip = {ip: p for p in pods for ip in p.ips}
        self._pods = {(p.namespace, p.name): p for p in pods}

    @classmethod
    def empty(cls) -> "StaticPods":
        return cls([])

    @classmethod
    def load(cls, path: str) -> "StaticPods":
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise FoveaError(f"cannot read static pods file {path}: {e.strerror}", "check staticPods") from None
        except yaml.YAMLError:
            raise FoveaError(f"static pods file {path} is not valid YAML", "fix the file") from None
        entries = data.get("pods") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise FoveaError(f"static pods file {path} needs a list under 'pods'", "see docs/configuration.md")
        ips: dict[tuple[str, str], list[str]] = {}
        meta: dict[tuple[str, str], dict] = {}
        for i, e in enumerate(entries):
            where = f"{path}: pods[{i}]"
            if not isinstance(e, dict) or not {"ip", "namespace", "pod"} <= set(e) or set(e) - _KEYS:
                raise FoveaError(f"{where} must have ip, namespace, pod (and optionally workloadKind, "
                                 "workloadName, observe)", "fix that entry")
            try:
                ip = str(ipaddress.ip_address(e["ip"]))
            except ValueError:
                raise FoveaError(f"{where}: {e['ip']!r} is not an IP address", "fix that entry") from None
            key = (str(e["namespace"]), str(e["pod"]))
            ips.setdefault(key, []).append(ip)
            meta[key] = e
        pods = [
            PodRecord(
                namespace=ns, name=name, uid="", node="", ips=tuple(ips[(ns, name)]), host_network=False,
                observe=bool(meta[(ns, name)].get("observe", False)),
                workload_kind=str(meta[(ns, name)].get("workloadKind", "Pod")),
                workload_name=str(meta[(ns, name)].get("workloadName", name)), phase="Running",
            )
            for ns, name in ips
        ]
        return cls(pods)

    def pod_by_ip(self, ip: str) -> PodRecord | None:
        return self._by_ip.get(ip)

    def local_pods(self) -> list[PodRecord]:
        return list(self._pods.values())

    def pod_observed(self, pod: PodRecord) -> bool:
        return pod.observe

    def namespace(self, name: str) -> NamespaceRecord | None:
        return None

    def service_by_ip(self, ip: str):
        return None

    def node_by_ip(self, ip: str):
        return None

    def stats(self) -> dict[str, int]:
        return {"pods": len(self._pods)}

    def stop(self) -> None:
        pass
