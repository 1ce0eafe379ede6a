"""Ollama `Modelfile`s for the exported GGUF files: the job's prompt template and stop strings.

The TEMPLATE is not written by hand per template family: the job's own prompt rendering
(`templates.render_prompt`, the code that built the training text) renders a sentinel prompt and the
sentinel becomes Ollama's `{{ .Prompt }}`. So Ollama wraps a user's message exactly as training did.
"""

from __future__ import annotations

from finetune_trainer.errors import ConfigError
from finetune_trainer.spec import PromptTemplate
from finetune_trainer.templates import ChatRenderer, render_prompt

SENTINEL = "\x00PROMPT\x00"
"""Stands for the user's prompt while rendering; no template or tokenizer produces it."""

TURN_HEADERS = {"alpaca": "### Instruction:", "r1-reasoning": "### Question:"}
"""Where the model would start writing a next turn by itself: a stop string for Ollama."""


def go_template_literal(text: str) -> str:
    """`text` as literal Go template text: `{{` would open an action, so it is printed by one."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(rendered: str) -> str:
    """Ollama TEMPLATE from a prompt rendered with SENTINEL as the prompt."""
    if rendered.count(SENTINEL) != 1:
        raise ConfigError("spec.template", "the rendered prompt must contain the sample prompt exactly once")
    before, after = rendered.split(SENTINEL)
    return go_template_literal(before) + "{{ .Prompt }}" + go_template_literal(after)


def stop_strings(template_type: str, eos_token: str | None) -> list[str]:
    """Stop strings: the tokenizer's EOS and the header of the template's next turn."""
    stops = [s for s in (eos_token, TURN_HEADERS.get(template_type)) if s]
    return list(dict.fromkeys(stops))


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_modelfile(gguf_filename: str, template_text: str, stops: list[str]) -> str:
    """The Modelfile text. Greedy decoding (temperature 0) is what the export verified."""
    if '"""' in template_text:
        raise ConfigError(
            "spec.template", 'the rendered template contains """, which a Modelfile cannot quote'
        )
    lines = [f"FROM ./{gguf_filename}", f'TEMPLATE """{template_text}"""']
    lines += [f"PARAMETER stop {_quoted(s)}" for s in stops]
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def modelfile_for(
    template: PromptTemplate, gguf_filename: str, eos_token: str | None, chat: ChatRenderer | None = None
) -> str:
    """The Modelfile for one GGUF of this job (`chat`: the tokenizer's chat template, type chat only)."""
    text = ollama_template(render_prompt(template, SENTINEL, chat))
    return render_modelfile(gguf_filename, text, stop_strings(template.type, eos_token))
