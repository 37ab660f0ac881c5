"""A tiny random-weight Llama saved as a Hugging Face folder with a real tokenizer.json and chat
template, and its generation package, for tests of the exporter, nodes and coordinator.

4 layers, hidden 64, 4 attention heads sharing 2 KV heads (GQA), a byte-level BPE vocabulary of
a few hundred tokens. The weights are drawn from a fixed seed and scaled so the logits are
decisive (top-1/top-2 gaps well above the verification's near-tie threshold).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from exporter.generation_export import GenerationExportResult, export_generation

LAYERS = 4
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
VOCAB_TARGET = 384
CONTEXT = 1024
EMBED_STD = 0.3
WEIGHT_STD = 0.1
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# the SmolLM2 / ChatML template: the package's chat_template.jinja renders with it
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Explain why the sky is blue. Sunlight scatters in the air.",
    "Écris une phrase en français: l'été à la mer, c'est très agréable.",
    "A robot learns to paint pictures of the sea and the old lighthouse.",
    "Regular exercise makes the heart strong and the mind calm.",
    "Make a cup of tea: boil the water, add the leaves, wait, then pour.",
]
GENERATION_CONFIG = {
    "bos_token_id": 1,
    "eos_token_id": [2, 0],
    "pad_token_id": 0,
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.9,
}


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences (deterministic), with ChatML specials."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def make_tiny_llama_folder(path: Path, seed: int = 0) -> Path:
    """Save the tiny Llama (config, weights, tokenizer.json, chat template, generation config)
    into ``path`` and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=len(tokenizer),
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # default init (std 0.02) gives near-uniform logits; wider weights make them decisive
        for name, param in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                param.normal_(0.0, EMBED_STD)
            elif param.ndim == 2:
                param.normal_(0.0, WEIGHT_STD)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    transformers.GenerationConfig(**GENERATION_CONFIG).save_pretrained(path)
    return path


def export_tiny_generation_package(
    repo: Path, name: str = "tiny-llm", *, source: Path | None = None, **options: Any
) -> Path:
    """Export the tiny Llama (made under ``repo``'s parent unless ``source`` is given) into
    ``repo`` as a generation package; ``options`` go to ``export_generation``."""
    result = export_tiny_generation(repo, name, source=source, **options)
    assert result.folder is not None
    return result.folder


def export_tiny_generation(
    repo: Path, name: str = "tiny-llm", *, source: Path | None = None, **options: Any
) -> GenerationExportResult:
    repo = Path(repo)
    if source is None:
        source = make_tiny_llama_folder(repo.parent / f"{name}-source")
    return export_generation(source, repo, name, **options)


@functools.cache
def shared_tiny_package(stages: int = 2) -> Path:
    """The repository of one tiny-llm package exported once per test process (read-only for
    the tests: copy it to change it), so several test modules pay for one export."""
    root = Path(tempfile.mkdtemp(prefix="tiny-llm-"))
    atexit.register(shutil.rmtree, root, True)
    export_tiny_generation_package(root / "repo", "tiny-llm", stages=stages)
    return root / "repo"
