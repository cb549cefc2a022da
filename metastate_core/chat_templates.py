"""Chat templates: how a conversation becomes the text the model reads.

Two formats, both ending every turn with a blank line ("\\n\\n"), which is also where an answer
stops (the stop string):

  world        RWKV World / G1, for imported official models:
                   User: <message>\\n\\nAssistant: <answer>\\n\\n
  shakespeare  the shipped model, trained on Shakespeare's plays as Project Gutenberg prints
               them: a speaker's name in capitals and a full stop on its own line, the speech
               below, a blank line after. The user speaks as one character; the model answers
               as the next speaker (it names the speaker itself unless `assistant` is set):
                   ROMEO.\\n<message>\\n\\nJULIET.\\n<answer>\\n\\n

A message may not contain a blank line (it would end the turn early): runs of line breaks
inside a message become one. A model directory picks its template with config.json's
"chat_template" key, a name or {"name": ..., "user": ..., "assistant": ...}; without that key,
an RWKV World tokenizer means the World format and a SentencePiece one (the models this
project trains) the Shakespeare format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import MetaStateError

TURN_END = "\n\n"


class ChatTemplateError(MetaStateError, ValueError):
    """An unknown template or invalid template options."""


def clean_message(text: str) -> str:
    """One message as it may appear inside a turn: no blank lines, no surrounding whitespace."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return re.sub(r"\n\s*\n+", "\n", text).strip()


@dataclass(frozen=True)
class ChatTemplate:
    """name: "world" | "shakespeare". user / assistant: the speakers' labels; assistant None
    (shakespeare only) lets the model choose who answers."""

    name: str
    user: str
    assistant: str | None

    stop: tuple[str, ...] = (TURN_END,)

    def user_turn(self, message: str) -> str:
        """The text fed for one user message: the user's turn and the opening of the answer."""
        message = clean_message(message)
        if self.name == "world":
            return f"{self.user}: {message}{TURN_END}{self.assistant}:"
        opening = f"{self.assistant}.\n" if self.assistant else ""
        return f"{self.user}.\n{message}{TURN_END}{opening}"

    def close_turn(self, answer: str) -> str:
        """The text still to feed after an answer (the model's full output) to end its turn."""
        if answer.endswith(TURN_END):
            return ""
        return "\n" if answer.endswith("\n") else TURN_END

    def to_config(self) -> dict:
        return {"name": self.name, "user": self.user, "assistant": self.assistant}


_DEFAULTS = {"world": ("User", "Assistant"), "shakespeare": ("ROMEO", None)}
TEMPLATES = tuple(_DEFAULTS)


def make_template(name: str, user: str | None = None, assistant: str | None = None) -> ChatTemplate:
    """A template by name with optional speaker labels (defaults: User/Assistant, ROMEO/model's choice)."""
    if name not in _DEFAULTS:
        raise ChatTemplateError(f"unknown chat template {name!r}: expected one of {', '.join(TEMPLATES)}")
    default_user, default_assistant = _DEFAULTS[name]
    user = default_user if user is None else user
    assistant = default_assistant if assistant is None else assistant
    for label in (user, assistant):
        if label is not None and (not isinstance(label, str) or not label.strip() or "\n" in label):
            raise ChatTemplateError(f"chat template speaker must be a one-line non-empty string, got {label!r}")
    if name == "world" and assistant is None:
        raise ChatTemplateError("the world chat template needs an assistant label")
    return ChatTemplate(name, user.strip(), assistant.strip() if assistant else None)


def template_for(spec, tokenizer_type: str | None) -> ChatTemplate:
    """The template of a model: `spec` is config.json's "chat_template" (None when absent)."""
    if spec is None:
        if tokenizer_type == "rwkv_world":
            return make_template("world")
        if tokenizer_type == "sentencepiece":
            return make_template("shakespeare")
        raise ChatTemplateError("the model has no tokenizer, so it cannot chat")
    if isinstance(spec, str):
        return make_template(spec)
    if isinstance(spec, dict) and set(spec) <= {"name", "user", "assistant"} and isinstance(spec.get("name"), str):
        return make_template(spec["name"], spec.get("user"), spec.get("assistant"))
    raise ChatTemplateError('config.json "chat_template" must be a template name or '
                            f'{{"name": ..., "user": ..., "assistant": ...}}, got {spec!r}')
