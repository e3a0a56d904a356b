"""A client for the ``kandinsky`` model on ``tritonclient`` (HTTP or gRPC, KServe v2).

:func:`build_inputs` turns one item's fields into tensors as the contract declares them
(datatype and dims from :mod:`~kandinsky_trt.runtime.serve.contract`, never restated), one item per
request (batch dim 1). ``tritonclient`` is imported only here, inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kandinsky_trt.runtime.contract.errors import KandinskyTrtError
from kandinsky_trt.runtime.serve.contract import INPUTS, MODEL_NAME, NUMPY_DTYPES

_SPECS = {t.name: t for t in INPUTS}


class ClientError(KandinskyTrtError, RuntimeError):
    """The server answered with an error, or could not be reached."""


def item_arrays(fields: dict) -> dict[str, np.ndarray]:
    """``{"task": "text2img", "prompt": "a cat", "seed": 0, ...}`` -> batch-1 arrays of the contract's types."""
    arrays = {}
    for name, value in fields.items():
        if value is None:
            continue
        if name not in _SPECS:
            raise ClientError(f"{name}: expected one of the model's inputs {tuple(_SPECS)}, found {name!r}")
        spec = _SPECS[name]
        if spec.datatype == "BYTES":
            arrays[name] = np.array([[str(value).encode("utf-8")]], dtype=object)
        elif spec.dims == (1,):
            arrays[name] = np.array([[value]], dtype=NUMPY_DTYPES[spec.datatype])
        else:
            arrays[name] = np.asarray(value, dtype=NUMPY_DTYPES[spec.datatype])[None]
    return arrays


def read_image(path, mode: str) -> np.ndarray:
    """An image file as the uint8 array sent (``mode`` ``"RGB"``: HxWx3; ``"L"``: an HxW mask), decoded
    by the CLI's own decoder (``processing.images.load_image_file``)."""
    from kandinsky_trt.runtime.processing.images import load_image_file

    try:
        return np.asarray(load_image_file(path, mode, str(path)))
    except KandinskyTrtError as err:
        raise ClientError(str(err)) from None


def _module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ClientError(f"protocol: expected 'http' or 'grpc', found {protocol!r}")
    return module


@dataclass(frozen=True)
class Target:
    url: str  # host:port
    protocol: str = "http"
    timeout_s: float = 600.0


def build_inputs(protocol: str, arrays: dict[str, np.ndarray]) -> list:
    module = _module(protocol)
    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), _SPECS[name].datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def infer(target: Target, arrays: dict[str, np.ndarray], client=None) -> dict[str, np.ndarray]:
    """One request; returns every output the model sent. Errors become :class:`ClientError`."""
    from tritonclient.utils import InferenceServerException

    own = client is None
    try:
        if own:
            client = make_client(target)
        kwargs = {"client_timeout": target.timeout_s} if target.protocol == "grpc" else {}
        result = client.infer(MODEL_NAME, build_inputs(target.protocol, arrays), **kwargs)
        response = result.get_response(as_json=True) if target.protocol == "grpc" else result.get_response()
        return {out["name"]: result.as_numpy(out["name"]) for out in response["outputs"]}
    except InferenceServerException as err:
        raise ClientError(f"server {target.url} ({target.protocol}): {err.message() or err}") from None
    except Exception as err:  # noqa: BLE001 - transport failures (refused, reset, closed) of either library
        raise ClientError(f"server {target.url} ({target.protocol}): no answer, the connection failed "
                          f"({type(err).__name__}: {err})") from None
    finally:
        if own and client is not None:
            client.close()


def make_client(target: Target):
    module = _module(target.protocol)
    if target.protocol == "http":
        return module.InferenceServerClient(target.url, connection_timeout=target.timeout_s,
                                            network_timeout=target.timeout_s)
    return module.InferenceServerClient(target.url)
