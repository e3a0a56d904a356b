#!/bin/sh
# The image's entrypoint: write the model repository for the mounted artifacts, then become tritonserver.
#   docker run --gpus 1 -v ARTIFACTS:/artifacts:ro IMAGE [tritonserver flags]
# `kandinsky-trt triton-repo` fails (and so the container) on a missing or invalid manifest; a plan
# built with another TensorRT fails at model load, and --exit-on-error (deploy/render.py) ends the
# server, so such a pod never turns ready. `exec`: tritonserver receives SIGTERM itself.
set -eu
repo="${KANDINSKY_REPO:-/models}"
kandinsky-trt triton-repo --artifacts "${KANDINSKY_ARTIFACTS:-/artifacts}" --out "$repo" \
    --backend "${KANDINSKY_BACKEND:-trt}" --device "${KANDINSKY_DEVICE:-cuda}" \
    --instances "${KANDINSKY_INSTANCES:-1}"
exec tritonserver --model-repository="$repo" "$@"
