"""Find kernel headers for bcc, or prepare them from the distribution's.

Order: an explicit directory; the running kernel's own headers
(/lib/modules/$(uname -r)/build); the kernel's built-in kheaders archive;
otherwise the newest distribution headers under /usr/src. Debian splits those
into an arch part (generated files) and a common part; bcc wants one tree, so
a tree of symlinks that merges both is built in the agent's cache directory
and passed to bcc as BCC_KERNEL_SOURCE. Nothing outside the cache is touched.

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
from dataclasses import dataclass
from pathlib import Path

from agent.errors import FoveaError


@dataclass(frozen=True)
class Headers:
    kind: str  # "running", "explicit", "kheaders", "distribution"
    path: Path | None  # None: bcc finds them itself
    env: dict[str, str]  # to set before compiling
    description: str


def _version_key(name: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def find_headers(
    explicit: str | None = None,
    release: str | None = None,
    modules: str = "/lib/modules",
    usr_src: str = "/usr/src",
    kheaders: str = "/sys/kernel/kheaders.tar.xz",
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

    for d in (Path(modules, release, "build"), Path(modules, release, "source")):
        if (d / "include").is_dir():
            return Headers("running", d, {}, f"{d} (running kernel {release})")
    build = Path(modules, release, "build")

    if Path(kheaders).exists():
        return Headers("kheaders", None, {}, f"{kheaders} (built into the kernel)")

    pair = _distribution_pair(Path(usr_src))
    if pair is None:
        raise FoveaError(
            f"no kernel headers found for {release} (looked in {build}, {kheaders}, {usr_src})",
            "install the distribution's headers, e.g. 'apt-get install linux-headers-amd64' "
            "on Debian, or mount the host's /lib/modules and /usr/src into the agent",
        )
    arch_dir, common_dir = pair
    tree = Path(cache, "kernel-headers", arch_dir.name)
    if not (tree / "include").is_dir():
        _merge_tree(tree, [arch_dir, common_dir])
    return Headers(
        "distribution",
        tree,
        {"BCC_KERNEL_SOURCE": str(tree)},
        f"{arch_dir.name} + {common_dir.name} (distribution headers, not {release}; "
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
