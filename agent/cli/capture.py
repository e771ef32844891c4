"""`kubectl fovea capture ...` and `fovea capture ...`.

Talks to the API server with the user's own kubeconfig, like kubectl: what a
person may capture and download is what RBAC lets them do with Capture
resources, Secrets and the agents' pod proxy.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import tarfile
import time
from pathlib import Path

from agent.errors import FoveaError
from capture import status as st
from capture.spec import GROUP, VERSION, SpecError, parse

AGENT_LABEL = "app.kubernetes.io/name=fovea"


# --- the API ------------------------------------------------------------------------------

class Api:
    def __init__(self, kubeconfig: str | None, context: str | None, namespace: str | None):
        from kubernetes import client, config

        cfg = client.Configuration()
        path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
        files = [p for p in path.split(os.pathsep) if p]
        if not any(Path(p).expanduser().is_file() for p in files):
            raise FoveaError(f"kubeconfig {path} does not exist", "pass --kubeconfig FILE or set KUBECONFIG")
        try:
            config.load_kube_config(config_file=files[0] if len(files) == 1 else path, context=context,
                                    client_configuration=cfg, persist_config=False)
            _, active = config.list_kube_config_contexts(config_file=files[0] if len(files) == 1 else path)
            if context:
                contexts, _ = config.list_kube_config_contexts(config_file=files[0] if len(files) == 1 else path)
                active = next(c for c in contexts if c["name"] == context)
        except (config.ConfigException, StopIteration) as e:
            raise FoveaError(f"cannot use kubeconfig {path}: {e or 'no such context'}", "check --context") from None
        cfg.retries = 1
        from agent import __version__

        self.client = client.ApiClient(cfg)
        self.client.user_agent = f"kubectl-fovea/{__version__}"
        self.custom = client.CustomObjectsApi(self.client)
        self.core = client.CoreV1Api(self.client)
        self.namespace = namespace or (active.get("context") or {}).get("namespace") or "default"

    def plural(self, cluster: bool) -> str:
        return "clustercaptures" if cluster else "captures"

    def get(self, name: str, cluster: bool) -> dict:
        if cluster:
            return self.custom.get_cluster_custom_object(GROUP, VERSION, "clustercaptures", name)
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "captures", name)


def _problem(e, what: str) -> FoveaError:
    """An API error as one line: what went wrong, and what to do."""
    try:
        body = json.loads(e.body)
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") or e.reason or "no message"
    if e.status == 403:
        return FoveaError(f"not allowed to {what}: {message}",
                          "ask a cluster admin for a Role that allows it (see docs/captures.md, RBAC)")
    if e.status == 404:
        return FoveaError(f"cannot {what}: {message}", "check the name and the namespace (-n)")
    if e.status == 422:
        causes = [c.get("message", "") for c in (body.get("details") or {}).get("causes") or []]
        return FoveaError(f"cannot {what}: the API server says the capture is invalid: "
                          f"{'; '.join(causes) or message}", "fix the flags; see kubectl fovea capture create -h")
    if e.status == 409:
        return FoveaError(f"cannot {what}: {message}", "pick another name, or delete the old capture first")
    if e.status == 401:
        return FoveaError(f"cannot {what}: not logged in to the API server", "check your kubeconfig credentials")
    return FoveaError(f"cannot {what}: API error {e.status}: {message}", "try again; check the API server")


def _api_call(what: str, fn, *args, **kwargs):
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, **kwargs)
    except ApiException as e:
        raise _problem(e, what) from None
    except HTTPError as e:
        raise FoveaError(f"cannot {what}: the API server is unreachable ({type(e).__name__})",
                         "check the cluster address in your kubeconfig") from None


# --- commands -------------------------------------------------------------------------------

def _selector(text: str, flag: str) -> dict:
    labels = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = term.partition("=")
        if not eq or not key:
            raise FoveaError(f"{flag} {text!r} is not a label selector", f"write it like {flag} app=web,tier=front")
        labels[key.strip()] = value.strip()
    return {"matchLabels": labels}


def build(args) -> dict:
    """The Capture or ClusterCapture the flags describe."""
    if args.cluster:
        kinds = [k for k in ("namespace_selector", "node", "node_selector") if getattr(args, k)]
        if len(kinds) > 1 or args.pod:
            raise FoveaError("a cluster capture targets one of --namespace-selector (with --pod-selector), --node "
                             "and --node-selector", "pick one; --pod is for a namespaced capture")
        if args.node:
            target = {"nodeNames": args.node}
        elif args.node_selector:
            target = {"nodeSelector": _selector(args.node_selector, "--node-selector")}
        else:
            target = {"namespaceSelector": _selector(args.namespace_selector or "", "--namespace-selector")}
            if args.pod_selector:
                target["podSelector"] = _selector(args.pod_selector, "--pod-selector")
    else:
        if args.namespace_selector or args.node or args.node_selector:
            raise FoveaError("--namespace-selector, --node and --node-selector need --cluster",
                             "a namespaced capture reaches only pods of its own namespace")
        if bool(args.pod_selector) == bool(args.pod):
            raise FoveaError("give exactly one of --pod-selector and --pod", "e.g. --pod-selector app=web")
        target = ({"podSelector": _selector(args.pod_selector, "--pod-selector")} if args.pod_selector
                  else {"podNames": args.pod})
    spec: dict = {"target": target, "duration": args.duration}
    if args.filter:
        spec["filter"] = args.filter
    if args.max_bytes:
        spec["maxBytes"] = args.max_bytes
    if args.max_packets:
        spec["maxPackets"] = args.max_packets
    if args.snap_length:
        spec["snapLength"] = args.snap_length
    if args.no_metadata:
        spec["includeMetadata"] = False
    if args.s3_bucket or args.s3_endpoint:
        if args.azure_secret:
            raise FoveaError("give one output: --s3-* or --azure-secret", "")
        s3 = {"endpoint": args.s3_endpoint, "bucket": args.s3_bucket, "secretRef": {"name": args.s3_secret}}
        if args.s3_prefix:
            s3["prefix"] = args.s3_prefix
        if args.s3_region:
            s3["region"] = args.s3_region
        spec["output"] = {"s3": s3}
    elif args.azure_secret:
        spec["output"] = {"azureBlob": {"secretRef": {"name": args.azure_secret}}}
    else:
        spec["output"] = {"hostPath": {}}
    kind = "ClusterCapture" if args.cluster else "Capture"
    meta = {"name": args.name} if args.cluster else {"name": args.name, "namespace": args.namespace_}
    obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": meta, "spec": spec}
    try:
        parse(obj)  # the agent's own checks, before the API server sees it
    except SpecError as e:
        raise FoveaError(e.problem, e.hint) from None
    return obj


def cmd_create(api: Api, args) -> int:
    args.namespace_ = api.namespace
    obj = build(args)
    if args.s3_bucket and not (args.s3_endpoint and args.s3_secret):
        raise FoveaError("--s3-bucket needs --s3-endpoint and --s3-secret", "")
    what = f"create {obj['kind']} {_name(obj)}"
    if args.cluster:
        _api_call(what, api.custom.create_cluster_custom_object, GROUP, VERSION, "clustercaptures", obj)
    else:
        _api_call(what, api.custom.create_namespaced_custom_object, GROUP, VERSION, api.namespace, "captures", obj)
    print(f"{obj['kind'].lower()}.{GROUP}/{args.name} created")
    return wait(api, args.name, args.cluster, args.timeout) if args.wait else 0


def wait(api: Api, name: str, cluster: bool, timeout: float) -> int:
    """Print each node's progress until the capture is done."""
    seen: dict[str, tuple] = {}
    deadline = time.monotonic() + timeout
    while True:
        obj = _api_call(f"read capture {name}", api.get, name, cluster)
        status = obj.get("status") or {}
        for node in status.get("expectedNodes") or []:
            n = (status.get("nodes") or {}).get(node) or {}
            key = (n.get("phase", "Pending"), n.get("packets"))
            if seen.get(node) != key:
                seen[node] = key
                extra = f", {n['packets']} packets" if n.get("packets") is not None else ""
                msg = f" ({n['message']})" if n.get("message") and key[0] == st.FAILED else ""
                print(f"  {node}: {key[0]}{extra}{msg}", flush=True)
        phase = status.get("phase")
        if phase in st.TERMINAL:
            print(f"{name}: {phase}" + (f": {status['message']}" if status.get("message") else ""))
            return 0 if phase == st.SUCCEEDED else 1
        if time.monotonic() > deadline:
            raise FoveaError(f"{name} is still {phase or 'Pending'} after {timeout:.0f}s",
                             "see kubectl fovea capture describe " + name)
        time.sleep(0.5)


