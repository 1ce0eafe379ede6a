"""Modelfile text decisions; tests/unit/test_modelfile_ollama.py reads the results with Ollama."""

from __future__ import annotations

import pytest
from finetune_trainer.errors import ConfigError
from finetune_trainer.modelfile import (
    go_template_literal,
    modelfile_for,
    quoted,
    render_modelfile,
    stop_strings,
)
from finetune_trainer.spec import PromptTemplate


def test_alpaca_modelfile_names_the_gguf_preamble_and_stops() -> None:
    text = modelfile_for(PromptTemplate(type="alpaca"), "model-q8_0.gguf", "</s>")
    assert text.startswith("FROM ./model-q8_0.gguf\n")
    assert "{{ $.System }}\n\n### Instruction:\n" in text and "{{ .Content }}\n\n### Input:" in text
    assert '\nSYSTEM "Below is an instruction' in text
    assert 'PARAMETER stop "</s>"' in text
    assert 'PARAMETER stop "### Instruction:"' in text


def test_custom_template_has_no_default_system() -> None:
    template = PromptTemplate(type="custom", format="Q: {question}\nA: {answer}")
    assert "\nSYSTEM " not in modelfile_for(template, "m.gguf", None)


def test_literal_braces_are_escaped_for_go_templates() -> None:
    assert go_template_literal("{{x}}") == '{{ "{{" }}x}}'


def test_values_are_quoted_the_way_ollama_reads_them() -> None:
    assert quoted("f", "</s>") == '"</s>"'
    assert quoted("f", 'say "hi"') == '"""say "hi""""'
    assert quoted("f", "a\\b") == '"a\\b"'  # no escapes: a backslash stays one
    assert stop_strings("alpaca", "### Instruction:") == ["### Instruction:"]


@pytest.mark.parametrize("field", ["template", "system"])
def test_triple_quotes_are_refused(field: str) -> None:
    args = {"template": ('a """ b', None), "system": ("{{ .Prompt }}", 'x """')}[field]
    with pytest.raises(ConfigError, match=r"spec\.template"):
        render_modelfile("m.gguf", *args, [])


def test_chat_needs_a_chat_template() -> None:
    with pytest.raises(ConfigError, match=r"spec\.template\.type"):
        modelfile_for(PromptTemplate(type="chat"), "m.gguf", "</s>")


def test_a_chat_template_that_changes_per_turn_is_refused() -> None:
    def chat(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        last = len(messages)
        return "".join(f"<{i}>{m['content']}" for i, m in enumerate(messages)) + f"<gen{last}>"

    with pytest.raises(ConfigError, match="turn by turn"):
        modelfile_for(PromptTemplate(type="chat"), "m.gguf", "</s>", chat)
