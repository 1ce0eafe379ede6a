from __future__ import annotations

import pytest
from finetune_trainer.errors import ConfigError
from finetune_trainer.modelfile import modelfile_for, ollama_template, render_modelfile, stop_strings
from finetune_trainer.spec import PromptTemplate


def test_alpaca_modelfile_wraps_the_prompt_as_training_did() -> None:
    text = modelfile_for(PromptTemplate(type="alpaca"), "model-q8_0.gguf", "</s>")
    assert text.startswith("FROM ./model-q8_0.gguf\n")
    assert "### Instruction:\n{{ .Prompt }}\n\n### Input:\n\n\n### Response:\n" in text
    assert 'PARAMETER stop "</s>"' in text
    assert 'PARAMETER stop "### Instruction:"' in text


def test_r1_template_ends_in_an_open_think_block() -> None:
    text = modelfile_for(PromptTemplate(type="r1-reasoning", systemPrompt="Be brief."), "m.gguf", "<eos>")
    assert 'TEMPLATE """Be brief.\n\n### Question:\n{{ .Prompt }}\n\n### Response:\n<think>\n"""' in text
    assert 'PARAMETER stop "### Question:"' in text


def test_custom_template_stops_before_the_answer() -> None:
    template = PromptTemplate(type="custom", format="Q: {question}\nA: {answer}")
    assert 'TEMPLATE """Q: {{ .Prompt }}\nA: """' in modelfile_for(template, "m.gguf", None)


def test_chat_template_comes_from_the_tokenizer_renderer() -> None:
    def chat(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        body = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
        return body + ("<|assistant|>" if add_generation_prompt else "")

    text = modelfile_for(PromptTemplate(type="chat", systemPrompt="S"), "m.gguf", "<|end|>", chat)
    assert 'TEMPLATE """<|system|>S<|end|><|user|>{{ .Prompt }}<|end|><|assistant|>"""' in text


def test_literal_braces_are_escaped_for_go_templates() -> None:
    assert ollama_template("{{x}} \x00PROMPT\x00") == '{{ "{{" }}x}} {{ .Prompt }}'


def test_stop_values_are_quoted_and_deduplicated() -> None:
    assert stop_strings("alpaca", "### Instruction:") == ["### Instruction:"]
    assert 'PARAMETER stop "say \\"hi\\""' in render_modelfile("m.gguf", "{{ .Prompt }}", ['say "hi"'])


def test_a_template_with_triple_quotes_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"spec\.template"):
        render_modelfile("m.gguf", 'a """ b', [])
