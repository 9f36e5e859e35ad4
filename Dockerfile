# One image for every paysentinel service; the command picks the role
# (worker, api, webhooks, simulator, db upgrade).
FROM python:3.11-slim

# No PYTHONDONTWRITEBYTECODE: the worker's workflow sandbox imports the workflow modules
# afresh for every payment it starts or replays, and compiling them from source each time
# costs about four times loading their bytecode (pip compiles it at install).
ENV PYTHONUNBUFFERED=1 \
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
