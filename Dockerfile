# dcud container image, for linux/amd64, linux/arm64 and linux/arm/v7 (docs/container.md):
#
#   docker buildx build --platform linux/amd64,linux/arm64,linux/arm/v7 -t dcud:0.1.0 .
#
# Two stages on the same base image. The builder turns dcud and every dependency into wheels:
# binary wheels from PyPI where they exist, compiled with gcc where they do not (on armv7: cffi
# and msgspec; uvloop is skipped there by its marker in pyproject.toml and dcud uses asyncio's
# own loop). cryptography has manylinux armv7l wheels on PyPI since 44, so no Rust toolchain is
# needed; it is installed from a wheel only (--only-binary) so that a missing wheel fails the
# build plainly instead of half-way through a Rust build. The runtime stage installs those wheels
# into a virtual environment at /opt/dcud (the same path as in the systemd unit) without a
# compiler, and runs dcud as an unprivileged user.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG DEBIAN_FRONTEND=noninteractive
# gcc + libc6-dev: C extensions; libffi-dev + pkg-config: cffi. Not pinned: the base image tracks
# Debian 12 and its security updates, and old package versions leave the archive.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libffi-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dcud ./dcud
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --wheel-dir /wheels --only-binary=cryptography /src \
    && ls -l /wheels

FROM ${PYTHON_IMAGE} AS runtime
ARG DCUD_UID=10001
ARG DCUD_GID=10001
ENV PATH=/opt/dcud/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    PYTHONDONTWRITEBYTECODE=1
# A system user for dcud, in group dialout (gid 20 on Debian, as on the Debian/Ubuntu host that
# owns the serial ports passed in with --device). /etc/dcud is meant to be bind-mounted read-only.
RUN groupadd --system --gid "${DCUD_GID}" dcud \
    && useradd --system --uid "${DCUD_UID}" --gid dcud --groups dialout \
        --home-dir /var/lib/dcud --no-create-home --shell /usr/sbin/nologin dcud \
    && install -d -o dcud -g dcud -m 0750 /var/lib/dcud \
    && install -d -o root -g dcud -m 0750 /etc/dcud
# The wheels are bind-mounted from the builder, so they do not end up in a layer of this image.
# The venv gets no pip of its own: the base image's pip installs into it (--python). No version
# pin: --no-index allows only the wheels just built, which are the pins.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/dcud \
    && PIP_ROOT_USER_ACTION=ignore pip --python /opt/dcud/bin/python install --no-cache-dir --no-index --find-links=/wheels dcud \
    && dcud --help >/dev/null

USER ${DCUD_UID}:${DCUD_GID}
WORKDIR /var/lib/dcud
VOLUME ["/var/lib/dcud"]
# 9000: transparent meter port, 9001: config/firmware port, 9002: secondary transparent port.
EXPOSE 9000 9001 9002
# dcud stops gracefully on SIGTERM (docker stop); give it time: docker stop --time 30.
STOPSIGNAL SIGTERM
# No HEALTHCHECK: every port of dcud is a live service (a probe connection would be taken for a
# HES session or a config upload), and there is no systemd watchdog in a container. Health is
# the retained MQTT status topic and the exit status (docs/container.md).
ENTRYPOINT ["dcud", "run", "-c", "/etc/dcud/dcud.toml"]
