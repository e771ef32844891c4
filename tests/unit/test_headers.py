"""agent/kernel/headers.py on fake host roots (lib/modules, usr/src), image and cache trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.errors import FoveaError
from agent.kernel.headers import Headers, find_headers

RELEASE = "6.18.44-test"


def touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def debian_pair(usr_src: Path, version: str) -> tuple[Path, Path]:
    """The two directories Debian's linux-headers-<version>-{amd64,common} install."""
    arch = usr_src / f"linux-headers-{version}-amd64"
    common = usr_src / f"linux-headers-{version}-common"
    touch(arch / "include" / "generated" / "autoconf.h", f"/* {version} arch */\n")
    touch(arch / "include" / "config" / "auto.conf", "CONFIG_X86_64=y\n")
    touch(arch / "arch" / "x86" / "include" / "generated" / "asm" / "cpufeaturemasks.h")
    touch(arch / "arch" / "x86" / "include" / "generated" / "uapi" / "asm" / "unistd_64.h")
    touch(arch / "Makefile", "include arch Makefile\n")
    touch(arch / "Module.symvers")
    touch(common / "include" / "linux" / "skbuff.h", f"/* {version} common */\n")
    touch(common / "include" / "uapi" / "linux" / "bpf.h")
    touch(common / "include" / "net" / "dropreason.h")
    touch(common / "arch" / "x86" / "include" / "asm" / "ptrace.h")
    touch(common / "arch" / "x86" / "include" / "uapi" / "asm" / "ptrace.h")
    touch(common / "arch" / "x86" / "Makefile")
    touch(common / "Makefile", "common Makefile\n")
    return arch, common


@pytest.fixture
def roots(tmp_path) -> dict[str, Path]:
    """An empty fake host (mounted at "host"), image and cache."""
    (tmp_path / "host" / "lib" / "modules").mkdir(parents=True)
    (tmp_path / "host" / "usr" / "src").mkdir(parents=True)
    (tmp_path / "image").mkdir()
    return {
        "host": tmp_path / "host",
        "modules": tmp_path / "host" / "lib" / "modules",
        "usr_src": tmp_path / "host" / "usr" / "src",
        "kheaders": tmp_path / "kheaders.tar.xz",
        "image": tmp_path / "image",
        "cache": tmp_path / "cache",
    }


def find(roots, **kw) -> Headers:
    args = {"hosts": [str(roots["host"])], "kheaders": str(roots["kheaders"]),
            "image": str(roots["image"]), "cache": str(roots["cache"])}
    return find_headers(release=RELEASE, **{**args, **kw})


def snapshot(root: Path) -> dict[str, tuple[bool, int]]:
    """Every path under root, with whether it is a symlink and its mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = (p.is_symlink(), p.lstat().st_mtime_ns)
    return out


def test_explicit_dir_is_used(tmp_path, roots):
    explicit = tmp_path / "my-headers"
    (explicit / "include" / "linux").mkdir(parents=True)
    # Even with every other kind available, the configured one wins.
    (roots["modules"] / RELEASE / "build" / "include").mkdir(parents=True)
    touch(roots["kheaders"])
    debian_pair(roots["usr_src"], "6.1.0-56")
    h = find(roots, explicit=str(explicit))
    assert h == Headers("explicit", explicit, {"BCC_KERNEL_SOURCE": str(explicit)},
                        f"{explicit} (configured)")
    assert not roots["cache"].exists()


def test_explicit_dir_without_include_linux(tmp_path, roots):
    explicit = tmp_path / "empty"
    explicit.mkdir()
    with pytest.raises(FoveaError) as exc:
        find(roots, explicit=str(explicit))
    assert exc.value.problem == f"kernel headers directory {explicit} has no include/linux"


def test_running_kernel_build_dir_preferred(roots):
    build = roots["modules"] / RELEASE / "build"
    (build / "include").mkdir(parents=True)
    (roots["modules"] / "6.1.0-56-amd64" / "build" / "include").mkdir(parents=True)
    touch(roots["kheaders"])
    debian_pair(roots["usr_src"], "6.1.0-56")
    debian_pair(roots["image"], "6.1.0-57")
    h = find(roots)
    assert h == Headers("running", build, {"BCC_KERNEL_SOURCE": str(build)},
                        f"{build} (the host's, running kernel {RELEASE})")
    assert not roots["cache"].exists()


def test_running_kernel_source_dir_counts(roots):
    source = roots["modules"] / RELEASE / "source"
    (source / "include").mkdir(parents=True)
    h = find(roots)
    assert (h.kind, h.env) == ("running", {"BCC_KERNEL_SOURCE": str(source)})


def test_host_symlinks_followed_inside_the_host_root(tmp_path, roots):
    """Debian's build -> /usr/src/...-amd64 and source -> /usr/src/...-common are the
    host's paths: both halves are found under the host root and merged."""
    arch, common = debian_pair(roots["usr_src"], RELEASE)
    # The agent's own /usr/src has a decoy of the same name that must not be used.
    (roots["modules"] / RELEASE).mkdir()
    (roots["modules"] / RELEASE / "build").symlink_to(f"/usr/src/{arch.name}")
    (roots["modules"] / RELEASE / "source").symlink_to(f"/usr/src/{common.name}")
    h = find(roots)
    tree = roots["cache"] / "kernel-headers" / f"host-{RELEASE}"
    assert h == Headers("running", tree, {"BCC_KERNEL_SOURCE": str(tree)},
                        f"{arch} (the host's, running kernel {RELEASE})")
    assert (tree / "include/generated/autoconf.h").resolve() == arch / "include/generated/autoconf.h"
    assert (tree / "include/linux/skbuff.h").resolve() == common / "include/linux/skbuff.h"


