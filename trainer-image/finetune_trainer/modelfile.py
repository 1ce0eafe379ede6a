"""Ollama `Modelfile`s for the exported GGUF files: the job's prompt template, system prompt and stops.

The TEMPLATE is not written by hand per template family: the job's own prompt rendering
(`templates.render_prompt` and `render_row`, the code that built the training text) renders sentinel
prompts, answers and system prompts, and the sentinels become Ollama's `.Content` and `.System`. The
template ranges over `.Messages` (Ollama's chat form), so that:

- one turn renders exactly the training prompt, with the Modelfile's SYSTEM (the job's preamble or
  system prompt) where training had it, and a user's own system message in its place;
- a conversation renders as training would have: for alpaca, r1-reasoning and custom, each earlier
  turn is a complete training sample (its answer ends in EOS when the job trains with addEos); for
  chat, exactly what the tokenizer's chat template renders for the whole conversation;
- a BOS that the chat template writes is left out when the model adds one itself, as Ollama
  (llama.cpp) then does, so the prompt starts with one BOS, not two.

Ollama's Modelfile parser takes quoted values verbatim (no escapes): a value is quoted with `"`, or
with `\"\"\"` when it holds a `"`, and a value holding `\"\"\"` cannot be written at all.
"""

from __future__ import annotations

from finetune_trainer.errors import ConfigError
from finetune_trainer.spec import PromptTemplate
from finetune_trainer.templates import ChatRenderer, preamble, render_prompt

PROMPT = "\x00PROMPT\x00"
ANSWER = "\x00ANSWER\x00"
NEXT = "\x00NEXT\x00"
SYSTEM = "\x00SYSTEM\x00"
"""Stand for a user's prompt, an answer, a later prompt and the system prompt while rendering; no
template or tokenizer produces them."""

TURN_HEADERS = {"alpaca": "### Instruction:", "r1-reasoning": "### Question:"}
"""Where the model would start writing a next turn by itself: a stop string for Ollama."""


def go_template_literal(text: str) -> str:
    """`text` as literal Go template text: `{{` would open an action, so it is printed by one."""
    return text.replace("{{", '{{ "{{" }}')


def split_at(rendered: str, *sentinels: str) -> list[str]:
    """`rendered` cut at each sentinel, which must each occur once and in this order."""
    parts, rest = [], rendered
    for sentinel in sentinels:
        if rest.count(sentinel) != 1:
            raise ConfigError(
                "spec.template", "the rendered prompt must contain each part of a conversation exactly once"
            )
        before, rest = rest.split(sentinel)
        parts.append(before)
    return [*parts, rest]


def messages_template(first: str, later: str, after: str) -> str:
    """A Go template over `.Messages`: `first` or `later` (Go template text) opens the first or a
    later user turn, then the user's message, `after` up to the answer, then the answer as given (the
    last one left open: Ollama generates from there)."""
    return (
        "{{ $first := true }}{{ range .Messages }}"
        '{{ if eq .Role "user" }}'
        f"{{{{ if $first }}}}{first}{{{{ else }}}}{later}{{{{ end }}}}"
        f"{{{{ .Content }}}}{after}{{{{ $first = false }}}}"
        '{{ else if eq .Role "assistant" }}{{ .Content }}'
        "{{ end }}{{ end }}"
    )


def instruction_template(template: PromptTemplate, eos_token: str | None) -> tuple[str, str | None]:
    """(TEMPLATE, SYSTEM) for alpaca, r1-reasoning and custom: every turn is a training sample, an
    earlier answer ends as its training row did (EOS with addEos, else a blank line)."""
    lit = go_template_literal
    system = preamble(template)
    if system is not None:
        with_system = template.model_copy(update={"system_prompt": SYSTEM})
        head, middle, after = split_at(render_prompt(with_system, PROMPT), SYSTEM, PROMPT)
        opening = f"{lit(head)}{{{{ $.System }}}}{lit(middle)}"
        first = opening
    else:  # a custom format has no place for a system prompt: a given one leads the conversation
        head, after = split_at(render_prompt(template, PROMPT), PROMPT)
        opening = lit(head)
        first = f"{{{{ if $.System }}}}{{{{ $.System }}}}\n\n{{{{ end }}}}{opening}"
    end_of_turn = eos_token if template.add_eos and eos_token else "\n\n"
    return messages_template(first, lit(end_of_turn) + opening, lit(after)), system


