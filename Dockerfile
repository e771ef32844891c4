# The Fovea agent image: Debian bookworm, bcc from Debian (python3-bpfcc), the
# distribution's kernel headers as a fallback for hosts that have none, and the
# agent in a virtual environment that sees bcc through --system-site-packages.
#
#   docker build -t ghcr.io/fovea-dev/fovea:0.1.0 .
#
# The base is pinned to a dated Debian release; pin it by digest too when you
# publish (docker buildx imagetools inspect debian:<tag>) so rebuilds are exact.
ARG DEBIAN=debian:bookworm-20241111-slim

FROM ${DEBIAN} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-bpfcc \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY capture ./capture
COPY bpf ./bpf
RUN python3 -m venv --system-site-packages /opt/fovea \
 && /opt/fovea/bin/pip install --no-cache-dir --disable-pip-version-check . \
 && /opt/fovea/bin/python -c "import agent, bcc, pyroute2, kubernetes"

FROM ${DEBIAN}
# python3-bpfcc brings libbpfcc (with its clang/LLVM); linux-headers-<arch> is the
# fallback when the node's /lib/modules and /usr/src (mounted from the host) have none;
# captures use libpcap, and their metadata bundle ss (iproute2), nft, conntrack and nsenter.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-bpfcc "linux-headers-$(dpkg --print-architecture)" \
      libpcap0.8 iproute2 nftables conntrack \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc /usr/share/man \
 # nothing in the image may gain privileges on exec: the DaemonSet gives the agent its capabilities
 && find / -xdev -type f -perm /6000 -exec chmod a-s {} +
COPY --from=build /opt/fovea /opt/fovea
ENV PATH=/opt/fovea/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# Root because loading eBPF needs it; the DaemonSet drops every capability but the
# ones docs/security.md lists, and mounts only what the agent reads.
USER 0:0
EXPOSE 9810
ENTRYPOINT ["fovea"]
CMD ["agent"]
