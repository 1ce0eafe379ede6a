"""Prompt templates: how a data row becomes training text, and a sample prompt becomes a prompt.

Pure functions; the tokenizer enters only through `eos_token` and, for `chat`, a callable that
applies the tokenizer's chat template. `fields` maps a template placeholder to the data column that
fills it, so `{instruction: prompt}` reads the `prompt` column as the instruction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from finetune_trainer.errors import ConfigError
from finetune_trainer.spec import PromptTemplate, format_placeholders

ChatRenderer = Callable[[list[dict[str, str]], bool], str]
"""(messages, add_generation_prompt) -> text; in practice `tokenizer.apply_chat_template`."""

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
R1_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. "
    "Before answering, think carefully about the question and create a step-by-step chain of thoughts "
    "to ensure a logical and accurate response."
)

ALPACA_COLUMNS = {"instruction": "instruction", "input": "input", "output": "output"}
R1_COLUMNS = {"question": "Question", "cot": "Complex_CoT", "response": "Response"}
CHAT_COLUMNS = {"messages": "messages"}
OPTIONAL_PLACEHOLDERS = {"alpaca": frozenset({"input"})}
"""Placeholders whose column may be absent (Alpaca data sets often have no `input`)."""


def chat_renderer(tokenizer: Any) -> ChatRenderer | None:
    """`tokenizer.apply_chat_template` as a ChatRenderer, or None when the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    return render


def placeholders(template: PromptTemplate) -> dict[str, str]:
    """Placeholder -> column for this template, with `fields` applied."""
    if template.type == "custom":
        defaults = {name: name for name in custom_placeholders(template.format or "")}
    else:
        defaults = {"alpaca": ALPACA_COLUMNS, "r1-reasoning": R1_COLUMNS, "chat": CHAT_COLUMNS}[template.type]
    unknown = sorted(set(template.fields) - set(defaults))
    if unknown:
        raise ConfigError(
            "spec.template.fields",
            f"{', '.join(unknown)} is not a placeholder of template {template.type}; "
            f"expected some of {', '.join(defaults)}",
        )
    return {name: template.fields.get(name, column) for name, column in defaults.items()}


def custom_placeholders(fmt: str) -> list[str]:
    """Named placeholders of a custom format string, in order of first use (the spec's parser)."""
    try:
        return format_placeholders(fmt)
    except ValueError as e:
        raise ConfigError("spec.template.format", str(e).removeprefix("template.format: ")) from None


def required_columns(template: PromptTemplate) -> dict[str, str]:
    """Placeholder -> column for the placeholders every row must fill (all but the optional ones)."""
    optional = OPTIONAL_PLACEHOLDERS.get(template.type, frozenset())
    return {name: column for name, column in placeholders(template).items() if name not in optional}


def check_columns(template: PromptTemplate, columns: Iterable[str]) -> None:
    """Refuse data that lacks a column the template reads, naming what exists."""
    present = set(columns)
    for name, column in required_columns(template).items():
        if column not in present:
            raise ConfigError(
                "spec.template.fields",
                f"template {template.type} reads column {column!r} (placeholder {name}) but the data has "
                f"only: {', '.join(sorted(present)) or 'no columns'}; map it with "
                f"spec.template.fields.{name}",
            )


def render_row(
    template: PromptTemplate,
    row: Mapping[str, Any],
    eos_token: str | None,
    chat: ChatRenderer | None = None,
) -> str:
    """The training text of one row (with EOS when addEos)."""
    columns = placeholders(template)
    values = {name: _text(row.get(column)) for name, column in columns.items() if template.type != "chat"}
    if template.type == "alpaca":
        text = _alpaca(template, values["instruction"], values["input"], values["output"])
    elif template.type == "r1-reasoning":
        text = _r1(template, values["question"]) + f"{values['cot']}\n</think>\n{values['response']}"
    elif template.type == "chat":
        messages = _messages(template, row.get(columns["messages"]), columns["messages"])
        text = _require_chat(chat)(messages, False)
    else:
        text = (template.format or "").format(**values)
    if template.add_eos and eos_token and not text.endswith(eos_token):
        text += eos_token
    return text


def render_prompt(template: PromptTemplate, prompt: str, chat: ChatRenderer | None = None) -> str:
    """A sample prompt rendered the way training rows are, up to where the answer starts.

    custom: the prompt fills the first placeholder and the text ends before the last one.
    """
    if template.type == "alpaca":
        return _alpaca(template, prompt, "", "")
    if template.type == "r1-reasoning":
        return _r1(template, prompt)
    if template.type == "chat":
        return _require_chat(chat)(_with_system(template, [{"role": "user", "content": prompt}]), True)
    fmt = template.format or ""
    names = custom_placeholders(fmt)
    if len(names) > 1:
        fmt = fmt[: fmt.index("{" + names[-1])]
    return fmt.format(**{**dict.fromkeys(names, ""), names[0]: prompt})


def preamble(template: PromptTemplate) -> str | None:
    """The text before every example (alpaca, r1-reasoning): systemPrompt or the family's own."""
    if template.system_prompt is not None and template.type in ("alpaca", "r1-reasoning"):
        return template.system_prompt
    return {"alpaca": ALPACA_PREAMBLE, "r1-reasoning": R1_PREAMBLE}.get(template.type)


def _alpaca(template: PromptTemplate, instruction: str, input_: str, output: str) -> str:
    head = f"{preamble(template)}\n\n### Instruction:\n{instruction}"
    return f"{head}\n\n### Input:\n{input_}\n\n### Response:\n{output}"


def _r1(template: PromptTemplate, question: str) -> str:
    """Everything up to and including the opening `<think>` line (the Unsloth R1 tutorial's layout)."""
    return f"{preamble(template)}\n\n### Question:\n{question}\n\n### Response:\n<think>\n"


def _messages(template: PromptTemplate, value: Any, column: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in value
    ):
        raise ConfigError(
            "spec.template.fields",
            f"template chat: column {column!r} must hold a list of {{role, content}} messages, "
            f"got {type(value).__name__}",
        )
    return _with_system(template, [{"role": str(m["role"]), "content": _text(m["content"])} for m in value])


def _with_system(template: PromptTemplate, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    if template.system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": template.system_prompt}, *messages]


def _require_chat(chat: ChatRenderer | None) -> ChatRenderer:
    if chat is None:
        raise ConfigError("spec.template.type", "chat needs a tokenizer with a chat template")
    return chat


def _text(value: Any) -> str:
    return "" if value is None else str(value)
