"""The coordinator's text side of generation: tokenise, render chat, stream text back.

A generation package holds a ``tokenizer.json`` (read with the ``tokenizers`` library) and a
Hugging Face chat template (jinja2, rendered in a sandbox with the variables and options that
``transformers``' ``apply_chat_template`` gives it), so a coordinator needs neither torch nor
transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from runtime.errors import (
    ChatTemplateError,
    InvalidMessages,
    InvalidStop,
    InvalidText,
    ModelLoadError,
    NoChatTemplate,
)

ROLES = ("system", "user", "assistant")
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 255
REPLACEMENT = "\ufffd"  # what a decode shows for bytes that are not (yet) whole UTF-8


def _show(value: object, limit: int = 60) -> str:
    """A value for an error message, cut so a huge request does not make a huge error."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- chat templates ---


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # as transformers overrides it: jinja's own tojson escapes HTML characters
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant text with it
    (for training masks); rendering only needs the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def compile_chat_template(source: str) -> jinja2.Template:
    """A chat template compiled as transformers compiles it (sandboxed, immutable)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def read_chat_template(path: Path) -> str:
    """The template's text: a ``.jinja`` file, or the ``chat_template`` key of a ``.json``
    (``tokenizer_config.json`` as older transformers saved it; a list of named templates
    gives its ``default``)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".json":
        return text
    raw = json.loads(text).get("chat_template")
    if isinstance(raw, list):
        raw = next((t.get("template") for t in raw if t.get("name") == "default"), None)
    if not isinstance(raw, str):
        raise ModelLoadError(f"{path.name}: holds no chat_template string")
    return raw


def chat_messages(raw: object) -> list[dict[str, str]]:
    """Validated messages as the template gets them: ``[{"role": ..., "content": str}]``.

    Roles: system, user, assistant. Content: a string, or OpenAI's list of ``{"type": "text",
    "text": str}`` parts, joined with newlines. Other keys of a message are ignored.
    """
    if not isinstance(raw, list) or not raw:
        raise InvalidMessages(
            f"messages: must be a non-empty list of {{role, content}} objects, got {_show(raw)}"
        )
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise InvalidMessages(
                f"messages[{i}]: must be an object with role and content, got {_show(message)}"
            )
        role = message.get("role")
        if role not in ROLES:
            raise InvalidMessages(
                f"messages[{i}].role: must be one of {', '.join(ROLES)}, got {_show(role)}"
            )
        messages.append({"role": role, "content": _content_text(i, message.get("content"))})
    return messages


def _content_text(i: int, content: object) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise InvalidMessages(
            f"messages[{i}].content: must be a string or a non-empty list of text parts, "
            f"got {_show(content)}"
        )
    texts = []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else part
            raise InvalidMessages(
                f"{where}.type: only text parts are accepted (this model reads text), "
                f"got {_show(kind)}"
            )
        if not isinstance(part.get("text"), str):
            raise InvalidMessages(f"{where}.text: must be a string, got {_show(part.get('text'))}")
        texts.append(part["text"])
    return "\n".join(texts)


# --- the package's text ---


