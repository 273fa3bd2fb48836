# batchproxy's image: `docker build -t batchproxy:0.1.0 .` (docker-compose.yml builds it too).
#
# Two stages: the first compiles the Cython core and generates the protobuf modules (it needs
# a C compiler) into a virtual environment; the second copies only that environment onto a
# slim Python, so the image carries no compiler, no sources and no build tools. Both stages
# use the same base image and the same /opt/venv path, so the copied environment works as is.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
WORKDIR /src
# Only what the package is built from; .dockerignore keeps local builds (*.so, *.c, generated
# *_pb2.py) out, so they are made afresh here for this image's Python.
COPY pyproject.toml setup.py README.md ./
COPY src ./src
# The last command fails the build if the compiled core is missing (it would otherwise fall
# back to the slower pure-Python core with only a warning at start-up).
RUN /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/python -c \
       "import batchproxy.core as c; assert c.IMPLEMENTATION == 'cython', c.IMPLEMENTATION"

FROM ${PYTHON_IMAGE}
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
