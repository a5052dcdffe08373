# EasyBackend in a container: HTTP on 8000, gRPC on 9000, WebSocket on 9001.
#   docker build -t easybackend .
#   docker run -p 8000:8000 -p 9000:9000 -p 9001:9001 \
#     -v easybackend-data:/app/conversations -e OPENAI_API_KEY=sk-... easybackend
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TIKTOKEN_CACHE_DIR=/opt/tiktoken

WORKDIR /app

COPY pyproject.toml setup.cfg README.md ./
COPY easybackend ./easybackend
COPY twisted ./twisted
COPY protos ./protos

# Install, fetch the tiktoken encodings into the image (exact token counts
# at run time, with no download), and build Twisted's plugin cache while
# site-packages is still writable.
RUN pip install --no-cache-dir . \
 && python -c "import tiktoken; [tiktoken.get_encoding(n) for n in ('o200k_base', 'cl100k_base')]" \
 && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && useradd --system --uid 10001 --home-dir /app easybackend \
 && mkdir -p /app/conversations \
 && chown easybackend /app/conversations

USER easybackend

VOLUME /app/conversations
EXPOSE 8000 9000 9001

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)" || exit 1

CMD ["twistd", "-n", "--pidfile=", "easybackend"]
