"""Chat templates: a conversation rendered to the text an instruct model was trained on, the way Hugging
Face renders a tokenizer's `chat_template` (transformers' `apply_chat_template(..., tokenize=False)`):

    messages ─► check_messages ─► Jinja in a sandbox ─► text ─► encode WITHOUT adding special tokens
                [{"role", "content"}]                           (the template writes bos and the markers)

What the template sees, as in transformers:
    environment   jinja2.sandbox.ImmutableSandboxedEnvironment, trim_blocks and lstrip_blocks, the
                  loopcontrols extension ({% break %}, {% continue %}); {% generation %} blocks (which
                  transformers uses to find the assistant's tokens) render their body
    variables     messages, add_generation_prompt, bos_token and eos_token (the tokens' strings; left
                  undefined when the model has none, as transformers leaves an unset token out),
                  tools=None and documents=None (edgegpt's chat passes neither)
    globals       raise_exception(message), strftime_now(format)
    filters       tojson writes plain JSON (ensure_ascii=False, no HTML escaping, indent, separators,
                  sort_keys), not Jinja's HTML-safe one
Undefined values behave as Jinja's default (print as "", fail when used further), as in transformers.

A chat template comes with the model package, and a package may come from anywhere, so rendering is
also bounded, and every way a template can fail is one EdgeGPTError naming the problem:
    a syntax error, raise_exception(...), an undefined value used wrongly, any other error while rendering;
    reaching outside the sandbox (an attribute such as __class__: an error at once, where Jinja would
        give an undefined value);
    more than MAX_STEPS loop iterations, calls and filters in one render (a loop too long);
    a text, list or number larger than the render's size limit (1,000,000 characters more than twice
        the messages' text), made by an operator, a call, a filter or the output itself, or an integer
        argument above that limit (absurdly long output), refused as it is made, not after the fact;
    recursion too deep, memory exhausted.
The loop budget wraps every {% for %} iterable at compile time (a change to the parsed template, not to
Jinja), so it costs nothing per step beyond a counter and needs no tracing or threads.
"""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from datetime import datetime
from functools import wraps
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgegpt.core.errors import EdgeGPTError

# Loop iterations, calls and filter applications in one render. A real template takes a few per message
# (a quadratic one 250,000 at 500 messages); a forking macro reaches the limit in about a second.
MAX_STEPS = 250_000
# The size limit of one render: this many characters more than twice the messages' text (a template
# writes each message once, plus its markers and perhaps a default system prompt).
BASE_CHARS = 1_000_000
# Integers a template may build: far beyond any index or count, far below a number that takes seconds
# to print (10 ** 10 ** 8 would).
MAX_INT_BITS = 4096
MESSAGE_KEYS = ("role", "content")


