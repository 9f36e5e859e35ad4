# One image for every paysentinel service; the command picks the role
# (worker, api, webhooks, simulator, db upgrade).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY . /src
RUN pip install /src \
    && rm -rf /src \
    && useradd --create-home --uid 10001 --user-group paysentinel

USER paysentinel
WORKDIR /home/paysentinel
ENV PAYSENTINEL_HOST=0.0.0.0

EXPOSE 8000 8001 8002
ENTRYPOINT ["paysentinel"]
CMD ["--help"]
