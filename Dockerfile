# wecast serve in a container: the source document's HTTP API on port 9898, the scheduler, data in a volume.
#   docker build -t wecast .
#   docker run -p 9898:9898 --restart on-failure -e WECAST_API_KEY=<a long random key> \
#              -v wecast-data:/app/data wecast
# Inside a container the server must listen on 0.0.0.0, so it refuses to start without WECAST_API_KEY.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first (read from pyproject.toml), in a layer of their own: editing the code does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
# Then the code (with its message catalogs, engine/locale/*/LC_MESSAGES/*.mo), without touching the dependencies.
COPY engine ./engine
COPY storage ./storage
RUN pip install --no-deps .

COPY config.yaml ./config.yaml
COPY campaigns ./campaigns

# Run unprivileged; the database, the sandbox state and anything else written lives in /app/data.
RUN useradd --create-home --uid 10001 wecast && mkdir -p /app/data && chown wecast:wecast /app/data
USER wecast
VOLUME ["/app/data"]

EXPOSE 9898
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9898/healthz', timeout=2)"

# SIGTERM (docker stop) shuts down gracefully: in-flight sends finish and are recorded.
STOPSIGNAL SIGTERM
CMD ["wecast", "serve", "--host", "0.0.0.0", "--port", "9898"]
