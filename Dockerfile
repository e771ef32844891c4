# The Fovea agent image: Debian bookworm, bcc from Debian (python3-bpfcc), the
# distribution's kernel header files as a fallback for hosts that have none, and the
# agent in a virtual environment that sees bcc through --system-site-packages.
#
#   make image        (podman; makes the base with mmdebstrap where no registry answers)
#
# Package downloads use the builder's own pip configuration and CA bundle, passed as
# build secrets (pip.conf, ca.crt, apt.conf) that are mounted for one RUN and never
# stored in a layer. The base is pinned to a dated Debian release; pin it by digest too
# when you publish (skopeo inspect docker://debian:<tag>) so rebuilds are exact.
ARG DEBIAN=debian:bookworm-20241111-slim

# Kernel headers: linux-headers-<arch> pulls gcc, binutils and perl, which bcc never
# uses; only the header files bcc includes leave this stage.
FROM ${DEBIAN} AS headers
RUN --mount=type=secret,id=apt.conf,target=/etc/apt/apt.conf.d/99build-host \
    apt-get update \
 && apt-get install -y --no-install-recommends "linux-headers-$(dpkg --print-architecture)" \
 && karch=$(case "$(dpkg --print-architecture)" in amd64) echo x86;; *) dpkg --print-architecture;; esac) \
 && mkdir /out && cd /usr/src \
 && for d in linux-headers-*; do \
      mkdir -p "/out/$d/arch" \
      && cp -a "$d/include" "/out/$d/" \
      && if [ -d "$d/arch/$karch" ]; then cp -a "$d/arch/$karch" "/out/$d/arch/"; fi \
      && if [ -f "$d/.config" ]; then cp -a "$d/.config" "/out/$d/"; fi; \
    done \
 # drivers' headers no eBPF program of Fovea includes
 && rm -rf /out/*/include/drm /out/*/include/sound /out/*/include/media \
           /out/*/include/dt-bindings /out/*/include/soc /out/*/include/xen

# The virtual environment, from the hashed lock file only.
FROM ${DEBIAN} AS build
RUN --mount=type=secret,id=apt.conf,target=/etc/apt/apt.conf.d/99build-host \
    apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-wheel
WORKDIR /src
COPY requirements.lock ./
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=ca.crt \
    python3 -m venv --system-site-packages /opt/fovea \
 && /opt/fovea/bin/pip install --no-cache-dir --disable-pip-version-check \
      --require-hashes --no-deps -r requirements.lock \
 # botocore describes some 400 AWS services (28 MB); captures upload to S3 and take
 # credentials from STS (web identity): keep those two and the shared files.
 && find /opt/fovea/lib/python3*/site-packages/botocore/data -mindepth 1 -maxdepth 1 -type d \
      ! -name s3 ! -name sts -exec rm -rf {} + \
 && /opt/fovea/bin/python -c "import pyroute2, kubernetes, azure.storage.blob, boto3; \
      [boto3.client(s, region_name='us-east-1') for s in ('s3', 'sts')]"

# The dependencies without pip: a layer that changes only with the lock file.
FROM build AS venv
RUN /opt/fovea/bin/pip uninstall -q -y pip setuptools

# Fovea itself, apart (under /out), so that a change to it makes a small layer.
FROM build AS fovea
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY capture ./capture
COPY bpf ./bpf
RUN /opt/fovea/bin/pip install --no-cache-dir --disable-pip-version-check --no-index \
      --no-deps --no-build-isolation --prefix /out . \
 && PYTHONPATH="$(echo /out/lib/python3*/site-packages)" /opt/fovea/bin/python -c \
      "import agent.cli.fovea, agent.cli.kubectl, agent.runtime"

FROM ${DEBIAN}
# python3-bpfcc brings libbpfcc (with its clang/LLVM); captures use libpcap, and their
# metadata bundle ss (iproute2), iptables, nft, conntrack and nsenter (util-linux).
RUN --mount=type=secret,id=apt.conf,target=/etc/apt/apt.conf.d/99build-host \
    apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-bpfcc \
      libpcap0.8 iproute2 iptables nftables conntrack util-linux \
 && mkdir -p /usr/share/fovea && dpkg-query -W -f='${Package}=${Version}\n' > /usr/share/fovea/debian-packages.txt \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/log/* \
           /usr/share/doc /usr/share/man /usr/share/locale \
 # nothing in the image may gain privileges on exec: the DaemonSet gives the agent its capabilities
 && find / -xdev -type f -perm /6000 -exec chmod a-s {} +
# Found by agent/kernel/headers.py when the host has no headers of its own; out of the
# way of the host directories the chart mounts (/host/lib/modules, /host/usr/src).
COPY --from=headers /out /usr/share/fovea/kernel-headers
COPY --from=venv /opt/fovea /opt/fovea
COPY --from=fovea /out /opt/fovea
ENV PATH=/opt/fovea/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
ARG DEBIAN VERSION=0.1.0 REVISION=unknown SOURCE=https://github.com/fovea-dev/fovea
LABEL org.opencontainers.image.title="fovea" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${DEBIAN}"
# Root because loading eBPF needs it; the DaemonSet drops every capability but the
# ones docs/security.md lists, and mounts only what the agent reads.
USER 0:0
EXPOSE 9810
ENTRYPOINT ["fovea"]
CMD ["agent"]
