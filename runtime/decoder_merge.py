"""Merge a span's consecutive generation segments into one graph, so a node runs one session.

Packages stay cut at every block boundary (fine placement, files fetched and hashed alone), but a
chain of sessions costs a fixed overhead per session and step (measured on SmolLM2: see
docs in exporter/decoder_export.py); one merged session does not pay it.

Segment k's internal names (nodes, initializers, intermediate values) get the prefix ``s{k}/``;
the interface names (``attention_mask``, ``position_ids``, ``past.*``, ``present.*``,
``hidden.*``) are unique across a package already and are kept, so ``hidden.{L}`` made by one
segment feeds the next directly and stops being a graph output.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from runtime.errors import ModelLoadError

# protobuf cannot serialise 2 GiB; a bigger span keeps one session per segment
MAX_MERGED_BYTES = 1_800_000_000
SHARED_INPUTS = ("attention_mask", "position_ids")


def can_merge(folder: Path, files: list[str], external: list[list[str]]) -> bool:
    size = 0
    for name, extra in zip(files, external, strict=True):
        size += sum((folder / f).stat().st_size for f in [name, *extra])
    return size <= MAX_MERGED_BYTES


def merge_segment_files(paths: list[Path]) -> bytes:
    """The serialised merged model of segment files given in layer order."""
    models = [onnx.load(str(p)) for p in paths]
    merged = merge_segments(models)
    del models
    return merged.SerializeToString()


def merge_segments(models: list[onnx.ModelProto]) -> onnx.ModelProto:
    """One model computing the segments in order; the given models are consumed (renamed, their
    weights moved into the result)."""
    if not models:
        raise ModelLoadError("nothing to merge: a span needs at least one segment")
    if len(models) == 1:
        return models[0]
    opsets: dict[str, int] = {}
    for model in models:  # quantised segments add com.microsoft; versions must agree
        for entry in model.opset_import:
            domain = entry.domain or "ai.onnx"
            if opsets.setdefault(domain, entry.version) != entry.version:
                raise ModelLoadError(
                    f"segments import {domain} at versions {opsets[domain]} and {entry.version}; "
                    "segments of one package are exported with one opset"
                )
    # filled in place: building a GraphProto and handing it to make_model copies every weight
    merged = onnx.ModelProto(ir_version=models[0].ir_version, producer_name="onnx-appliance")
    merged.opset_import.extend(
        onnx.helper.make_opsetid("" if d == "ai.onnx" else d, v) for d, v in opsets.items()
    )
    graph = merged.graph
    graph.name = "merged"
    final_outputs: list[onnx.ValueInfoProto] = []
    inputs_seen: set[str] = set()
    interface: set[str] = set()
    for model in models:
        interface.update(v.name for v in model.graph.input)
        interface.update(v.name for v in model.graph.output)
    for k, model in enumerate(models):
        _rename(model.graph, f"s{k}/", interface)
        for value in model.graph.input:
            produced_before = any(value.name == o.name for o in final_outputs)
            if value.name not in inputs_seen and not produced_before:
                graph.input.append(value)
                inputs_seen.add(value.name)
        # the hidden state handed on becomes internal; present.* stay outputs
        final_outputs = [o for o in final_outputs if not _consumed(o.name, model.graph)]
        final_outputs.extend(model.graph.output)
        graph.initializer.extend(model.graph.initializer)
        del model.graph.initializer[:]  # one copy of the weights at a time, not two
        graph.sparse_initializer.extend(model.graph.sparse_initializer)
        graph.node.extend(model.graph.node)
        graph.value_info.extend(model.graph.value_info)
    # the last segment's main output first, as in a single segment
    main = models[-1].graph.output[0].name
    graph.output.extend(sorted(final_outputs, key=lambda o: o.name != main))
    return merged


def _consumed(name: str, graph: onnx.GraphProto) -> bool:
    return name.startswith("hidden.") and any(v.name == name for v in graph.input)


def _rename(graph: onnx.GraphProto, prefix: str, keep: set[str]) -> None:
    """Prefix every name not in ``keep`` (in place); subgraphs are refused: none are exported."""

    def new(name: str) -> str:
        return name if not name or name in keep else prefix + name

    for node in graph.node:
        if any(a.HasField("g") or len(a.graphs) for a in node.attribute):
            raise ModelLoadError(
                f"node {node.name or node.op_type} holds a subgraph; such segments are not "
                "merged (load them as a chain)"
            )
        node.name = new(node.name) if node.name else node.name
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]
    for init in graph.initializer:
        init.name = new(init.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = new(sparse.values.name)
        sparse.indices.name = new(sparse.indices.name)
    for info in graph.value_info:
        info.name = new(info.name)
