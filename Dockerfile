# batchproxy's image: `docker build -t batchproxy:0.1.0 .` (docker-compose.yml builds it too).
# It needs BuildKit (Docker 23 and later build with it; Docker 20.10: DOCKER_BUILDKIT=1), for
# the optional pip secrets below.
#
# Two stages: the first compiles the Cython core and generates the protobuf modules (it needs
# a C compiler) into a virtual environment; the second copies only that environment onto the
# same base, so the image carries no compiler, no sources and no build tools. Both stages use
# the same base image and the same /opt/venv path, so the copied environment works as is.
#
# BASE is any Debian-like image with Python 3.11 or later: python:3.11-slim by default;
# `make test-docker` passes one made from Debian's own packages (Debian's python3, which
# lacks the C headers: the build stage adds python3-dev then).
ARG BASE=python:3.11-slim
# The build stage's base: BASE itself unless told otherwise. `make test-docker` passes BASE
# with the compiler already installed (cached between its runs), which skips the apt step.
ARG BUILD_BASE=${BASE}

FROM ${BUILD_BASE} AS build
RUN if ! command -v cc >/dev/null || ! test -e \
        "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h"; \
    then apt-get update \
        && apt-get install -y --no-install-recommends build-essential \
        && if ! test -e \
             "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h"; \
           then apt-get install -y --no-install-recommends python3-dev; fi \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN python3 -m venv /opt/venv
WORKDIR /src
# Only what the package is built from; .dockerignore keeps local builds (*.so, *.c, generated
# *_pb2.py) out, so they are made afresh here for this image's Python.
COPY pyproject.toml setup.py README.md ./
COPY src ./src
# pip's configuration and CA bundle, for a build behind a private index or a proxy that
# re-signs TLS (`docker build --secret id=pip.conf,src=... --secret id=pip-ca,src=...`): secrets
# are mounted for this one step and are in no layer. Without them pip uses PyPI as usual.
# The last command fails the build if the compiled core is missing (it would otherwise fall
# back to the slower pure-Python core with only a warning at start-up).
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=pip-ca,target=/run/secrets/pip-ca \
    /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/python -c \
       "import batchproxy.codec as c; assert c.IMPLEMENTATION == 'cython', c.IMPLEMENTATION"

FROM ${BASE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/venv /opt/venv
# A numeric user, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin batchproxy
USER 10001
# 8500 gRPC (TFS's port); 8501 REST, with /metrics, /healthz and /readyz.
EXPOSE 8500 8501
ENTRYPOINT ["batchproxy"]
# Without --replica or --replicas_dns the proxy starts two local reference replicas (a demo);
# docker-compose.yml and the Kubernetes manifests name real TFS replicas.
CMD ["serve", "--port", "8500", "--rest_api_port", "8501"]
