"""Find kernel headers for bcc, or prepare them from the distribution's.

The host's headers come first, the image's own last. Order: an explicit
directory; the running kernel's own headers (lib/modules/$(uname -r)/build) on
the host; the kernel's built-in kheaders archive; the newest distribution
headers under the host's usr/src; the headers the image ships
(/usr/share/fovea/kernel-headers). "The host" is each of HOST_ROOTS: /host, where
the chart mounts the node's /lib/modules and /usr/src (so they never hide the
image's copy), then / (the agent run on the node itself). A host's absolute
symlinks (Debian's build -> /usr/src/...) are followed inside its root.

Debian splits headers into an arch part (generated files) and a common part;
bcc wants one tree, so a tree of symlinks that merges both is built in the
agent's cache directory and passed to bcc as BCC_KERNEL_SOURCE. Nothing outside
the cache is touched.

Headers of another kernel version are fine for what Fovea compiles: UAPI
structs and helpers are stable, tracepoint fields are read at the offsets the
running kernel's tracefs gives, and internal struct layouts come from BTF.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import FoveaError

HOST_ROOTS = ("/host", "/")
IMAGE_HEADERS = "/usr/share/fovea/kernel-headers"


@dataclass(frozen=True)
class Headers:
    kind: str  # "explicit", "running", "kheaders", "distribution" (the host's), "image"
    path: Path | None  # None: bcc finds them itself
    env: dict[str, str]  # to set before compiling
    description: str


def _version_key(name: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def _in_root(root: Path, path: Path) -> Path:
    """`path` (inside root) with its symlinks followed as the host sees them: an
    absolute target means root/target, not the agent's own file system."""
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = Path(os.readlink(path))
        path = root / target.relative_to("/") if target.is_absolute() else path.parent / target
    return path


def find_headers(
    explicit: str | None = None,
    release: str | None = None,
    hosts: Sequence[str] = HOST_ROOTS,
    kheaders: str = "/sys/kernel/kheaders.tar.xz",
    image: str = IMAGE_HEADERS,
    cache: str = "/var/cache/fovea",
) -> Headers:
    release = release or os.uname().release
    if explicit:
        p = Path(explicit)
        if not (p / "include" / "linux").is_dir():
            raise FoveaError(
                f"kernel headers directory {explicit} has no include/linux",
                "point kernel.headers at a kernel build or headers tree",
            )
        return Headers("explicit", p, {"BCC_KERNEL_SOURCE": str(p)}, f"{p} (configured)")

    roots = [Path(h) for h in hosts if Path(h).is_dir()]
    for root in roots:
        found = _running(root, release, cache)
        if found:
            return found

    if Path(kheaders).exists():
        return Headers("kheaders", None, {}, f"{kheaders} (built into the kernel)")

    for root in roots:
        pair = _distribution_pair(root / "usr" / "src")
        if pair:
            return _distribution(pair, release, cache, "the host's distribution headers")
    pair = _distribution_pair(Path(image))
    if pair:
        return _distribution(pair, release, cache, "the image's own headers", kind="image")

    looked = [str(Path(h, "lib/modules", release, "build")) for h in hosts] + [kheaders] + [
        str(Path(h, "usr/src")) for h in hosts] + [image]
    raise FoveaError(
        f"no kernel headers found for {release} (looked in {', '.join(looked)})",
        "install the distribution's headers, e.g. 'apt-get install linux-headers-amd64' "
        "on Debian, or mount the host's /lib/modules and /usr/src at /host/lib/modules "
        "and /host/usr/src",
    )


def _running(root: Path, release: str, cache: str) -> Headers | None:
    """The running kernel's headers under root: build (and Debian's separate source)."""
    build = _in_root(root, root / "lib" / "modules" / release / "build")
    source = _in_root(root, root / "lib" / "modules" / release / "source")
    parts = [d for d in (build, source) if (d / "include").is_dir()]
    if not parts:
        return None
    if root == Path("/"):  # where bcc looks itself
        return Headers("running", parts[0], {}, f"{parts[0]} (running kernel {release})")
    tree = parts[0]
    if len(parts) == 2 and parts[0].resolve() != parts[1].resolve():
        tree = Path(cache, "kernel-headers", f"host-{release}")
        if not (tree / "include").is_dir():
            _merge_tree(tree, parts)
    return Headers("running", tree, {"BCC_KERNEL_SOURCE": str(tree)},
                   f"{parts[0]} (the host's, running kernel {release})")


def _distribution(pair: tuple[Path, Path], release: str, cache: str, whose: str,
                  kind: str = "distribution") -> Headers:
    arch_dir, common_dir = pair
    tree = Path(cache, "kernel-headers", arch_dir.name)
    if not (tree / "include").is_dir():
        _merge_tree(tree, [arch_dir, common_dir])
    return Headers(
        kind,
        tree,
        {"BCC_KERNEL_SOURCE": str(tree)},
        f"{arch_dir.name} + {common_dir.name} ({whose}, not {release}; "
        "internal layouts come from BTF)",
    )


def _distribution_pair(usr_src: Path) -> tuple[Path, Path] | None:
    """The newest (<v>-<arch>, <v>-common) pair of Debian-style header packages."""
    if not usr_src.is_dir():
        return None
    pairs = []
    for common in usr_src.glob("linux-headers-*-common"):
        prefix = common.name[: -len("common")]
        for arch in usr_src.glob(prefix + "*"):
            if arch != common and (arch / "include" / "generated").is_dir():
                pairs.append((arch, common))
    # Also a single full tree (other distributions): include/linux and include/generated.
    for full in usr_src.glob("linux-headers-*"):
        if (full / "include" / "linux").is_dir() and (full / "include" / "generated").is_dir():
            pairs.append((full, full))
    if not pairs:
        return None
    return max(pairs, key=lambda p: _version_key(p[0].name))


def _merge_tree(dest: Path, sources: list[Path]) -> None:
    """Build `dest` as symlinks; where several sources hold one directory, recurse."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        _merge_into(tmp, [s for i, s in enumerate(sources) if s not in sources[:i]])
        try:
            tmp.rename(dest)
        except OSError:  # another agent got there first
            if not (dest / "include").is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _merge_into(dest: Path, sources: list[Path]) -> None:
    names: dict[str, list[Path]] = {}
    for src in sources:
        for entry in sorted(src.iterdir()):
            names.setdefault(entry.name, []).append(entry)
    for name, paths in names.items():
        dirs = [p for p in paths if p.is_dir()]
        if len(paths) > 1 and len(dirs) == len(paths):
            (dest / name).mkdir()
            _merge_into(dest / name, dirs)
        else:
            (dest / name).symlink_to(paths[0].resolve())


def debian_headers_package() -> str:
    try:
        arch = subprocess.run(
            ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        arch = "amd64"
    return f"linux-headers-{arch}"