class ChatTemplate:
    """A compiled chat template; `render` is thread-safe (each render has its own budget).

        template = ChatTemplate(source, bos_token="<s>", eos_token="</s>", origin="model/chat_template.jinja")
        text = template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)

    origin names the template in error messages. A syntax error is an EdgeGPTError here, at compile time.
    """

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None,
                 origin: str = "the chat template") -> None:
        if not isinstance(source, str):
            raise EdgeGPTError(f"a chat template is text, got {type(source).__name__}")
        self.source, self.origin = source, origin
        self.special_tokens = {name: value for name, value in (("bos_token", bos_token), ("eos_token", eos_token))
                               if value is not None}
        environment = _sandbox()
        try:
            parsed = environment.parse(source)
            _budget_loops(parsed)
            self._template = environment.from_string(parsed)
        except TemplateSyntaxError as e:
            raise EdgeGPTError(f"{origin} is not a valid Jinja template (line {e.lineno}: {_first_line(e)}); "
                               "fix or remove it") from None

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's text: checked messages in, the template's text out (its bos
        and turn markers included). add_generation_prompt: end with the header of the assistant's turn
        that the model is to write."""
        checked = check_messages(messages)
        if not isinstance(add_generation_prompt, bool):
            raise EdgeGPTError(f"add_generation_prompt must be True or False, got {add_generation_prompt!r}")
        budget = _Budget(BASE_CHARS + 2 * sum(len(m["content"]) for m in checked))
        token = _BUDGET.set(budget)
        try:
            pieces, length = [], 0
            for piece in self._template.generate(messages=checked, add_generation_prompt=add_generation_prompt,
                                                 tools=None, documents=None, **self.special_tokens):
                length += len(piece)
                if length > budget.max_size:
                    raise _TooLarge(f"its output passed {budget.max_size:,} characters")
                pieces.append(piece)
            return "".join(pieces)
        except EdgeGPTError:
            raise
        except Exception as e:  # the template's own failure, whatever it is (MemoryError, RecursionError too)
            raise EdgeGPTError(f"{self.origin} failed to render the conversation: {_describe(e)}") from None
        finally:
            _BUDGET.reset(token)


def check_messages(messages: Any) -> list[dict[str, str]]:
    """messages as fresh {"role": str, "content": str} dicts, or an EdgeGPTError naming the first problem."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise EdgeGPTError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                           f"got {type(messages).__name__}")
    if not messages:
        raise EdgeGPTError("messages is empty: a conversation needs at least one message")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise EdgeGPTError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        extra = [key for key in message if key not in MESSAGE_KEYS]
        missing = [key for key in MESSAGE_KEYS if key not in message]
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has the key {extra[0]!r:.40}"
            raise EdgeGPTError(f"message {i} {what}; a message is {{'role': str, 'content': str}}")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not role.strip():
            raise EdgeGPTError(f"message {i}'s role must be a non-empty string such as 'user', got {role!r:.40}")
        if not isinstance(content, str):
            raise EdgeGPTError(f"message {i}'s content must be a string, got {type(content).__name__}")
        for name, text in (("role", role), ("content", content)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates: the tokenizer could not encode them
                raise EdgeGPTError(f"message {i}'s {name} is not valid UTF-8 text (character {e.start}: "
                                   f"{text[e.start]!r})") from None
        checked.append({"role": role, "content": content})
    return checked


# -- the sandbox --------------------------------------------------------------------------------------


class _Refused(TemplateError):
    """What the sandbox raises when a template breaks a limit; the message says which."""


class _TooLarge(_Refused):
    pass


class _TooLong(_Refused):
    pass


class _Raised(TemplateError):
    """raise_exception(...) from the template itself: the template refuses the conversation."""


class _Budget:
    """One render's allowance: steps left and the largest value (characters, items) it may build."""

    def __init__(self, max_size: int) -> None:
        self.steps = MAX_STEPS
        self.max_size = max_size

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise _TooLong(f"it ran more than {MAX_STEPS:,} loop iterations, calls and filters (a loop too long)")

    def check_arguments(self, args: Iterable[Any], kwargs: Mapping[str, Any]) -> None:
        for value in (*args, *kwargs.values()):
            if type(value) is int and abs(value) > self.max_size:
                raise _TooLarge(f"an argument of {value:.3g} is beyond the limit of {self.max_size:,}")

    def checked(self, value: Any) -> Any:
        if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)) and len(value) > self.max_size:
            raise _TooLarge(f"it built a value of {len(value):,} characters or items, beyond the limit of "
                            f"{self.max_size:,}")
        if type(value) is int and value.bit_length() > MAX_INT_BITS:
            raise _TooLarge(f"it built an integer of {value.bit_length():,} bits")
        return value

    def check_operation(self, operator: str, left: Any, right: Any) -> None:
        """Refuse an operation whose result would be too large, before it is computed."""
        sized = (str, bytes, list, tuple)
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if isinstance(sequence, sized) and type(times) is int and len(sequence) * times > self.max_size:
                    raise _TooLarge(f"repeating a value {times:.3g} times would pass the limit of {self.max_size:,}")
            if type(left) is int and type(right) is int and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _TooLarge("a product of integers would pass the integer limit")
        elif operator == "**" and type(left) is int and type(right) is int and right > 0:
            if abs(left) > 1 and max(left.bit_length() - 1, 1) * right > MAX_INT_BITS:
                raise _TooLarge(f"{left} ** {right} would pass the integer limit")
        elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
            if len(left) + len(right) > self.max_size:
                raise _TooLarge(f"a concatenation would pass the limit of {self.max_size:,}")
        elif operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
            raise _TooLarge("a %-format with a width or precision of a million or more, or taken from an argument")