def _name(obj: dict) -> str:
    m = obj["metadata"]
    return f"{m['namespace']}/{m['name']}" if m.get("namespace") else m["name"]


def _age(ts: str | None) -> str:
    if not ts:
        return "-"
    s = max(0, int(time.time() - st.parse_time(ts)))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= 2 * size:
            return f"{s // size}{unit}"
    return f"{s}s"


def cmd_list(api: Api, args) -> int:
    from rich.console import Console
    from rich.table import Table

    if args.cluster:
        items = _api_call("list clustercaptures", api.custom.list_cluster_custom_object, GROUP, VERSION,
                          "clustercaptures")["items"]
    elif args.all_namespaces:
        items = _api_call("list captures", api.custom.list_cluster_custom_object, GROUP, VERSION, "captures")["items"]
    else:
        items = _api_call(f"list captures in {api.namespace}", api.custom.list_namespaced_custom_object, GROUP,
                          VERSION, api.namespace, "captures")["items"]
    if not items:
        print("No captures found" + ("" if args.cluster or args.all_namespaces else f" in {api.namespace}"))
        return 0
    table = Table(box=None, pad_edge=False)
    cols = (["NAMESPACE"] if args.all_namespaces and not args.cluster else []) + [
        "NAME", "PHASE", "NODES", "PACKETS", "AGE"]
    for c in cols:
        table.add_column(c)
    for o in items:
        s = o.get("status") or {}
        row = [o["metadata"].get("namespace", "")] if "NAMESPACE" in cols else []
        row += [o["metadata"]["name"], s.get("phase", "Pending"), s.get("nodesDone", "-"), str(s.get("packets", "-")),
                _age(o["metadata"].get("creationTimestamp"))]
        table.add_row(*row)
    Console(width=200).print(table)
    return 0


