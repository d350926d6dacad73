# Serving image for adntn-deploy (ONNX Runtime backend; TVM artifacts built for x86-64 too).
#   docker build -t adntn-deploy .
#   docker run --rm -p 8000:8000 -v "$PWD/models:/models:ro" adntn-deploy
# serves every model under /models (an .onnx file, a compiled artifact, or a model repository such as
# the one `adntn-deploy package --format triton` writes) over the Open Inference Protocol v2 on :8000.
# Any other command works too: docker run --rm adntn-deploy inspect 'vgg16-*'
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    ADNTN_TARGETS_DIR=/opt/adntn-deploy/targets
WORKDIR /opt/adntn-deploy
COPY pyproject.toml README.md ./
COPY adntn_deploy ./adntn_deploy
COPY targets ./targets
# the versions are pinned in pyproject.toml, which pip reads from "."
# hadolint ignore=DL3013
RUN pip install ".[onnx,serve,tvm,data]" \
    && useradd --create-home --uid 10001 adntn \
    && mkdir /models && chown adntn /models
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
ENTRYPOINT ["adntn-deploy"]
CMD ["serve", "/models", "--host", "0.0.0.0", "--port", "8000"]
