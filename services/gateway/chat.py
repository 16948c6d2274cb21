"""Chat messages -> prompt text with the model's chat template (as ``transformers`` renders it).

The template comes from the model directory: ``chat_template.jinja``, ``chat_template.json`` or
the ``chat_template`` of ``tokenizer_config.json`` (a string, or named templates of which
"default" is used). A model without one (the embedded default) gets :data:`DEFAULT_TEMPLATE`.
Rendering runs in jinja2's immutable sandbox, like transformers: a template cannot touch
anything but the messages.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from shared.model.tokenizer import read_json_object

# "role: content" lines and an "assistant:" cue, after the BOS token.
DEFAULT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(ValueError):
    """The template refused the messages (its ``raise_exception``) or failed to render."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **_: Any) -> str:
    # transformers' tojson: no HTML escaping, unicode kept.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str], is_default: bool) -> None:
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        self.template = environment.from_string(source)
        self.special_tokens = special_tokens
        self.is_default = is_default

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ChatTemplate:
        config = read_json_object(model_dir / "tokenizer_config.json")
        special = {key: _token_text(config.get(key)) for key in SPECIAL_TOKEN_KEYS}
        special_tokens = {key: value for key, value in special.items() if value is not None}
        source = _template_source(model_dir, config)
        if source is None:
            return cls(DEFAULT_TEMPLATE, special_tokens, is_default=True)
        return cls(source, special_tokens, is_default=False)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for ``messages``, ending with the assistant's cue."""
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=True, **self.special_tokens
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template failed: {exc}") from None


def _template_source(model_dir: Path, config: dict[str, Any]) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    template = read_json_object(model_dir / "chat_template.json").get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {item.get("name"): item.get("template") for item in template}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _token_text(token: Any) -> str | None:
    if isinstance(token, dict):  # an AddedToken
        token = token.get("content")
    return token if isinstance(token, str) else None
