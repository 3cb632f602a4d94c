"""Chat templates: the GGUF's own Jinja template, or a known format for the architecture.

A chat request becomes one prompt string. The model's embedded template (GGUF key
`tokenizer.chat_template`) wins; base models such as Gemma 3 270M ship none, so a few
architectures get the turn format their instruction-tuned siblings were trained on.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.errors import ChatNotSupported
from agent.runtime.types import ChatMessage, GenerationRequest

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


# What one render may spend. A chat template is code that came inside a model file: the
# sandbox keeps it from Python's internals, these keep it from spending the device. A real
# template renders a conversation in a few dozen steps per message; these limits are
# 100-1000x that.
RENDER_STEPS = 200_000
"""Loop iterations, lookups, calls and operators one render may make (plus 200 per message)."""
RENDER_SECONDS = 2.0
"""Wall-clock time one render may take (checked every 1,024 steps)."""
RENDER_MIN_OUTPUT = 1 << 20
"""Characters any value a render builds may hold beyond twice its input (1 MiB)."""
_WIDTH = re.compile(r"\d{7,}")  # a format width or precision of a million or more
_SAMPLE = [{"role": "system", "content": "You are helpful."},
           {"role": "user", "content": "Hello"},
           {"role": "assistant", "content": "Hi!"},
           {"role": "user", "content": "How are you?"}]


class TemplateBudgetExceeded(Exception):
    """A chat template spent more than a render may (steps, time or size)."""


def _bounded_environment() -> Any:
    """An ImmutableSandboxedEnvironment (no Python internals, no mutation of inputs) that
    also meters a render: every `range` step, lookup, call, filter and intercepted operator
    counts against a step budget and a deadline, and no value it builds — by `~`, `+`, `*`,
    `%`, a filter or a string method — may exceed the size cap. Sizes are checked before an
    operation that multiplies (`'x' * n`, `center(n)`, `'%9999999s'`) and after one that
    only adds (each input is already within the cap, so the overshoot is bounded)."""
    import jinja2
    import jinja2.ext
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """Transformers' `{% generation %}` tag: rendered as its contents."""

        tags = {"generation"}  # noqa: RUF012 - jinja2.ext.Extension declares it so

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class MeteredConcat(CodeGenerator):
        """`a ~ b` through the environment, so that its result is measured too."""

        def visit_Concat(self, node: Any, frame: Any) -> None:
            self.write("environment.concat_checked((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})
        code_generator_class = MeteredConcat

        def __init__(self) -> None:
            super().__init__(loader=jinja2.BaseLoader(), trim_blocks=True,
                             lstrip_blocks=True,
                             extensions=[Generation, jinja2.ext.loopcontrols])
            self.steps = self.budget = 0
            self.cap = RENDER_MIN_OUTPUT
            self.deadline = 0.0
            self.globals["range"] = self._range
            self.filters = {k: self._metered(k, f) for k, f in self.filters.items()}
            self.filters["tojson"] = self._metered("tojson", _tojson)

        def start(self, messages: int, chars: int) -> None:
            self.steps = 0
            self.budget = RENDER_STEPS + 200 * messages
            self.cap = RENDER_MIN_OUTPUT + 2 * chars
            self.deadline = time.monotonic() + RENDER_SECONDS

        def step(self) -> None:
            self.steps += 1
            if self.steps > self.budget:
                raise TemplateBudgetExceeded(
                    f"the chat template took more than {self.budget:,} steps")
            if not self.steps & 1023 and time.monotonic() > self.deadline:
                raise TemplateBudgetExceeded(
                    f"the chat template ran longer than {RENDER_SECONDS:g} s")

        def sized(self, value: Any) -> Any:
            if isinstance(value, (str, list, tuple, dict)) and len(value) > self.cap:
                raise TemplateBudgetExceeded(
                    f"the chat template built a value of more than {self.cap:,} items")
            return value

        def arguments(self, *args: Any) -> None:
            for a in args:
                if isinstance(a, int) and not isinstance(a, bool) and \
                        abs(a) > RENDER_MIN_OUTPUT:
                    raise TemplateBudgetExceeded("the chat template passed a huge number")

        def format_string(self, fmt: Any) -> None:
            if isinstance(fmt, str) and _WIDTH.search(fmt):
                raise TemplateBudgetExceeded("the chat template asked for a huge width")

        def _metered(self, name: str, f: Any) -> Any:
            @functools.wraps(f)
            def metered(*args: Any, **kwargs: Any) -> Any:
                self.step()
                self.arguments(*args, *kwargs.values())
                if name == "format" and args:
                    self.format_string(args[0])
                return self.sized(f(*args, **kwargs))

            return metered

        def _range(self, *args: int) -> Any:
            for i in range(*args):
                self.step()
                yield i

        def concat_checked(self, parts: tuple[Any, ...]) -> str:
            self.step()
            return str(self.sized("".join(map(str, parts))))

        def getattr(self, obj: Any, attribute: str) -> Any:
            self.step()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            self.step()
            return super().getitem(obj, argument)

        def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            self.step()
            self.arguments(*args, *kwargs.values())
            target = getattr(__obj, "__wrapped__", __obj)
            if getattr(target, "__name__", "") in ("format", "format_map"):
                self.format_string(getattr(target, "__self__", None))
            return self.sized(super().call(__context, __obj, *args, **kwargs))

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            self.step()
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(times, int) \
                            and len(seq) * times > self.cap:
                        raise TemplateBudgetExceeded(
                            "the chat template tried to build a huge value")
            elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise TemplateBudgetExceeded("the chat template tried to build a huge number")
            elif operator == "%":
                self.format_string(left)
            return self.sized(super().call_binop(context, operator, left, right))

    return Bounded()


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Transformers' `tojson` filter (non-ASCII kept)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ValueError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class JinjaFormat:
    """A GGUF's Jinja chat template, rendered in a sandbox with a budget.

    The template is code from a model file, run for every chat request: the sandbox keeps
    it from Python's internals (`__class__`, `__globals__`: a SecurityError), and the budget
    (RENDER_STEPS, RENDER_SECONDS, an output cap) keeps a template that loops, recurses or
    builds huge strings from holding the thread or the memory. The constructor renders a
    sample conversation, so a template that cannot render within the budget is refused when
    the model loads (and the known format of its architecture is used), not on the first
    request."""

    def __init__(self, template: str, *, bos_token: str, eos_token: str) -> None:
        import jinja2

        self._env = _bounded_environment()
        # Raises jinja2.TemplateSyntaxError for a malformed template (the caller falls back).
        self._template = self._env.from_string(template)
        self.eos_token = eos_token
        self.bos_token = bos_token
        from jinja2.exceptions import SecurityError

        try:
            self._render(_SAMPLE)
        except SecurityError:
            raise
        except (ValueError, jinja2.TemplateError):
            pass  # it may refuse this conversation (roles, say) and still render others

    def _render(self, msgs: list[dict[str, str]]) -> str:
        self._env.start(len(msgs), sum(len(m["content"]) for m in msgs))
        parts: list[str] = []
        size = 0
        for chunk in self._template.generate(
            messages=msgs, eos_token=self.eos_token, bos_token=self.bos_token,
            raise_exception=_raise_exception, add_generation_prompt=True, functions=None,
            function_call=None, tools=None, tool_choice=None, strftime_now=_strftime_now,
        ):
            size += len(chunk)
            if size > self._env.cap:
                raise TemplateBudgetExceeded(
                    f"the chat template produced more than {self._env.cap:,} characters")
            self._env.step()
            parts.append(chunk)
        return "".join(parts)

    def __call__(self, messages: Sequence[ChatMessage]) -> FormattedPrompt:
        import jinja2

        # Few templates know the OpenAI "developer" role; it means "system" to them.
        msgs = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            for m in messages
        ]
        try:
            prompt = self._render(msgs)
        except (ValueError, jinja2.TemplateError) as exc:
            # Templates reject e.g. non-alternating roles via raise_exception().
            raise ChatNotSupported(
                f"the model's chat template rejected the messages: {exc}"
            ) from exc
        except (TemplateBudgetExceeded, RecursionError, MemoryError) as exc:
            raise ChatNotSupported(
                f"the model's chat template could not render these messages: {exc}"
            ) from exc
        stop = tuple(s for s in [self.eos_token] if s)
        return FormattedPrompt(prompt, stop=stop, source="gguf")


def render_request(chat: ChatFormat | None, request: GenerationRequest, *, alias: str,
                   architecture: str | None) -> FormattedPrompt:
    """The text a model sees for a request, whichever backend runs it: the prompt as given,
    or the chat rendered by the model's format (refused when it has none)."""
    if request.messages is None:
        return FormattedPrompt(request.prompt or "", source="raw")
    if chat is None:
        raise ChatNotSupported(
            f"model {alias} has no chat template and none is known for architecture "
            f"{architecture or 'unknown'}; use /v1/completions"
        )
    return chat(request.messages)


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