def test_image_headers_when_the_host_has_none(roots):
    """Empty host directories (what the chart mounts on most managed nodes) fall back to
    the image's own copy; any host headers win over it."""
    debian_pair(roots["image"], "6.1.0-57")
    h = find(roots)
    tree = roots["cache"] / "kernel-headers" / "linux-headers-6.1.0-57-amd64"
    assert h == Headers("image", tree, {"BCC_KERNEL_SOURCE": str(tree)},
                        "linux-headers-6.1.0-57-amd64 + linux-headers-6.1.0-57-common (the image's own "
                        f"headers, not {RELEASE}; internal layouts come from BTF)")
    assert (tree / "include/linux/skbuff.h").read_text() == "/* 6.1.0-57 common */\n"
    debian_pair(roots["usr_src"], "6.1.0-9")
    assert find(roots).kind == "distribution"


def test_kheaders_used_when_no_build_dir(roots):
    # A build dir of another release, and an empty one for this release, do not count.
    (roots["modules"] / "6.1.0-56-amd64" / "build" / "include").mkdir(parents=True)
    (roots["modules"] / RELEASE / "build").mkdir(parents=True)
    touch(roots["kheaders"])
    debian_pair(roots["usr_src"], "6.1.0-56")
    h = find(roots)
    assert h == Headers("kheaders", None, {}, f"{roots['kheaders']} (built into the kernel)")
    assert not roots["cache"].exists()


def test_debian_pair_merged_into_cache(roots):
    arch, common = debian_pair(roots["usr_src"], "6.1.0-56")
    before = snapshot(roots["usr_src"])
    h = find(roots)
    tree = roots["cache"] / "kernel-headers" / "linux-headers-6.1.0-56-amd64"
    assert h.kind == "distribution"
    assert h.path == tree
    assert h.env == {"BCC_KERNEL_SOURCE": str(tree)}
    assert h.description.startswith(
        "linux-headers-6.1.0-56-amd64 + linux-headers-6.1.0-56-common (the host's distribution headers, "
        f"not {RELEASE}; ")
    # Both halves resolve through the one tree.
    resolved = {
        "include/generated/autoconf.h": arch / "include/generated/autoconf.h",
        "include/config/auto.conf": arch / "include/config/auto.conf",
        "include/linux/skbuff.h": common / "include/linux/skbuff.h",
        "include/uapi/linux/bpf.h": common / "include/uapi/linux/bpf.h",
        "include/net/dropreason.h": common / "include/net/dropreason.h",
        "arch/x86/include/generated/asm/cpufeaturemasks.h":
            arch / "arch/x86/include/generated/asm/cpufeaturemasks.h",
        "arch/x86/include/generated/uapi/asm/unistd_64.h":
            arch / "arch/x86/include/generated/uapi/asm/unistd_64.h",
        "arch/x86/include/asm/ptrace.h": common / "arch/x86/include/asm/ptrace.h",
        "arch/x86/include/uapi/asm/ptrace.h": common / "arch/x86/include/uapi/asm/ptrace.h",
        "arch/x86/Makefile": common / "arch/x86/Makefile",
        "Module.symvers": arch / "Module.symvers",
        "Makefile": arch / "Makefile",  # in both: the arch package's comes first
    }
    for rel, target in resolved.items():
        assert (tree / rel).resolve() == target.resolve(), rel
    assert (tree / "include/generated/autoconf.h").read_text() == "/* 6.1.0-56 arch */\n"
    assert (tree / "include/linux/skbuff.h").read_text() == "/* 6.1.0-56 common */\n"
    # Directories held by both packages are real directories; the rest are symlinks.
    for rel in ("include", "arch", "arch/x86", "arch/x86/include"):
        assert (tree / rel).is_dir() and not (tree / rel).is_symlink(), rel
    for rel in ("include/generated", "include/config", "include/linux", "include/uapi",
                "arch/x86/include/generated", "arch/x86/include/asm", "arch/x86/include/uapi"):
        assert (tree / rel).is_symlink(), rel
    # Nothing outside the cache was touched, and no temporary directory is left behind.
    assert snapshot(roots["usr_src"]) == before
    assert [p.name for p in (roots["cache"] / "kernel-headers").iterdir()] == [tree.name]