def cmd_get(api: Api, args) -> int:
    obj = _api_call(f"read capture {args.name}", api.get, args.name, args.cluster)
    if args.output == "yaml":
        import yaml

        print(yaml.safe_dump(obj, sort_keys=False), end="")
        return 0
    if args.output == "json":
        print(json.dumps(obj, indent=2))
        return 0
    spec, s = obj.get("spec") or {}, obj.get("status") or {}
    lines = [f"Name:       {obj['metadata']['name']}"]
    if obj["metadata"].get("namespace"):
        lines.append(f"Namespace:  {obj['metadata']['namespace']}")
    lines += [f"Kind:       {obj['kind']}", f"Target:     {json.dumps(spec.get('target'))}",
              f"Filter:     {spec.get('filter') or '(every packet)'}", f"Duration:   {spec.get('duration')}",
              f"Output:     {next(iter(spec.get('output') or {'hostPath': {}}))}",
              f"Phase:      {s.get('phase', 'Pending')}", f"Nodes:      {s.get('nodesDone', '-')}"]
    if s.get("message"):
        lines.append(f"Message:    {s['message']}")
    for key in ("startTime", "completionTime"):
        if s.get(key):
            lines.append(f"{key[0].upper() + key[1:]}:".ljust(12) + s[key])
    for node in s.get("expectedNodes") or []:
        n = (s.get("nodes") or {}).get(node) or {}
        lines.append(f"  {node}: {n.get('phase', 'Pending')}  packets={n.get('packets', '-')} "
                     f"bytes={n.get('bytes', '-')} dropped={n.get('droppedPackets', '-')}")
        if n.get("message"):
            lines.append(f"    {n['message']}")
        art = n.get("artifact") or {}
        if art:
            lines.append(f"    artifact: {art.get('location')} ({art.get('size')} bytes, sha256 {art.get('sha256')})")
    print("\n".join(lines))
    return 0


