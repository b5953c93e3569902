"""Chat prompts: a conversation rendered with the model's own chat template (llama.cpp's)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llama_sparsek._binding import c_string, ffi, lib

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


def model_template(model: Any) -> str | None:
    """The GGUF's default chat template (`tokenizer.chat_template`), None if it has none."""
    raw = lib.llama_model_chat_template(model, ffi.NULL)
    return None if raw == ffi.NULL else c_string(raw)


def check_messages(messages: Sequence[Message]) -> None:
    if isinstance(messages, Mapping | str) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] is not a mapping: {message!r}")
        for key in ("role", "content"):
            value = message.get(key)
            if not isinstance(value, str):
                raise ValueError(f"messages[{i}][{key!r}] must be a string, got {value!r}")
            if "\0" in value:
                raise ValueError(f"messages[{i}][{key!r}] contains a NUL character")
        if not message["role"]:
            raise ValueError(f"messages[{i}] has an empty role")


def render(template: str, messages: Sequence[Message], *, add_assistant: bool = True) -> str:
    """The conversation as the template formats it, ending with the assistant's turn opening.

    llama.cpp recognises its built-in templates by name ("chatml", "llama3", ...) or by their
    Jinja source (a GGUF's `tokenizer.chat_template`); it does not run arbitrary Jinja."""
    check_messages(messages)
    if "\0" in template:
        raise ValueError("the chat template contains a NUL character")
    # the C strings must stay alive while llama.cpp reads them
    strings = [
        (ffi.new("char[]", m["role"].encode()), ffi.new("char[]", m["content"].encode()))
        for m in messages
    ]
    chat = ffi.new("struct llama_chat_message[]", len(messages))
    for item, (role, content) in zip(chat, strings, strict=True):
        item.role, item.content = role, content
    tmpl = template.encode()
    size = 2 * sum(len(m["content"]) + len(m["role"]) for m in messages) + 256
    for _ in range(2):
        buf = ffi.new("char[]", size)
        n = lib.llama_chat_apply_template(tmpl, chat, len(messages), add_assistant, buf, size)
        if n < 0:
            raise ValueError(
                "llama.cpp does not support this chat template; pass one of its built-in names "
                "(e.g. template='chatml')"
            )
        if n < size:
            return bytes(ffi.buffer(buf, n)).decode("utf-8", errors="replace")
        size = n + 1
    raise RuntimeError("the chat template's output kept growing")  # pragma: no cover
