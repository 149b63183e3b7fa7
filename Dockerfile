# syntax=docker/dockerfile:1
#
# imm-router image: docker build -t imm-router:0.1.0 .
#
# Runs as UID/GID 10001 and writes nothing outside /tmp, so it works with readOnlyRootFilesystem
# (mount an emptyDir at /tmp, as the Helm chart does). Defaults live in /etc/imm-router: the shipped
# rules/, templates/ and router.example.yaml as router.yaml; the chart mounts its own over them.

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: a self-contained virtualenv at the path it will run from -------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/imm-router

WORKDIR /src
# README.md* tolerates its absence: pyproject.toml names it only as the long description.
COPY pyproject.toml README.md* ./
COPY router/ ./router/

# Build a wheel of the project, then install it and its dependencies into the venv. pip writes the
# .pyc files here, at build time, so nothing is compiled (or written) at run time.
# tzdata: the router validates `timezone` with zoneinfo; slim Debian images may lack
# /usr/share/zoneinfo, and zoneinfo falls back to this package.
RUN /opt/imm-router/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/imm-router/bin/pip install /wheels/*.whl tzdata \
 && /opt/imm-router/bin/imm-router --help > /dev/null

# --- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="imm-router" \
      org.opencontainers.image.description="Routes Alibaba Cloud IMM events from Kafka to email, DingTalk and Kafka alerts"

RUN groupadd --system --gid 10001 imm-router \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin imm-router

# Same base image and same path as in the builder, so the venv's interpreter links and script
# shebangs stay valid. Everything is root-owned and read-only for the router user.
COPY --from=builder /opt/imm-router /opt/imm-router
COPY rules/ /etc/imm-router/rules/
COPY templates/ /etc/imm-router/templates/
COPY router.example.yaml /etc/imm-router/router.yaml

ENV PATH=/opt/imm-router/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TMPDIR=/tmp

# Relative paths (if any) resolve into the writable /tmp.
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080

# The router handles SIGTERM itself (drains in-flight work, commits, exits 0); no init wrapper.
ENTRYPOINT ["imm-router"]
CMD ["run", "--config", "/etc/imm-router/router.yaml"]
