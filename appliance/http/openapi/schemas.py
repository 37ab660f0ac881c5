"""The schemas of request and answer bodies."""

from __future__ import annotations

from typing import Any

from appliance.http.openapi.common import _STR, _obj, _ref
from runtime.datatypes import V2_TO_NUMPY


def _schemas() -> dict[str, Any]:
    tensor_meta = _obj(
        ["name", "datatype", "shape"],
        name=_STR,
        datatype=_STR,
        shape={"type": "array", "items": {"type": "integer", "minimum": -1}},
    )
    datatypes = sorted(V2_TO_NUMPY)
    output_tensor = _obj(
        ["name", "datatype", "shape"],
        name=_STR,
        datatype={"type": "string", "enum": datatypes},
        shape={"type": "array", "items": {"type": "integer", "minimum": 0}},
        data={"type": "array"},
        parameters={"type": "object"},
    )
    return {
        "Error": _obj(["error"], error=_STR),
        "ServerMetadata": _obj(
            ["name", "version", "extensions"],
            name=_STR,
            version=_STR,
            extensions={"type": "array", "items": _STR},
        ),
        "Live": _obj(["live"], live={"type": "boolean", "enum": [True]}),
        "Ready": _obj(["ready"], ready={"type": "boolean"}, error=_STR),
        "TensorMetadata": tensor_meta,
        "ModelMetadata": _obj(
            ["name", "versions", "platform", "inputs", "outputs"],
            name=_STR,
            versions={"type": "array", "items": _STR},
            platform=_STR,
            inputs={"type": "array", "items": _ref("TensorMetadata")},
            outputs={"type": "array", "items": _ref("TensorMetadata")},
            parameters={"type": "object"},
        ),
        "ModelReady": _obj(
            ["name", "version", "ready"], name=_STR, version=_STR, ready={"type": "boolean"}
        ),
        "ModelConfig": _obj(
            ["name", "platform", "max_batch_size", "input", "output"],
            name=_STR,
            platform=_STR,
            backend=_STR,
            max_batch_size={"type": "integer", "minimum": 0},
            input={"type": "array", "items": _ref("ConfigTensor")},
            output={"type": "array", "items": _ref("ConfigTensor")},
            parameters={"type": "object"},
            placement={"type": "object", "nullable": True},
        ),
        "ConfigTensor": _obj(
            ["name", "data_type", "dims"],
            name=_STR,
            data_type={"type": "string", "pattern": "^TYPE_[A-Z0-9]+$"},
            dims={"type": "array", "items": {"type": "integer", "minimum": -1}},
        ),
        "ModelStatistics": _obj(
            ["model_stats"],
            model_stats={
                "type": "array",
                "items": _obj(
                    ["name", "version", "inference_count", "execution_count", "inference_stats"],
                    name=_STR,
                    version=_STR,
                    last_inference={"type": "integer"},
                    inference_count={"type": "integer", "minimum": 0},
                    execution_count={"type": "integer", "minimum": 0},
                    inference_stats={"type": "object"},
                    batch_stats={"type": "array", "items": {"type": "object"}},
                ),
            },
        ),
        "InferInput": _obj(
            ["name", "shape", "datatype"],
            name=_STR,
            shape={"type": "array", "maxItems": 64, "items": {"type": "integer", "minimum": 0}},
            datatype={"type": "string", "enum": datatypes},
            data={
                "type": "array",
                "description": "row-major values, flat or nested (absent for binary data)",
            },
            parameters={
                "type": "object",
                "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
            },
        ),
        "InferRequest": {
            **_obj(
                ["inputs"],
                id=_STR,
                parameters={
                    "type": "object",
                    "properties": {
                        "binary_data_output": {"type": "boolean"},
                        "timeout": {
                            "type": "integer",
                            "minimum": 1,
                            "description": "deadline in microseconds (504 once it passes)",
                        },
                    },
                },
                inputs={"type": "array", "minItems": 1, "items": _ref("InferInput")},
                outputs={
                    "type": "array",
                    "items": _obj(
                        ["name"],
                        name=_STR,
                        parameters={
                            "type": "object",
                            "properties": {"binary_data": {"type": "boolean"}},
                        },
                    ),
                },
            ),
        },
        "InferResponse": _obj(
            ["model_name", "outputs"],
            model_name=_STR,
            model_version=_STR,
            id=_STR,
            parameters={"type": "object"},
            outputs={"type": "array", "items": output_tensor},
        ),
        "Job": _obj(
            ["id", "model", "status", "created", "finished"],
            id=_STR,
            model=_STR,
            status={
                "type": "string",
                "enum": ["queued", "running", "succeeded", "failed", "cancelled"],
            },
            created={"type": "number"},
            finished={"type": "number", "nullable": True},
            error=_STR,
            kind={
                "type": "string",
                "enum": ["infer", "generate", "completions", "chat_completions"],
                "description": "the route it was submitted to: its result is that route's answer",
            },
            result={
                "oneOf": [
                    _ref("InferResponse"),
                    _ref("GenerateResponse"),
                    _ref("Completion"),
                    _ref("ChatCompletion"),
                ]
            },  # fmt: skip
        ),
        "RepositoryIndex": {
            "type": "array",
            "items": _obj(
                ["name", "version", "state", "reason"],
                name=_STR,
                version=_STR,
                state={"type": "string", "enum": ["READY", "UNAVAILABLE"]},
                reason=_STR,
            ),
        },
        "Cluster": _obj(
            ["nodes", "placements", "models", "links"],
            nodes={"type": "array", "items": {"type": "object"}},
            placements={"type": "object"},
            links={
                "type": "array",
                "description": "every link with figures: the coordinator's to each node, and "
                "each node's to the others (probed when first seen, then timed on traffic)",
                "items": _obj(
                    ["from", "to", "to_address", "latency_ms", "throughput_mbit_s", "calls"],
                    **{"from": _STR},
                    to=_STR,
                    to_address=_STR,
                    latency_ms={"type": "number", "nullable": True},
                    throughput_mbit_s={"type": "number", "nullable": True},
                    calls={"type": "integer"},
                    network_s={"type": "number"},
                    bytes={"type": "integer"},
                    probe_latency_ms={"type": "number", "nullable": True},
                    probe_throughput_mbit_s={"type": "number", "nullable": True},
                ),
            },
            models={
                "type": "object",
                "description": "each model's serving version and any version loading or retiring",
                "additionalProperties": _obj(
                    ["serving_version", "serving_digest", "retiring_digests"],
                    serving_version=_STR,
                    serving_digest=_STR,
                    loading_version={"type": "string", "nullable": True},
                    loading_digest={"type": "string", "nullable": True},
                    retiring_digests={"type": "array", "items": _STR},
                ),
            },
        ),
    }