def test_newest_version_chosen_numerically(roots):
    debian_pair(roots["usr_src"], "6.1.0-9")
    debian_pair(roots["usr_src"], "6.1.0-56")
    h = find(roots)
    assert h.path == roots["cache"] / "kernel-headers" / "linux-headers-6.1.0-56-amd64"
    assert (h.path / "include/linux/skbuff.h").read_text() == "/* 6.1.0-56 common */\n"
    assert (h.path / "include/generated/autoconf.h").read_text() == "/* 6.1.0-56 arch */\n"


@pytest.mark.parametrize("versions, chosen", [
    (["6.1.0-9", "6.1.0-56"], "6.1.0-56"),
    (["6.9.0-1", "6.10.0-1"], "6.10.0-1"),
    (["5.10.0-30", "6.1.0-2"], "6.1.0-2"),
])
def test_newest_version_table(roots, versions, chosen):
    for v in versions:
        debian_pair(roots["usr_src"], v)
    assert find(roots).path.name == f"linux-headers-{chosen}-amd64"


def test_common_without_arch_half_is_ignored(roots):
    debian_pair(roots["usr_src"], "6.1.0-9")
    touch(roots["usr_src"] / "linux-headers-6.1.0-56-common" / "include/linux/skbuff.h")
    assert find(roots).path.name == "linux-headers-6.1.0-9-amd64"


def test_single_full_tree(roots):
    full = roots["usr_src"] / "linux-headers-6.5.0-1-generic"
    touch(full / "include/linux/skbuff.h")
    touch(full / "include/generated/autoconf.h")
    h = find(roots)
    assert h.kind == "distribution"
    assert h.path == roots["cache"] / "kernel-headers" / full.name
    assert (h.path / "include").is_symlink()
    assert (h.path / "include/linux/skbuff.h").resolve() == (full / "include/linux/skbuff.h")


@pytest.mark.parametrize("setup", [
    lambda r: None,  # nothing at all
    lambda r: r["usr_src"].rmdir(),  # no /usr/src
    lambda r: touch(r["usr_src"] / "linux-headers-6.1.0-56-common" / "include/linux/skbuff.h"),
    lambda r: (r["modules"] / RELEASE / "build").mkdir(parents=True),  # empty build dir
])
def test_nothing_found(roots, setup):
    setup(roots)
    with pytest.raises(FoveaError) as exc:
        find(roots)
    assert exc.value.problem.startswith(f"no kernel headers found for {RELEASE}")
    assert "apt-get install linux-headers-amd64" in exc.value.hint
    assert "linux-headers-amd64" in str(exc.value)
    assert not (roots["cache"] / "kernel-headers").exists()


def test_second_call_reuses_tree(roots):
    debian_pair(roots["usr_src"], "6.1.0-56")
    first = find(roots)
    marker = touch(first.path / "include" / "reused-marker")
    before = snapshot(first.path)
    second = find(roots)
    assert second == first
    assert marker.is_file()
    assert snapshot(first.path) == before
    assert [p.name for p in (roots["cache"] / "kernel-headers").iterdir()] == [first.path.name]