def chat_template(
    template: PromptTemplate, chat: ChatRenderer, bos_token: str | None
) -> tuple[str, str | None]:
    """(TEMPLATE, SYSTEM) for chat, from what the tokenizer's chat template renders for a first
    turn with and without a system message and for a second turn. `bos_token`: the BOS the model
    adds itself, left out of the template."""
    lit = go_template_literal

    def render(messages: list[tuple[str, str]]) -> str:
        text = chat([{"role": r, "content": c} for r, c in messages], True)
        return text[len(bos_token) :] if bos_token and text.startswith(bos_token) else text

    opening, after = split_at(render([("user", PROMPT)]), PROMPT)
    first_again, answer_head, between, next_after = split_at(
        render([("user", PROMPT), ("assistant", ANSWER), ("user", NEXT)]), PROMPT, ANSWER, NEXT
    )
    try:
        sys_head, sys_middle, sys_after = split_at(
            render([("system", SYSTEM), ("user", PROMPT)]), SYSTEM, PROMPT
        )
        first = f"{{{{ if $.System }}}}{lit(sys_head)}{{{{ $.System }}}}{lit(sys_middle)}"
        first += f"{{{{ else }}}}{lit(opening)}{{{{ end }}}}"
    except Exception:  # a chat template that refuses system messages (Gemma's) raises
        sys_after, first = after, lit(opening)
    if not (sys_after == after == answer_head == next_after and first_again == opening):
        raise ConfigError(
            "spec.template",
            "the tokenizer's chat template does not render a conversation turn by turn (the text "
            "around a user message changes with the turn), so no Ollama TEMPLATE can reproduce it",
        )
    return messages_template(first, lit(between), lit(after)), template.system_prompt


def quoted(field: str, value: str) -> str:
    """A Modelfile value as Ollama's parser reads it back verbatim (it knows no escapes)."""
    if '"""' in value:
        raise ConfigError(field, 'contains """, which a Modelfile cannot quote')
    return f'"""{value}"""' if '"' in value or "\n" in value else f'"{value}"'


def stop_strings(template_type: str, eos_token: str | None) -> list[str]:
    """Stop strings: the tokenizer's EOS and the header of the template's next turn."""
    stops = [s for s in (eos_token, TURN_HEADERS.get(template_type)) if s]
    return list(dict.fromkeys(stops))


def render_modelfile(gguf_filename: str, template_text: str, system: str | None, stops: list[str]) -> str:
    """The Modelfile text. Greedy decoding (temperature 0) is what the export verified."""
    lines = [f"FROM ./{gguf_filename}", f"TEMPLATE {quoted('spec.template', template_text)}"]
    if system is not None:
        lines.append(f"SYSTEM {quoted('spec.template.systemPrompt', system)}")
    lines += [f"PARAMETER stop {quoted('spec.template', s)}" for s in stops]
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def modelfile_for(
    template: PromptTemplate,
    gguf_filename: str,
    eos_token: str | None,
    chat: ChatRenderer | None = None,
    bos_token: str | None = None,
) -> str:
    """The Modelfile for one GGUF of this job (`chat`: the tokenizer's chat template, type chat only;
    `bos_token`: the BOS the model puts before every prompt by itself, if it does)."""
    if template.type == "chat":
        if chat is None:
            raise ConfigError("spec.template.type", "chat needs a tokenizer with a chat template")
        text, system = chat_template(template, chat, bos_token)
    else:
        text, system = instruction_template(template, eos_token)
    return render_modelfile(gguf_filename, text, system, stop_strings(template.type, eos_token))