def cmd_delete(api: Api, args) -> int:
    what = f"delete capture {args.name}"
    if args.cluster:
        _api_call(what, api.custom.delete_cluster_custom_object, GROUP, VERSION, "clustercaptures", args.name)
    else:
        _api_call(what, api.custom.delete_namespaced_custom_object, GROUP, VERSION, api.namespace, "captures",
                  args.name)
    print(f"{'clustercapture' if args.cluster else 'capture'}.{GROUP}/{args.name} deleted")
    return 0


# --- download -----------------------------------------------------------------------------------

def cmd_download(api: Api, args) -> int:
    obj = _api_call(f"read capture {args.name}", api.get, args.name, args.cluster)
    status = obj.get("status") or {}
    arts = {n: r["artifact"] for n, r in (status.get("nodes") or {}).items() if (r or {}).get("artifact")}
    if not arts:
        raise FoveaError(f"capture {args.name} has no file to download yet (phase {status.get('phase', 'Pending')})",
                         "wait for it: kubectl fovea capture get " + args.name)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    secret_ns = obj["metadata"].get("namespace") or args.agent_namespace
    output = (obj.get("spec") or {}).get("output") or {"hostPath": {}}
    for node, art in sorted(arts.items()):
        location = art["location"]
        name = location.rstrip("/").rsplit("/", 1)[-1]
        target = out / name
        partial = target.with_name(target.name + ".partial")
        if location.startswith("hostpath://"):
            chunks = _from_agent(api, args.agent_namespace, node, location, art.get("downloadToken", ""))
        elif "s3" in output:
            chunks = _from_s3(api, output["s3"], secret_ns, location)
        else:
            chunks = _from_blob(api, output["azureBlob"], secret_ns, location)
        digest = hashlib.sha256()
        try:
            with open(partial, "wb") as f, _progress(name, art.get("size") or 0) as advance:
                for chunk in chunks:
                    f.write(chunk)
                    digest.update(chunk)
                    advance(len(chunk))
            if digest.hexdigest() != art.get("sha256"):
                raise FoveaError(f"{name}: sha256 {digest.hexdigest()} does not match the capture's "
                                 f"{art.get('sha256')}", "the file is damaged or was replaced; it was not kept")
            partial.rename(target)
        finally:
            partial.unlink(missing_ok=True)
        print(f"{node}: {target} (sha256 verified)")
        if target.name.endswith(".tar.gz"):
            pcaps = _unpack(target, out)
            for p in pcaps:
                print(f"{node}: {p} (open it with Wireshark)")
    return 0


def _progress(name: str, total: int):
    import contextlib

    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    @contextlib.contextmanager
    def bar():
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), transient=True, disable=not sys.stderr.isatty()) as p:
            task = p.add_task(name, total=total or None)
            yield lambda n: p.advance(task, n)

    return bar()


def _unpack(archive: Path, out: Path) -> list[Path]:
    """The bundle's files beside it (the archive is checked to hold plain files only)."""
    dest = out / archive.name[: -len(".tar.gz")]
    safe_extract(archive, dest)
    return sorted(p for p in dest.rglob("*") if p.suffix in (".pcap", ".pcapng"))


