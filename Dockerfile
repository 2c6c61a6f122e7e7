# Warden: one image for all four services; the command picks the service, e.g.
#   docker run warden:dev gateway
# Settings come from PS_* variables. Keys default to /data (mount them there).

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY libs libs
COPY services services
# Build wheels for Warden and all its dependencies, so the final image needs no compiler;
# the versions are those of requirements.lock, which CI tests.
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c requirements.lock .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PS_HOMESERVER_SIGNING_KEY_PATH=/data/signing.key \
    PS_HOMESERVER_EVENT_SIGNING_KEY_PATH=/data/event_signing.key
# A fixed numeric uid so Kubernetes' runAsNonRoot can verify it and fsGroup can match.
RUN groupadd --system --gid 10001 warden \
 && useradd --system --uid 10001 --gid warden --home-dir /data --create-home \
      --shell /usr/sbin/nologin warden
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels warden \
 && rm -rf /wheels
USER 10001:10001
WORKDIR /data
# 8080: gateway API; 8081: /livez, /readyz, /metrics (every service).
EXPOSE 8080 8081
ENTRYPOINT ["warden"]
CMD ["gateway"]