# A printf-style field whose width or precision is seven digits or more, or comes from the arguments (*).
_WIDE_FORMAT = re.compile(r"%[-#0 +]*(?:\*|\d{7,}|\d*\.(?:\*|\d{7,}))")
_BUDGET: ContextVar[_Budget] = ContextVar("edgegpt_chat_template_budget")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with the render's budget applied to calls, operators and loops."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def unsafe_undefined(self, obj: Any, attribute: str):
        # Jinja returns an undefined value that fails only when used; a template that reaches for
        # __class__ or a method that alters data is refused at once.
        raise SecurityError(f"it accessed the attribute {attribute!r} of a {type(obj).__name__} object, "
                            "which the sandbox forbids")

    def call(self, context, obj, /, *args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        budget.step()
        budget.check_arguments(args, {k: v for k, v in kwargs.items() if not k.startswith("_")})
        return budget.checked(super().call(context, obj, *args, **kwargs))

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        budget = _BUDGET.get()
        budget.check_operation(operator, left, right)
        return budget.checked(super().call_binop(context, operator, left, right))

    def loop_items(self, iterable: Any) -> Iterator[Any]:
        """Every {% for %} iterates through this (see _budget_loops): one step per item."""
        budget = _BUDGET.get()
        for item in iterable:
            budget.step()
            yield item

    def checked_value(self, value: Any) -> Any:
        """A `~` concatenation's result, checked (Jinja joins those without the environment)."""
        return _BUDGET.get().checked(value)


class _GenerationBlock(Extension):
    """{% generation %}...{% endgeneration %}: transformers marks the assistant's text with it (to mask
    training losses); rendering, it is its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _sandbox() -> _Sandbox:
    environment = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock])
    environment.filters["tojson"] = _tojson
    environment.filters = {name: _budgeted_filter(f) for name, f in environment.filters.items()}
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


def _budget_loops(node: nodes.Node) -> None:
    """Route every loop's iterable through the environment's loop_items and every `~` concatenation's
    result through checked_value, in one pass over the parsed template. Environment attributes, not
    names: a template cannot shadow them."""
    for name, value in node.iter_fields():
        if isinstance(value, list):
            setattr(node, name, [_budgeted(item) if isinstance(item, nodes.Node) else item for item in value])
        elif isinstance(value, nodes.Node):
            setattr(node, name, _budgeted(value))
    if isinstance(node, nodes.For):
        node.iter = _environment_call("loop_items", node.iter)


def _budgeted(node: nodes.Node) -> nodes.Node:
    _budget_loops(node)
    return _environment_call("checked_value", node) if isinstance(node, nodes.Concat) else node


def _environment_call(method: str, argument: nodes.Expr) -> nodes.Call:
    return nodes.Call(nodes.EnvironmentAttribute(method), [argument], [], None, None, lineno=argument.lineno)


def _budgeted_filter(function: Callable) -> Callable:
    """The filter with the render's budget applied: a step, its arguments and its result checked.
    functools.wraps copies jinja_pass_arg, so Jinja still passes the context or environment it asks for."""
    passed = 1 + (getattr(function, "jinja_pass_arg", None) is not None)  # the value (and the context)

    @wraps(function)
    def budgeted(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        budget.step()
        budget.check_arguments(args[passed:], kwargs)
        return budget.checked(function(*args, **kwargs))

    return budgeted


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's tojson escapes <, >, & and ' for HTML and takes only indent; a prompt is not HTML, and
    # templates written for transformers pass its json.dumps options.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: Any) -> None:
    raise _Raised(str(message))


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _describe(error: BaseException) -> str:
    """One line saying what went wrong inside the template."""
    if isinstance(error, _Raised):
        return f"it raised: {_first_line(error)}"
    if isinstance(error, _Refused):
        return _first_line(error)
    if isinstance(error, SecurityError):
        return f"it reached outside its sandbox: {_first_line(error)}"
    if isinstance(error, UndefinedError):
        return f"it used an undefined value: {_first_line(error)}"
    if isinstance(error, RecursionError):
        return "it recursed too deep"
    if isinstance(error, MemoryError):
        return "it ran out of memory"
    if isinstance(error, OverflowError) and "MAX_RANGE" in str(error):
        return f"a range is too long ({_first_line(error)})"
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    lines = (getattr(error, "message", None) or str(error) or type(error).__name__).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:200]


__all__ = ["MAX_STEPS", "ChatTemplate", "check_messages"]
