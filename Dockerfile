# One image for every Headwater process: `headwater receiver`, `headwater worker`, `headwater rewards run`
# and the operator CLI (`headwater replay ...`). The command is the container's arguments:
#   docker run --rm -v $PWD/deploy/headwater.compose.toml:/etc/headwater/headwater.toml:ro headwater:0.1.0 receiver
# Configuration is the TOML file at HEADWATER_CONFIG (mount it); see deploy/headwater.compose.toml.

# --- build: install the package and its dependencies into a virtualenv --------------------------------
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A C compiler for the modules setup.py compiles with mypyc (the runtime stage needs none).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/headwater
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY pipeline/ pipeline/
COPY adapters/ adapters/
COPY headwater/ headwater/
RUN /opt/headwater/bin/pip install .

# --- runtime: the virtualenv only, run by an unprivileged user ----------------------------------------
FROM python:3.11.11-slim-bookworm
ENV PATH=/opt/headwater/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HEADWATER_CONFIG=/etc/headwater/headwater.toml
RUN groupadd --system --gid 10001 headwater \
 && useradd --system --uid 10001 --gid headwater --home-dir /var/lib/headwater --create-home \
            --shell /usr/sbin/nologin headwater \
 && mkdir -p /etc/headwater
COPY --from=build /opt/headwater /opt/headwater
# Without a mounted config the image still starts, on the shipped example (its Kafka is 127.0.0.1:9092).
RUN cp "$(python -c 'import pipeline.config as c; print(c.EXAMPLE_CONFIG)')" /etc/headwater/headwater.toml
USER 10001:10001
WORKDIR /var/lib/headwater
# receiver, worker /metrics, rewards dispatcher /metrics
EXPOSE 8080 6066 6067
ENTRYPOINT ["headwater"]
CMD ["--help"]
