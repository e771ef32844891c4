"""What outlives the agent with --keep-attached (DESIGN.md "Lifecycle"), under /sys/fs/bpf/fovea/.

    <node>/<program>/<map>     the tc programs' counting maps (FOVEA_COUNTING_TABLE and
                               FOVEA_RINGBUF in bpf/fovea.h), pinned by agent/bpfobject.py
    <node>/<program>/link_<fn>  tracepoint links (drops, tcp), so that programs stay attached
    <node>/links/<ifindex>-<hook>   tcx links, so that programs stay attached
    <node>/state               what user space needs to continue its counters exactly

bpffs holds pins and directories, no regular files: the state is a pinned
array map holding a JSON document. It lives as long as the maps it describes
(a reboot clears both), and is replaced atomically (pinned under a temporary
name, then renamed). The node name keeps two agents apart when tests run
several "nodes" on one host.
"""

from __future__ import annotations

import ctypes as ct
import json
import logging
import os
import re
import zlib
from pathlib import Path

from agent import bpfsys
from agent.errors import FoveaError

log = logging.getLogger(__name__)

BPFFS = "/sys/fs/bpf"
ROOT = f"{BPFFS}/fovea"
STATE = "state"
LINKS = "links"
_CHUNK = 1 << 16  # bytes per element of the state map
_STATE_VERSION = 1


def bpffs_mounted(path: str = BPFFS, mounts: str = "/proc/self/mounts") -> bool:
    try:
        with open(mounts) as f:
            return any(ln.split()[1:3] == [path, "bpf"] for ln in f if len(ln.split()) > 2)
    except OSError:
        return False


def ensure_bpffs(path: str = BPFFS) -> None:
    """bpffs at path, mounted here if missing; FoveaError (one line) if it cannot be."""
    if bpffs_mounted(path):
        return
    libc = ct.CDLL(None, use_errno=True)
    os.makedirs(path, exist_ok=True)
    if libc.mount(b"bpf", path.encode(), b"bpf", 0, b"mode=0700") != 0:
        e = ct.get_errno()
        raise FoveaError(f"bpffs is not mounted at {path} and mounting it failed: {os.strerror(e)}",
                         f"mount it on the host (mount -t bpf bpf {path}) or run without --keep-attached")
    log.info("mounted bpffs at %s", path)


def node_dir_name(node: str) -> str:
    """A node name as one safe directory name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", node)[:200] or "_"


class NodePins:
    def __init__(self, node: str, root: str = ROOT):
        self.dir = Path(root, node_dir_name(node))

    def program_dir(self, program: str) -> Path:
        return self.dir / program

    def pinned_maps(self, program: str) -> set[str]:
        d = self.program_dir(program)
        return set(os.listdir(d)) if d.is_dir() else set()

    def link_path(self, ifindex: int, hook: str) -> Path:
        return self.dir / LINKS / f"{ifindex}-{hook}"

    # -- the state --------------------------------------------------------------

    def save_state(self, state: dict) -> None:
        """Replace the state with this one, atomically."""
        blob = zlib.compress(json.dumps({"version": _STATE_VERSION, **state}).encode())
        blob = len(blob).to_bytes(8, "little") + blob
        chunks = [blob[i:i + _CHUNK] for i in range(0, len(blob), _CHUNK)]
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp, final = self.dir / f"{STATE}_new", self.dir / STATE  # bpffs refuses dots in names
        fd = bpfsys.array_create(_CHUNK, len(chunks), b"fovea_state")
        try:
            for i, chunk in enumerate(chunks):
                bpfsys.array_set(fd, i, chunk.ljust(_CHUNK, b"\0"))
            tmp.unlink(missing_ok=True)
            bpfsys.pin(fd, str(tmp))
            os.rename(tmp, final)
        finally:
            os.close(fd)

    def take_state(self) -> dict:
        """The state a stopped agent left (then removed: it is read once); {} if none or unreadable."""
        path = self.dir / STATE
        try:
            fd = bpfsys.get_pinned(str(path))
        except OSError:
            return {}
        try:
            info = bpfsys.map_info(fd)
            blob = b"".join(bpfsys.array_get(fd, i, info.value_size) for i in range(info.max_entries))
            state = json.loads(zlib.decompress(blob[8:8 + int.from_bytes(blob[:8], "little")]))
            if state.get("version") != _STATE_VERSION:
                raise ValueError(f"version {state.get('version')}")
            return state
        except (OSError, ValueError, zlib.error) as e:
            log.warning("ignoring the state left at %s (%s): counters start from the maps alone", path, e)
            return {}
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)

    # -- removal ----------------------------------------------------------------

    def remove(self, keep_links: bool = False) -> list[str]:
        """Unlink every pin of this node (but its tcx links, with keep_links); returns what was removed."""
        if not keep_links:
            return remove_tree(self.dir)
        removed = []
        for entry in sorted(self.dir.iterdir()) if self.dir.is_dir() else ():
            if entry.name != LINKS:
                removed += remove_tree(entry)
        return removed


def remove_tree(top: Path) -> list[str]:
    """Unlink every pin under top and the directories; a pinned tcx link with no other
    holder detaches as its pin goes, a map is freed once no program uses it."""
    if not top.is_dir():
        if top.exists():
            top.unlink()
            return [str(top)]
        return []
    removed = []
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        for name in filenames:
            p = Path(dirpath, name)
            p.unlink(missing_ok=True)
            removed.append(str(p))
        os.rmdir(dirpath)
    return removed
