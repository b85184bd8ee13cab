"""int8 weights for an exported ONNX file (ONNX Runtime's dynamic quantization), routers kept
in fp32: an int8 router score could flip a token's expert, a change far larger than int8's
rounding of one matmul."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from moee.errors import ConfigError
from moee.export.verify import stamp_onnx

# Ops the scores pass through between a router's matmul and its ArgMax.
_PASS_THROUGH = {"Add", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten"}


def router_nodes(model) -> list[str]:
    """Names of the MatMul / Gemm nodes whose output reaches an ArgMax (the routers) in an
    onnx.ModelProto."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found = []
    for node in model.graph.node:
        if node.op_type != "ArgMax":
            continue
        cur = producer.get(node.input[0])
        while cur is not None and cur.op_type in _PASS_THROUGH:
            cur = producer.get(cur.input[0])
        if cur is not None and cur.op_type in ("MatMul", "Gemm"):
            found.append(cur.name)
    return found


def _named(model) -> None:
    """Give every unnamed node a unique name (quantization excludes nodes by name)."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"moee_node_{i}"
            while node.name in taken:
                node.name += "_"
            taken.add(node.name)


def quantize_int8(source: str | Path, target: str | Path) -> list[str]:
    """Write `source` with int8 weights (activations quantized per batch at run time) to
    `target`; returns the router nodes left in fp32."""
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise ConfigError("int8 export needs onnx and onnxruntime: pip install 'moee[onnx]'"
                          ) from e
    model = onnx.load(str(source))
    _named(model)
    routers = router_nodes(model)
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    root = logging.getLogger()
    level = root.level
    # The quantizer logs advice on the root logger (pre-processing; the integer index tensors
    # it leaves alone, printed as whole protobufs): nothing a user can act on here.
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(model, str(partial), weight_type=QuantType.QInt8,
                         nodes_to_exclude=routers)
        stamp_onnx(partial)  # the int8 weights' own digests replace the fp32 file's
        os.replace(partial, target)
    finally:
        root.setLevel(level)
        partial.unlink(missing_ok=True)
    return routers
