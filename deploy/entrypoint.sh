#!/bin/sh
# The image's entrypoint: become `kandinsky-trt serve` on the mounted artifacts.
#   docker run --gpus 1 -v ARTIFACTS:/artifacts:ro IMAGE [serve flags]
# serve writes the model repository, starts tritonserver behind its HTTP front (request-size,
# connection and timeout bounds; HTTP disconnects cancel their requests), watches the model's stub
# process (readiness false while it is dead, then reloaded), keeps the shared memory private, and
# prints "serving" only when ready. It fails (and so the container) on a missing or invalid
# manifest; a plan built with another TensorRT fails at model load, so such a pod never turns ready.
# `exec`: serve is the process Kubernetes signals; on SIGTERM it stops tritonserver gracefully
# (in-flight requests get --exit-timeout seconds) and exits 0.
set -eu
exec kandinsky-trt serve --artifacts "${KANDINSKY_ARTIFACTS:-/artifacts}" \
    --backend "${KANDINSKY_BACKEND:-trt}" --device "${KANDINSKY_DEVICE:-cuda}" \
    --instances "${KANDINSKY_INSTANCES:-1}" "$@"