def safe_extract(archive: Path, dest: Path) -> list[str]:
    """Regular files and directories only, each inside dest (no links, devices, absolute
    paths or '..'): the archive is untrusted input."""
    names = []
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in parts or not parts:
                raise FoveaError(f"{archive.name}: member {m.name!r} is not a plain file inside the archive",
                                 "the file was not made by Fovea; it was not unpacked")
        for m in tar.getmembers():
            m.mode = 0o700 if m.isdir() else 0o600
            tar.extract(m, dest, set_attrs=False)
            names.append(m.name)
    return names


def agent_pod(api: Api, agent_ns: str, node: str):
    """The Fovea agent pod on that node (a running one first)."""
    pods = _api_call(f"find the Fovea agent on node {node}", api.core.list_namespaced_pod, agent_ns,
                     label_selector=AGENT_LABEL, field_selector=f"spec.nodeName={node}").items
    pods = [p for p in pods if (p.status.phase or "") == "Running"] or pods
    if not pods:
        raise FoveaError(f"no Fovea agent pod on node {node} in namespace {agent_ns}",
                         "check the node name (kubectl get nodes), or pass --agent-namespace where the DaemonSet runs")
    return pods[0]


def _from_agent(api: Api, agent_ns: str, node: str, location: str, token: str):
    """Through the API server's pod proxy to the agent on that node, with the download token."""
    pod = agent_pod(api, agent_ns, node)
    port = next((p.container_port for c in pod.spec.containers or [] for p in c.ports or [] if p.name == "metrics"),
                9810)
    key = location[len(f"hostpath://{node}/"):]
    # An agent serving HTTPS (metrics.tls in the chart) probes itself over HTTPS: proxy to it that way.
    https = any(c.liveness_probe and c.liveness_probe.http_get and (c.liveness_probe.http_get.scheme or "") == "HTTPS"
                for c in pod.spec.containers or [])
    target = f"{'https:' if https else ''}{pod.metadata.name}:{port}"
    path = f"/api/v1/namespaces/{agent_ns}/pods/{target}/proxy/captures/{key}"
    resp = _api_call(f"download {key} from node {node}", api.client.call_api, path, "GET",
                     query_params=[("token", token)], auth_settings=["BearerToken"], _preload_content=False,
                     _return_http_data_only=True)
    return resp.stream(1 << 20)


def _secret(api: Api, name: str, ns: str) -> dict[str, str]:
    s = _api_call(f"read Secret {ns}/{name} for the download", api.core.read_namespaced_secret, name, ns)
    return {k: base64.b64decode(v).decode() for k, v in (s.data or {}).items()}


def _from_s3(api: Api, s3: dict, ns: str, location: str):
    import boto3

    creds = _secret(api, s3["secretRef"]["name"], ns)
    # The location is <endpoint>/<bucket>/<key> (path-style)
    bucket, _, key = location[len(s3["endpoint"].rstrip("/")) + 1:].partition("/")
    client = boto3.client("s3", endpoint_url=s3["endpoint"], region_name=s3.get("region") or "us-east-1",
                          aws_access_key_id=creds.get("accessKeyId"), aws_secret_access_key=creds.get("secretAccessKey"))
    return client.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(1 << 20)


def _from_blob(api: Api, blob: dict, ns: str, location: str):
    from azure.storage.blob import BlobClient, ContainerClient

    creds = _secret(api, blob["secretRef"]["name"], ns)
    container = ContainerClient.from_container_url(creds["sasUrl"])
    name = location.split("?", 1)[0].rsplit("/", 1)[-1]
    client: BlobClient = container.get_blob_client(name)
    return client.download_blob().chunks()


# --- the parser -----------------------------------------------------------------------------------