@dataclass(frozen=True)
class PackageText:
    tokenizer: Tokenizer
    template: jinja2.Template | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # in the manifest's order; the first is the template's

    @classmethod
    def open(
        cls,
        folder: Path,
        tokenizer_file: str,
        chat_template_file: str | None,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
    ) -> PackageText:
        """Read a package's tokenizer and chat template; ModelLoadError names what failed."""
        try:
            tokenizer = Tokenizer.from_file(str(Path(folder) / tokenizer_file))
        except Exception as error:  # tokenizers raises a bare Exception on a bad file
            raise ModelLoadError(
                f"{tokenizer_file}: cannot be read as a tokenizer: {error}"
            ) from error
        template = None
        if chat_template_file is not None:
            try:
                template = compile_chat_template(
                    read_chat_template(Path(folder) / chat_template_file)
                )
            except (OSError, ValueError, jinja2.TemplateError) as error:
                raise ModelLoadError(
                    f"{chat_template_file}: not a usable chat template: {error}"
                ) from error
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        for name, ids in (("bos_token_id", [bos_token_id]), ("eos_token_ids", eos_token_ids)):
            for token in ids:
                if token is not None and not 0 <= token < vocab:
                    raise ModelLoadError(
                        f"{name}: {token} is not a token id of {tokenizer_file} (0..{vocab - 1})"
                    )
        return cls(tokenizer, template, bos_token_id, tuple(eos_token_ids))

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def has_chat_template(self) -> bool:
        return self.template is not None

    def token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokenizer.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no BOS/EOS added: a rendered chat already holds its special
        tokens as text (they are matched there); a plain prompt is taken as it is."""
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        except TypeError:
            # JSON may carry "\ud800": Python keeps the lone surrogate, tokenizers refuses it
            at = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
            if at is None:
                raise
            raise InvalidText(
                f"text: holds a lone surrogate {text[at]!r} at character {at}; only valid "
                "Unicode can be tokenised"
            ) from None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def is_eos(self, token_id: int) -> bool:
        return token_id in self.eos_token_ids

    def render_chat(self, messages: object, add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation, as ``apply_chat_template(..., tokenize=False)``."""
        if self.template is None:
            raise NoChatTemplate(
                "messages: this model has no chat template, so it cannot take a conversation; "
                "send a plain prompt instead (e.g. /v1/completions or generate's text_input)"
            )
        variables: dict[str, Any] = {
            "messages": chat_messages(messages),
            "add_generation_prompt": add_generation_prompt,
            "tools": None,
            "documents": None,
        }
        # as transformers passes its special tokens map: only the tokens that are set
        bos = self.token_text(self.bos_token_id)
        eos = self.token_text(self.eos_token_ids[0]) if self.eos_token_ids else None
        variables.update({k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v})
        try:
            return str(self.template.render(**variables))
        except (jinja2.TemplateError, TypeError, ValueError, LookupError) as error:
            raise ChatTemplateError(
                f"messages: the model's chat template refused the conversation: {error}"
            ) from error

    def detokenizer(
        self, context: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, context, skip_special_tokens)


class IncrementalDetokenizer:
    """Token ids in, newly complete text out, for streaming.

    Decodes the ids since ``prefix`` and emits what lies past the text of the ids up to
    ``read``, only once it does not end in U+FFFD: a token ending inside a multi-byte UTF-8
    character is held until a later one completes it. The ids before ``prefix`` give decoders
    that treat a leading space specially (SentencePiece) their context. Every push + flush,
    concatenated, equals ``decode(all ids)`` (past ``context``: ``decode(context + ids)``
    minus ``decode(context)``); special tokens are skipped as that decode skips them.
    """

    def __init__(
        self, tokenizer: Tokenizer, context: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(context)[-8:]  # a few ids of context suffice: decoders look back little
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=self._skip)) if ids else ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(before) or text.endswith(REPLACEMENT):
            return ""  # a skipped special token, or a character not complete yet
        self._prefix, self._read = self._read, len(self._ids)
        # only the window is decoded again, so the ids kept stay few
        del self._ids[: self._prefix]
        self._read -= self._prefix
        self._prefix = 0
        return text[len(before) :]

    def flush(self) -> str:
        """The text still held (it ends in U+FFFD: bytes no token completed); then empty."""
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(before) :]


# --- stop strings ---


def stop_strings(raw: object) -> list[str]:
    """A request's ``stop``: null, one string or a list of at most 4 (OpenAI's forms), each
    non-empty and shorter than 256 characters."""
    if raw is None:
        return []
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list | tuple) or len(stops) > MAX_STOPS:
        raise InvalidStop(
            f"stop: must be a string or a list of at most {MAX_STOPS} strings, got {_show(raw)}"
        )
    for i, stop in enumerate(stops):
        if not isinstance(stop, str) or not 0 < len(stop) <= MAX_STOP_CHARS:
            raise InvalidStop(
                f"stop[{i}]: must be a non-empty string of at most {MAX_STOP_CHARS} characters, "
                f"got {_show(stop)}"
            )
    return list(stops)


class StopMatcher:
    """Streams text through, cut right before the first stop string (as OpenAI cuts it).

    ``push`` emits the text that can no longer be part of a stop string and holds back a
    suffix that may still become one; on a full match it emits the text before the stop
    string and reports True, and everything after is dropped. ``flush`` at the end of the
    generation gives the held-back text.
    """

    def __init__(self, stop: object) -> None:
        self.stops = stop_strings(stop)
        self.matched: str | None = None  # the stop string found, once found
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        if self.matched is not None:
            return "", True
        buffer = self._held + text
        # the earliest match wins; held text was never a match, so none starts before it
        hits = [(at, stop) for stop in self.stops if (at := buffer.find(stop)) >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda hit: hit[0])
            self._held = ""
            return buffer[:at], True
        keep = self._partial(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial(self, buffer: str) -> int:
        """The length of the longest suffix of ``buffer`` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest
