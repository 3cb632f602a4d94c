"""Chat templates: the GGUF's own Jinja template, or a known format for the architecture.

A chat request becomes one prompt string. The model's embedded template (GGUF key
`tokenizer.chat_template`) wins; base models such as Gemma 3 270M ship none, so a few
architectures get the turn format their instruction-tuned siblings were trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.errors import ChatNotSupported
from agent.runtime.types import ChatMessage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FormattedPrompt:
    """A chat rendered to text, plus what generation needs to know about it."""

    text: str
    stop: tuple[str, ...] = ()
    """Strings that end the assistant turn (also matched as special tokens)."""
    source: str = "gguf"
    """Where the format came from: "gguf" or "fallback:<name>"."""


ChatFormat = Callable[[Sequence[ChatMessage]], FormattedPrompt]


def _system_and_turns(messages: Sequence[ChatMessage]) -> tuple[str, list[ChatMessage]]:
    """Split leading system/developer messages off; later ones become user turns."""
    system: list[str] = []
    turns: list[ChatMessage] = []
    for m in messages:
        if m.role in ("system", "developer") and not turns:
            system.append(m.content)
        else:
            turns.append(m)
    return "\n\n".join(system), turns


def gemma(messages: Sequence[ChatMessage]) -> FormattedPrompt:
    """Gemma turns; Gemma has no system role, so the system text opens the first user turn."""
    system, turns = _system_and_turns(messages)
    parts: list[str] = []
    for i, m in enumerate(turns):
        role = "model" if m.role == "assistant" else "user"
        content = m.content
        if i == 0 and system:
            content = f"{system}\n\n{content}"
        parts.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
    if not turns and system:
        parts.append(f"<start_of_turn>user\n{system}<end_of_turn>\n")
    parts.append("<start_of_turn>model\n")
    # BOS comes from the tokenizer (Gemma's vocabulary asks for it).
    return FormattedPrompt("".join(parts), stop=("<end_of_turn>",), source="fallback:gemma")


def chatml(messages: Sequence[ChatMessage]) -> FormattedPrompt:
    """ChatML, as Qwen 2/2.5/3 instruct models use it."""
    parts: list[str] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        parts.append(f"<|im_start|>{role}\n{m.content}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return FormattedPrompt(
        "".join(parts), stop=("<|im_end|>", "<|endoftext|>"), source="fallback:chatml"
    )


def phi3(messages: Sequence[ChatMessage]) -> FormattedPrompt:
    """Phi-3 / Phi-3.5 turn markers."""
    parts: list[str] = []
    for m in messages:
        role = {"developer": "system", "tool": "user"}.get(m.role, m.role)
        parts.append(f"<|{role}|>\n{m.content}<|end|>\n")
    parts.append("<|assistant|>\n")
    return FormattedPrompt(
        "".join(parts), stop=("<|end|>", "<|endoftext|>"), source="fallback:phi3"
    )


FALLBACKS: dict[str, ChatFormat] = {
    "gemma": gemma,
    "gemma2": gemma,
    "gemma3": gemma,
    "gemma3n": gemma,
    "qwen2": chatml,
    "qwen3": chatml,
    "phi3": phi3,
}
"""Architecture (GGUF `general.architecture`) → format, used only without a GGUF template.
`llama` is absent on purpose: Llama 2, Llama 3 and many fine-tunes share it but not a format."""


def fallback_for(architecture: str | None) -> ChatFormat | None:
    """The known format of an architecture, or None."""
    return FALLBACKS.get((architecture or "").lower())


class JinjaFormat:
    """A GGUF's Jinja chat template, rendered by llama-cpp-python's sandboxed formatter."""

    def __init__(self, template: str, *, bos_token: str, eos_token: str) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        # Raises jinja2.TemplateSyntaxError for a malformed template (the caller falls back).
        self._formatter: Any = Jinja2ChatFormatter(
            template=template, eos_token=eos_token, bos_token=bos_token
        )
        self.eos_token = eos_token

    def __call__(self, messages: Sequence[ChatMessage]) -> FormattedPrompt:
        import jinja2

        # Few templates know the OpenAI "developer" role; it means "system" to them.
        msgs = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            for m in messages
        ]
        try:
            result = self._formatter(messages=msgs)
        except (ValueError, jinja2.TemplateError) as exc:
            # Templates reject e.g. non-alternating roles via raise_exception().
            raise ChatNotSupported(
                f"the model's chat template rejected the messages: {exc}"
            ) from exc
        stop = tuple(s for s in [self.eos_token] if s)
        return FormattedPrompt(str(result.prompt), stop=stop, source="gguf")


def chat_format_for(
    template: str | None, architecture: str | None, *, bos_token: str, eos_token: str
) -> ChatFormat | None:
    """The GGUF template if it is usable, else the architecture's known format, else None."""
    if template:
        try:
            return JinjaFormat(template, bos_token=bos_token, eos_token=eos_token)
        except Exception as exc:  # a broken template must not make the model unusable
            log.warning("ignoring unusable chat template (%s); trying a known format", exc)
    return fallback_for(architecture)
