"""Chat / instruction data for supervised fine-tuning (``tokenize-stage run --sft``).

Each jsonl line is one conversation, in one of these schemas::

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "...", "system": "..." (optional)}
    {"instruction": "...", "input": "..." (optional), "output": "..."}     (alpaca)

The conversation is rendered with a chat template into pieces of text, each either prompt or
target: only assistant replies are targets. Tokens of prompt pieces are stored negated, InternLM's
convention (its tools/alpaca_tokenizer.py): the model reads abs(id) and a negative id is never a
target. Shards of SFT data therefore hold int32 tokens.

Templates: the tokenizer's own ``chat_template`` (from the ``tokenizer_config.json`` beside the
tokenizer file, as Hugging Face stores it) when there is one, else ``DEFAULT_TEMPLATE``, InternLM's
chat format::

    <|System|>:{system}\\n<|User|>:{user}\\n<|Bot|>:{assistant}\\n

where everything but ``{assistant}\\n`` is prompt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROLES = ("system", "user", "assistant")
# InternLM's role headers (tools/alpaca_tokenizer.py uses <|User|>: and <|Bot|>:).
DEFAULT_HEADERS = {"system": "<|System|>:", "user": "<|User|>:", "assistant": "<|Bot|>:"}
DEFAULT_TEMPLATE = "default"
TOKENIZER_CONFIG = "tokenizer_config.json"
SCHEMAS = "'messages', 'prompt'/'response' or 'instruction'/'output'"


class ChatTemplateError(ValueError):
    """A chat template that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]

    @property
    def characters(self) -> int:
        return sum(len(m.content) for m in self.messages)


def parse_conversation(record: dict) -> Conversation | str:
    """The conversation of one jsonl record, or the reason it is not one."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        parsed = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                return f"messages[{index}] is not an object"
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                return f"messages[{index}].role is {role!r}, expected one of {', '.join(ROLES)}"
            if not isinstance(content, str):
                return f"messages[{index}].content is {type(content).__name__}, not a string"
            parsed.append(Message(role, content))
    elif "prompt" in record or "response" in record:
        prompt, response, system = record.get("prompt"), record.get("response"), record.get("system")
        if not isinstance(prompt, str) or not isinstance(response, str):
            return "'prompt' and 'response' must both be strings"
        if system is not None and not isinstance(system, str):
            return "'system' must be a string"
        parsed = [Message("system", system)] if system else []
        parsed += [Message("user", prompt), Message("assistant", response)]
    elif "instruction" in record or "output" in record:
        instruction, extra, output = record.get("instruction"), record.get("input", ""), record.get("output")
        if not all(isinstance(v, str) for v in (instruction, extra, output)):
            return "'instruction', 'input' and 'output' must be strings"
        # alpaca_tokenizer.py's prompt: the instruction, then the input on its own line when given.
        prompt = f"{instruction}\n{extra}" if extra else instruction
        parsed = [Message("user", prompt), Message("assistant", output)]
    else:
        return f"no {SCHEMAS} fields (keys: {', '.join(sorted(record))[:200]})"
    if not any(m.role == "assistant" for m in parsed):
        return "no assistant message: nothing to train on"
    return Conversation(tuple(parsed))


class DefaultTemplate:
    name = DEFAULT_TEMPLATE

    def pieces(self, conversation: Conversation) -> list[tuple[str, bool]]:
        """(text, is_target) pieces; only an assistant's reply and its newline are targets."""
        pieces = []
        for message in conversation.messages:
            header = DEFAULT_HEADERS[message.role]
            if message.role == "assistant":
                pieces += [(header, False), (message.content + "\n", True)]
            else:
                pieces.append((f"{header}{message.content}\n", False))
        return pieces


