"""What an ONNX node reads: its explicit inputs and the tensors its subgraphs (If/Loop/Scan
bodies) read from the enclosing scope. The operator graph, the stage plan and the stage cutter
all need the second half: a stage that holds an If must also receive what its branches read."""

from __future__ import annotations

import onnx


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Every tensor `node` reads, once each: its explicit inputs (empty optional ones left out),
    then the outer-scope tensors its subgraphs read, in the order they first appear."""
    return list(dict.fromkeys([*(t for t in node.input if t), *_outer_scope_inputs(node)]))


def _outer_scope_inputs(node: onnx.NodeProto) -> list[str]:
    found: list[str] = []
    for attr in node.attribute:
        for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
            defined = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for inner in sub.node:
                found += (t for t in node_inputs(inner) if t not in defined)
                defined.update(inner.output)
    return found
