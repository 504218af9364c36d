# One image for every Headwater process: `headwater receiver`, `headwater worker`, `headwater rewards run`
# and the operator CLI (`headwater replay ...`). The command is the container's arguments:
#   docker run --rm -v $PWD/deploy/headwater.compose.toml:/etc/headwater/headwater.toml:ro headwater:0.1.0 receiver
# Configuration is the TOML file at HEADWATER_CONFIG (mount it); see deploy/headwater.compose.toml.
# The image holds no credential: tenants come from HEADWATER_TENANTS_FILE (a mounted secret), the Kafka
# password from HEADWATER_KAFKA_SASL_PASSWORD(_FILE); see docs/production.md.

# --- build: install the package and its dependencies into a virtualenv --------------------------------
# The base image by digest (a tag can be pushed again; a digest cannot): python:3.11.11-slim-bookworm.
# Update both FROM lines together: `docker buildx imagetools inspect python:3.11.11-slim-bookworm`.
FROM python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5 AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A C compiler for the modules setup.py compiles with mypyc (the runtime stage needs none).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/headwater
WORKDIR /src
# Dependencies (and the build's setuptools and mypy) from hashed pins only, then the package itself,
# built without fetching anything.
COPY requirements.lock ./
RUN /opt/headwater/bin/pip install --require-hashes -r requirements.lock
COPY pyproject.toml setup.py README.md ./
COPY pipeline/ pipeline/
COPY adapters/ adapters/
COPY headwater/ headwater/
RUN /opt/headwater/bin/pip install --no-deps --no-build-isolation . \
 && /opt/headwater/bin/pip uninstall --yes mypy \
 && /opt/headwater/bin/pip check

# --- runtime: the virtualenv only, run by an unprivileged user ----------------------------------------
FROM python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5
ENV PATH=/opt/headwater/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HEADWATER_CONFIG=/etc/headwater/headwater.toml
RUN groupadd --system --gid 10001 headwater \
 && useradd --system --uid 10001 --gid headwater --home-dir /var/lib/headwater --create-home \
            --shell /usr/sbin/nologin headwater \
 && mkdir -p /etc/headwater
COPY --from=build /opt/headwater /opt/headwater
# Without a mounted config the image still starts, on the shipped example (its Kafka is 127.0.0.1:9092)
# stripped of its demo tenants: a receiver on it accepts nothing until tenants are given.
RUN python -c "import pipeline.config as c, sys; \
text = c.EXAMPLE_CONFIG.read_text(); sys.stdout.write(text[:text.index('\n[[tenants]]\n') + 1])" \
    > /etc/headwater/headwater.toml
USER 10001:10001
WORKDIR /var/lib/headwater
# receiver (ingestion), receiver operator port (/metrics), worker /metrics + /health, dispatcher /metrics
EXPOSE 8080 8079 6066 6067
ENTRYPOINT ["headwater"]
CMD ["--help"]
