"""Which tensor of an fp16 graph corresponds to which tensor of the fp32 graph of the same checkpoint.

Names alone do not align them: the fp16 export inserts Casts (the graph's input/output casts, the
fp32 islands) and uses another attention processor (classic attention with an upcast softmax; the
fp32 export keeps PyTorch's SDPA), and both exporters number nodes with graph-wide counters, so
``view_60`` is a different tensor in the two graphs. Each node gets a key instead:

    (module scope, operator, k-th such operator in that scope, position in its op group, output #)

* scope: the torch module path that produced the node — the dynamo exporter's
  ``pkg.torch.onnx.name_scopes`` metadata, or the TorchScript exporter's node-name prefix
  (``/model/down_blocks.0/resnets.0/conv1/Conv``) — relative to the network's model, with the
  ``.module`` level that :class:`~kandinsky_trt.export.precision.Fp32Island` adds removed;
* operator: the aten op of the FX node (dynamo; one FX node may lower to several ONNX nodes, the
  op group) or the ONNX op type (TorchScript), with the node's ONNX op type checked too;
* Casts (``aten._to_copy`` / ONNX ``Cast``) are never keys: they are what the fp16 export adds.

A scope's own nodes (not its children's) are aligned only when both graphs have the same sequence of
operators in it; otherwise (the attention processors) they count as fp16-only: still checked for
non-finite values and |activation|, not for relative error. Shapes must agree at comparison time.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import onnx

ISLAND_CLASS = "kandinsky_trt.export.precision.Fp32Island"
_CASTS = {"aten._to_copy.default", "Cast"}


@dataclass(frozen=True)
class NodeOrigin:
    scope: str  # module path relative to the network's model; "" for the wrapper itself
    op: str  # aten op (dynamo) or ONNX op type (TorchScript)
    group: str  # the FX node (dynamo) or the ONNX node name (TorchScript)


def _strip_islands(scopes: list[str], classes: list[str]) -> str:
    deepest = scopes[-1] if scopes else ""
    for path, cls in zip(scopes, classes):
        if cls == ISLAND_CLASS:
            deepest = deepest.replace(path + ".module", path, 1)
    return deepest


def _relative(path: str) -> str:
    return "" if path in ("", "model") else path.removeprefix("model.")


def dynamo_origin(node: onnx.NodeProto) -> NodeOrigin | None:
    meta = {p.key: p.value for p in node.metadata_props}
    if "pkg.torch.onnx.name_scopes" not in meta:
        return None
    scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
    classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
    op = classes[-1] if classes else node.op_type
    return NodeOrigin(_relative(_strip_islands(scopes[:-1], classes[:-1])), op, scopes[-1])


def torchscript_origin(node: onnx.NodeProto) -> NodeOrigin:
    parts = node.name.split("/")[1:-1] if node.name.startswith("/") else []
    parts = [p for p in parts if p != "module"]  # Fp32Island's child attribute
    return NodeOrigin(_relative(".".join(parts)), node.op_type, node.name or node.output[0])


def is_dynamo(model: onnx.ModelProto) -> bool:
    return any(p.key == "pkg.torch.onnx.name_scopes" for n in model.graph.node[:50] for p in n.metadata_props)


def origins(model: onnx.ModelProto) -> list[NodeOrigin | None]:
    """One origin per node of ``model`` (None where the exporter recorded none)."""
    if is_dynamo(model):
        return [dynamo_origin(n) for n in model.graph.node]
    return [torchscript_origin(n) for n in model.graph.node]


def _keys(model: onnx.ModelProto, found: list[NodeOrigin | None]) -> tuple[dict, dict]:
    """{(scope, op, k, j, output #): value name} and {scope: its operator sequence}."""
    counts: dict[tuple[str, str], int] = {}
    groups: dict[str, tuple[int, int]] = {}  # group -> (k, ONNX nodes seen)
    keys, signatures = {}, {}
    for node, origin in zip(model.graph.node, found):
        if origin is None or origin.op in _CASTS or node.op_type == "Cast":
            continue
        if origin.group not in groups:
            k = counts.get((origin.scope, origin.op), 0)
            counts[(origin.scope, origin.op)] = k + 1
            groups[origin.group] = (k, 0)
            signatures.setdefault(origin.scope, []).append(origin.op)
        k, j = groups[origin.group]
        groups[origin.group] = (k, j + 1)
        for index, value in enumerate(node.output):
            if value:
                keys[(origin.scope, origin.op, k, j, node.op_type, index)] = value
    return keys, signatures


def align(fp16: onnx.ModelProto, reference: onnx.ModelProto) -> dict[str, str]:
    """{fp16 value name: reference value name} for the tensors that correspond (see the module docstring).

    Raises ValueError when the graphs come from different exporters (their scopes cannot be matched).
    """
    if is_dynamo(fp16) != is_dynamo(reference):
        names = {True: "dynamo", False: "legacy (TorchScript)"}
        raise ValueError(f"reference: expected a graph from the fp16 graph's exporter ({names[is_dynamo(fp16)]}), "
                         f"found one from {names[is_dynamo(reference)]}: export both with the same --exporter")
    keys16, sig16 = _keys(fp16, origins(fp16))
    keys32, sig32 = _keys(reference, origins(reference))
    return {value: keys32[key] for key, value in keys16.items()
            if key in keys32 and sig16.get(key[0]) == sig32.get(key[0])}
