# Runtime image for adntn-deploy: `docker build -t adntn-deploy .` then
# `docker run --rm adntn-deploy` runs the main job; `docker run --rm adntn-deploy inspect vgg16-*` etc.
# The serving issue extends this image to serve a model mounted at run time.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /opt/adntn-deploy
COPY pyproject.toml README.md ./
COPY adntn_deploy ./adntn_deploy
RUN pip install ".[onnx]" && useradd --create-home --uid 10001 adntn
USER adntn
ENTRYPOINT ["adntn-deploy"]
CMD ["demo"]
