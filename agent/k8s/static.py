"""Standalone pods: a YAML file naming pods by IP, answering like the Kubernetes cache.

    pods:
      - {ip: 10.1.1.2, namespace: shop, pod: web-1, workloadKind: Deployment, workloadName: web, observe: true}
      - {ip: "fd00::2", namespace: shop, pod: web-1}    # a second address of the same pod
    namespaces:                                          # optional
      - {name: shop, observe: true}

Entries with the same namespace and pod are one pod with several addresses.
`workloadKind`/`workloadName` default to the pod itself ("Pod", its name).
"""

from __future__ import annotations

import ipaddress
import re

import yaml

from agent.errors import FoveaError
from agent.addresses import canonical_ip
from agent.k8s.records import NamespaceRecord, NodeRecord, PodRecord, ServiceRecord

_POD_KEYS = {"ip", "namespace", "pod", "workloadKind", "workloadName", "observe"}
_NS_KEYS = {"name", "observe"}
# Kubernetes names: namespaces are DNS labels, pods and workloads DNS subdomains.
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_KIND = re.compile(r"[A-Z][A-Za-z0-9]*")


class StaticPods:
    """The same lookups as KubeCache, from a fixed list: every pod is local."""

    synced = True

    def __init__(self, pods: list[PodRecord] | tuple[PodRecord, ...] = (),
                 namespaces: list[NamespaceRecord] | tuple[NamespaceRecord, ...] = ()):
        self._pods = {(p.namespace, p.name): p for p in pods}
        self._by_ip = {ip: p for p in self._pods.values() for ip in p.ips}
        self._local = tuple(self._pods.values())
        self._namespaces = {n: NamespaceRecord(n, False) for n, _ in self._pods}
        self._namespaces.update({n.name: n for n in namespaces})

    @classmethod
    def empty(cls) -> "StaticPods":
        return cls()

    @classmethod
    def load(cls, path: str, node_name: str = "") -> "StaticPods":
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except OSError as e:
            raise FoveaError(f"cannot read static pods file {path}: {e.strerror}", "check staticPods") from None
        except yaml.YAMLError as e:
            raise FoveaError(f"static pods file {path} is not valid YAML: {e}".replace("\n", " "),
                             "fix the file") from None
        return cls.parse(data, path, node_name)

    @classmethod
    def parse(cls, data, source: str = "static pods", node_name: str = "") -> "StaticPods":
        data = {} if data is None else data
        if not isinstance(data, dict) or set(data) - {"pods", "namespaces"}:
            raise FoveaError(f"{source}: the top level must be a mapping with 'pods' (and optionally "
                             "'namespaces')", "see docs/configuration.md")
        entries = data.get("pods")
        entries = [] if entries is None else entries
        if not isinstance(entries, list):
            raise FoveaError(f"{source} needs a list under 'pods'",
                             "e.g. pods: [{ip: 10.1.1.2, namespace: shop, pod: web-1}]")
        ips: dict[tuple[str, str], list[str]] = {}
        first: dict[tuple[str, str], tuple[str, dict]] = {}
        owner: dict[str, str] = {}
        for i, e in enumerate(entries):
            where = f"{source}: pods[{i}]"
            if not isinstance(e, dict):
                raise FoveaError(f"{where} must be a mapping", "e.g. {ip: 10.1.1.2, namespace: shop, pod: web-1}")
            missing = sorted({"ip", "namespace", "pod"} - set(e))
            if missing:
                raise FoveaError(f"{where} must have ip, namespace, pod; it lacks {', '.join(missing)}",
                                 "optional keys: workloadKind, workloadName, observe")
            unknown = sorted(set(map(str, e)) - _POD_KEYS)
            if unknown:
                raise FoveaError(f"{where} must have only {', '.join(sorted(_POD_KEYS))}; unknown key(s): "
                                 f"{', '.join(unknown)} (entry {_entry(e)})", "fix that entry")
            try:
                ip = canonical_ip(str(ipaddress.ip_address(str(e["ip"]))))
            except ValueError:
                raise FoveaError(f"{where}: {e['ip']!r} is not an IP address (entry {_entry(e)})",
                                 "fix that entry") from None
            where = f"{where} ({_entry(e)})"  # from here on, name the pod too
            _check(where, "namespace", e["namespace"], _LABEL, "a DNS label such as 'shop'")
            _check(where, "pod", e["pod"], _SUBDOMAIN, "a pod name such as 'web-1'")
            if "workloadKind" in e:
                _check(where, "workloadKind", e["workloadKind"], _KIND, "a kind such as 'Deployment'")
            if "workloadName" in e:
                _check(where, "workloadName", e["workloadName"], _SUBDOMAIN, "a name such as 'web'")
            if "observe" in e and not isinstance(e["observe"], bool):
                raise FoveaError(f"{where}: observe must be true or false", f"got {e['observe']!r}")
            key = (e["namespace"], e["pod"])
            if ip in owner and owner[ip] != f"{key[0]}/{key[1]}":
                raise FoveaError(f"{where}: IP {ip} of {key[0]}/{key[1]} is already given to {owner[ip]}",
                                 "an IP names one pod")
            owner[ip] = f"{key[0]}/{key[1]}"
            if key in first:
                prev_where, prev = first[key]
                for k in ("workloadKind", "workloadName", "observe"):
                    if k in e and e[k] != prev.get(k, e[k]):
                        raise FoveaError(f"{where}: {k} differs from {prev_where} for the same pod",
                                         "give one pod the same workload and observe everywhere")
            else:
                first[key] = (where, e)
            if ip not in ips.setdefault(key, []):
                ips[key].append(ip)
        pods = []
        for key, addrs in ips.items():
            e = first[key][1]
            pods.append(PodRecord(
                namespace=key[0], name=key[1], uid="", node=node_name, ips=tuple(addrs), host_network=False,
                observe=e.get("observe", False), workload_kind=e.get("workloadKind", "Pod"),
                workload_name=e.get("workloadName", key[1]), phase="Running",
            ))
        return cls(pods, _namespaces(data.get("namespaces"), source))

    # --- the PodDirectory lookups

    def pod_by_ip(self, ip: str) -> PodRecord | None:
        return self._by_ip.get(ip) or self._by_ip.get(canonical_ip(ip))

    def pod(self, namespace: str, name: str) -> PodRecord | None:
        return self._pods.get((namespace, name))

    def local_pods(self) -> tuple[PodRecord, ...]:
        return self._local

    def namespace(self, name: str) -> NamespaceRecord | None:
        return self._namespaces.get(name)

    def pod_observed(self, pod: PodRecord) -> bool:
        ns = self._namespaces.get(pod.namespace)
        return pod.observe or (ns is not None and ns.observe)

    def service_by_ip(self, ip: str) -> ServiceRecord | None:
        return None

    def node_by_ip(self, ip: str) -> NodeRecord | None:
        return None

    def in_pod_network(self, ip: str) -> bool:
        return False

    def stats(self) -> dict[str, int]:
        return {"pods": len(self._pods), "namespaces": len(self._namespaces)}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def _check(where: str, key: str, value, pattern: re.Pattern, want: str) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise FoveaError(f"{where}: {key} {value!r} is not valid", f"it must be {want}")


def _entry(e: dict) -> str:
    return f"{e.get('namespace')}/{e.get('pod')}"


def _namespaces(entries, source: str) -> list[NamespaceRecord]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise FoveaError(f"{source}: 'namespaces' must be a list", "e.g. namespaces: [{name: shop, observe: true}]")
    out = []
    for i, e in enumerate(entries):
        where = f"{source}: namespaces[{i}]"
        if not isinstance(e, dict) or "name" not in e or set(map(str, e)) - _NS_KEYS:
            raise FoveaError(f"{where} must be a mapping with name (and optionally observe)",
                             "e.g. {name: shop, observe: true}")
        _check(where, "name", e["name"], _LABEL, "a DNS label such as 'shop'")
        if not isinstance(e.get("observe", False), bool):
            raise FoveaError(f"{where}: observe must be true or false", f"got {e['observe']!r}")
        out.append(NamespaceRecord(e["name"], e.get("observe", False)))
    return out
