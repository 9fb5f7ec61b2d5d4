# exactlyonce with the PostgreSQL driver and the web console, plus the examples (examples/ is not
# part of the package: it is copied beside it and put on PYTHONPATH).
#
#   docker build -t exactlyonce .
#   docker run --rm -e EXACTLYONCE_DATABASE_URL=... exactlyonce exactlyonce db upgrade
#   docker run --rm -e EXACTLYONCE_BOOTSTRAP_SERVERS=... -e EXACTLYONCE_DATABASE_URL=... \
#       exactlyonce exactlyonce run examples.transfer.service:app    # or examples.ledger.service:app
#   docker run --rm -e ... exactlyonce exactlyonce relay                 # the outbox relay alone
#   docker run --rm -p 8080:8080 -e ... exactlyonce exactlyonce console --host 0.0.0.0
#
# docker-compose.yml builds it for the examples (transfer service, relay, ledger, producer, console).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install the library from a wheel built out of the sources (the migrations
# ship inside it), then drop the sources so the installed package is the one
# imported.
COPY pyproject.toml README.md /src/
COPY exactlyonce /src/exactlyonce
COPY migrations /src/migrations
RUN pip install "/src[postgres,console]" && rm -rf /src

WORKDIR /app
COPY examples /app/examples
ENV PYTHONPATH=/app

RUN useradd --create-home --uid 10001 exactlyonce
USER exactlyonce

CMD ["exactlyonce", "--help"]