class JinjaTemplate:
    """A Hugging Face chat template. Assistant spans are found by rendering growing prefixes of
    the conversation: the reply is what rendering it adds after the generation prompt."""

    def __init__(self, source: str, path: Path, eos_token: str) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(f"{path}: chat_template: {message}")

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = raise_exception
        try:
            self._template = environment.from_string(source)
        except TemplateError as error:
            raise ChatTemplateError(f"{path}: chat_template does not parse ({error})") from error
        self._error = TemplateError
        self.path = path
        self.name = f"{path.name}:chat_template"
        # The stage adds BOS itself (--no-bos to leave it out): the template's bos_token renders as
        # nothing, so that a document never starts with two.
        self._bos, self._eos = "", eos_token

    def _render(self, messages: Sequence[Message], generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except self._error as error:
            raise ChatTemplateError(f"{self.path}: chat_template failed to render ({error})") from error

    def pieces(self, conversation: Conversation) -> list[tuple[str, bool]]:
        messages = conversation.messages
        pieces: list[tuple[str, bool]] = []
        done = ""
        for index, message in enumerate(messages):
            if message.role != "assistant":
                continue
            before = self._render(messages[:index], generation_prompt=True)
            through = self._render(messages[: index + 1], generation_prompt=False)
            if not before.startswith(done) or not through.startswith(before):
                raise ChatTemplateError(
                    f"{self.path}: chat_template renders a conversation's beginning differently once "
                    "more messages follow; the reply spans cannot be found (use --chat-template default)"
                )
            pieces += [(before[len(done) :], False), (through[len(before) :], True)]
            done = through
        rest = self._render(messages, generation_prompt=False)
        if not rest.startswith(done):
            raise ChatTemplateError(f"{self.path}: chat_template is not stable under appending messages")
        pieces.append((rest[len(done) :], False))
        return [(text, target) for text, target in pieces if text]

    @property
    def eos_text(self) -> str:
        return self._eos


def _token_text(value) -> str:
    """tokenizer_config.json spells special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def find_tokenizer_template(tokenizer_path: str | None) -> Path | None:
    """The tokenizer_config.json beside the tokenizer file when it holds a chat_template."""
    if tokenizer_path is None:
        return None
    config = Path(tokenizer_path).resolve().parent / TOKENIZER_CONFIG
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(data, dict) and data.get("chat_template") else None


def load_template(choice: str, tokenizer_path: str | None) -> DefaultTemplate | JinjaTemplate:
    """``choice``: "auto" (the tokenizer's template when it has one, else the default),
    "default", or "tokenizer" (an error when the tokenizer has none)."""
    if choice not in ("auto", "default", "tokenizer"):
        raise ChatTemplateError(f"--chat-template {choice!r}: expected auto, default or tokenizer")
    config = find_tokenizer_template(tokenizer_path) if choice != "default" else None
    if config is None:
        if choice == "tokenizer":
            raise ChatTemplateError(
                f"--chat-template tokenizer: no {TOKENIZER_CONFIG} with a chat_template beside "
                f"{tokenizer_path or 'the byte-level tokenizer'}"
            )
        return DefaultTemplate()
    data = json.loads(config.read_text(encoding="utf-8"))
    source = data["chat_template"]
    if isinstance(source, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
        if not isinstance(source, str):
            raise ChatTemplateError(f"{config}: chat_template is a list without a 'default' template")
    return JinjaTemplate(source, config, _token_text(data.get("eos_token")))


def template_identity(choice: str, tokenizer_path: str | None) -> dict:
    """What the manifest records of the template, so that a rerun with another one is refused."""
    template = load_template(choice, tokenizer_path)
    if isinstance(template, DefaultTemplate):
        return {"chat_template": DEFAULT_TEMPLATE}
    digest = hashlib.sha256(template.path.read_bytes()).hexdigest()
    return {"chat_template": str(template.path), "sha256": digest}


def encode_conversations(
    conversations: Sequence[Conversation],
    template: DefaultTemplate | JinjaTemplate,
    encode_batch,
    bos: int | None,
    eos: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 token ids with prompt tokens negated, per-conversation lengths), BOS first and
    EOS last when given (EOS is a target: the model learns to stop; not added when the template
    already ends the text with it)."""
    all_pieces = [template.pieces(c) for c in conversations]
    texts = [text for pieces in all_pieces for text, _ in pieces]
    flat, lengths = encode_batch(texts) if texts else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    targets = np.repeat(
        np.fromiter((t for pieces in all_pieces for _, t in pieces), dtype=bool, count=len(texts)), lengths
    )
    signed = np.where(targets, flat, -flat)
    ends = np.cumsum(lengths)
    eos_text = getattr(template, "eos_text", "")
    out, out_lengths, piece = [], [], 0
    for pieces in all_pieces:
        start = int(ends[piece - 1]) if piece else 0
        piece += len(pieces)
        body = signed[start : int(ends[piece - 1]) if piece else 0]
        parts = [np.array([bos], np.int64)] if bos is not None else []
        parts.append(body)
        ends_with_eos = bool(eos_text) and bool(pieces) and pieces[-1][0].endswith(eos_text)
        if eos is not None and not ends_with_eos:
            parts.append(np.array([eos], np.int64))
        document = np.concatenate(parts)
        out.append(document)
        out_lengths.append(len(document))
    flat_out = np.concatenate(out) if out else np.zeros(0, np.int64)
    return flat_out, np.asarray(out_lengths, dtype=np.int64)