def add_capture_commands(sub) -> None:
    """`capture ...` under a parser (kubectl-fovea's and fovea's)."""
    c = sub.add_parser("capture", help="packet captures of pods or nodes (Capture resources)",
                       description="Create, watch and download packet captures (fovea.dev Capture and "
                       "ClusterCapture resources).")
    csub = c.add_subparsers(dest="capture_command", metavar="COMMAND", required=True)

    def common(p, name=True):
        p.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig (default: $KUBECONFIG, ~/.kube/config)")
        p.add_argument("--context", help="kubeconfig context to use")
        p.add_argument("-n", "--namespace", help="namespace (default: the context's)")
        p.add_argument("--cluster", action="store_true", help="a ClusterCapture (cluster-scoped)")
        if name:
            p.add_argument("name", metavar="NAME")

    p = csub.add_parser("create", help="start a capture", description="Start a capture. Example: kubectl fovea "
                        "capture create web-debug -n shop --pod-selector app=web --duration 30s "
                        "--filter 'tcp port 80' --wait")
    common(p)
    p.add_argument("--pod-selector", metavar="LABELS", help="pods by labels, e.g. app=web")
    p.add_argument("--pod", action="append", metavar="NAME", help="a pod by name; repeatable")
    p.add_argument("--namespace-selector", metavar="LABELS", help="--cluster: pods of these namespaces ('' = all)")
    p.add_argument("--node", action="append", metavar="NAME", help="--cluster: a node's interfaces; repeatable")
    p.add_argument("--node-selector", metavar="LABELS", help="--cluster: nodes by labels")
    p.add_argument("--filter", help="pcap-filter expression, e.g. 'tcp port 80'")
    p.add_argument("--duration", default="30s", help="how long, e.g. 30s, 5m (at most 1h; default 30s)")
    p.add_argument("--max-bytes", help="stop after this much per node, e.g. 100Mi (default 100Mi)")
    p.add_argument("--max-packets", type=int, help="stop after this many packets per node")
    p.add_argument("--snap-length", type=int, help="bytes kept of each packet (default 262144)")
    p.add_argument("--no-metadata", action="store_true", help="no network-state bundle beside the pcap")
    p.add_argument("--output-host-path", action="store_true", help="keep the file on the node (the default)")
    p.add_argument("--s3-endpoint", metavar="URL")
    p.add_argument("--s3-bucket")
    p.add_argument("--s3-prefix")
    p.add_argument("--s3-region")
    p.add_argument("--s3-secret", metavar="NAME", help="Secret with accessKeyId and secretAccessKey")
    p.add_argument("--azure-secret", metavar="NAME", help="Secret with sasUrl (a container SAS URL)")
    p.add_argument("--wait", action="store_true", help="show progress per node until the capture is done")
    p.add_argument("--timeout", type=float, default=3900, help="seconds --wait waits at most")
    p.set_defaults(capture_func=cmd_create)

    p = csub.add_parser("list", help="list captures")
    common(p, name=False)
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.set_defaults(capture_func=cmd_list)

    for verb in ("get", "describe"):
        p = csub.add_parser(verb, help="a capture's status, per node")
        common(p)
        p.add_argument("-o", "--output", choices=["yaml", "json"], help="the whole object")
        p.set_defaults(capture_func=cmd_get)

    p = csub.add_parser("delete", help="delete a capture (stops it if running; removes its files on the nodes)")
    common(p)
    p.set_defaults(capture_func=cmd_delete)

    p = csub.add_parser("download", help="download a capture's files and verify their sha256")
    common(p)
    p.add_argument("-o", "--output-dir", default=".", help="where to put the files (default: here)")
    p.add_argument("--agent-namespace", default="fovea-system", help="where the Fovea agents run (default fovea-system)")
    p.set_defaults(capture_func=cmd_download)


def run_capture(args) -> int:
    api = Api(args.kubeconfig, args.context, args.namespace)
    return args.capture_func(api, args)
