"""Prompt templates: pure rendering, column checks and sample prompts."""

from __future__ import annotations

import pytest
from finetune_trainer import templates
from finetune_trainer.errors import ConfigError
from finetune_trainer.spec import PromptTemplate
from pydantic import ValidationError

EOS = "</s>"


def chat_stub(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """A stand-in chat template with the shape of a real one: role tags, optional assistant opener."""
    text = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
    return text + ("<|assistant|>" if add_generation_prompt else "")


def test_alpaca_renders_the_tutorial_layout_with_eos() -> None:
    row = {"instruction": "Greet", "input": "Bob", "output": "Hello Bob"}
    text = templates.render_row(PromptTemplate(type="alpaca"), row, EOS)
    assert text == (
        templates.ALPACA_PREAMBLE
        + "\n\n### Instruction:\nGreet\n\n### Input:\nBob\n\n### Response:\nHello Bob</s>"
    )


def test_alpaca_without_input_column_renders_an_empty_input() -> None:
    template = PromptTemplate(type="alpaca")
    templates.check_columns(template, ["instruction", "output"])
    text = templates.render_row(template, {"instruction": "Greet", "output": "Hi"}, EOS)
    assert text.endswith("### Input:\n\n\n### Response:\nHi</s>")


def test_r1_puts_the_chain_of_thought_in_a_think_block() -> None:
    row = {"Question": "Q?", "Complex_CoT": "step 1, step 2", "Response": "A."}
    text = templates.render_row(PromptTemplate(type="r1-reasoning"), row, EOS)
    assert text.startswith(templates.R1_PREAMBLE)
    assert text.endswith("### Question:\nQ?\n\n### Response:\n<think>\nstep 1, step 2\n</think>\nA.</s>")


def test_r1_sample_prompt_stops_at_the_opening_think() -> None:
    prompt = templates.render_prompt(PromptTemplate(type="r1-reasoning"), "Q?")
    assert prompt.endswith("### Question:\nQ?\n\n### Response:\n<think>\n")
    assert "</think>" not in prompt


def test_system_prompt_replaces_the_preamble() -> None:
    template = PromptTemplate(type="r1-reasoning", system_prompt="You are a doctor.")
    prompt = templates.render_prompt(template, "Q?")
    assert prompt.startswith("You are a doctor.\n\n### Question:")
    assert templates.R1_PREAMBLE not in prompt


def test_eos_is_left_out_when_add_eos_is_off_and_never_doubled() -> None:
    row = {"instruction": "a", "input": "", "output": "b</s>"}
    assert templates.render_row(PromptTemplate(add_eos=False), {**row, "output": "b"}, EOS).endswith("b")
    assert templates.render_row(PromptTemplate(), row, EOS).endswith("b</s>")
    assert not templates.render_row(PromptTemplate(), row, EOS).endswith("</s></s>")


def test_fields_rename_the_columns_a_template_reads() -> None:
    template = PromptTemplate(type="alpaca", fields={"instruction": "prompt", "output": "answer"})
    templates.check_columns(template, ["prompt", "answer"])
    text = templates.render_row(template, {"prompt": "P", "answer": "A"}, None)
    assert "### Instruction:\nP\n" in text and text.endswith("### Response:\nA")


def test_missing_column_names_the_field_the_column_and_what_exists() -> None:
    with pytest.raises(ConfigError) as e:
        templates.check_columns(PromptTemplate(type="r1-reasoning"), ["Question", "Response", "extra"])
    assert e.value.field == "spec.template.fields"
    assert "'Complex_CoT'" in e.value.message
    assert "Question, Response, extra" in e.value.message


def test_unknown_placeholder_in_fields_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"spec\.template\.fields: instructions is not a placeholder"):
        templates.placeholders(PromptTemplate(type="alpaca", fields={"instructions": "x"}))


def test_custom_format_fills_placeholders_from_mapped_columns() -> None:
    template = PromptTemplate(
        type="custom", format="### Q: {question}\n### A: {answer}", fields={"answer": "reply"}
    )
    assert templates.placeholders(template) == {"question": "question", "answer": "reply"}
    text = templates.render_row(template, {"question": "why?", "reply": "because"}, EOS)
    assert text == "### Q: why?\n### A: because</s>"


def test_custom_sample_prompt_ends_before_the_last_placeholder() -> None:
    template = PromptTemplate(type="custom", format="### Q: {question}\n### A: {answer}")
    assert templates.render_prompt(template, "why?") == "### Q: why?\n### A: "


@pytest.mark.parametrize("fmt", ["{} and {}", "{row[0]}", "{a.b}", "no placeholders", "{unclosed"])
def test_custom_format_must_use_plain_named_placeholders(fmt: str) -> None:
    # Refused when the spec is parsed (the operator before the Job, the trainer at start) ...
    with pytest.raises(ValidationError, match=r"template\.format"):
        PromptTemplate(type="custom", format=fmt)
    # ... and by the same parser wherever the trainer reads a format string.
    with pytest.raises(ConfigError) as e:
        templates.custom_placeholders(fmt)
    assert e.value.field == "spec.template.format"


def test_chat_goes_through_the_chat_template_with_the_system_prompt_first() -> None:
    template = PromptTemplate(type="chat", system_prompt="Be brief.")
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    text = templates.render_row(template, row, EOS, chat_stub)
    assert text == "<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>hello<|end|></s>"
    assert templates.render_prompt(template, "hi", chat_stub) == (
        "<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>"
    )


def test_chat_rows_must_hold_messages() -> None:
    with pytest.raises(ConfigError, match="list of \\{role, content\\} messages"):
        templates.render_row(PromptTemplate(type="chat"), {"messages": "hi"}, EOS, chat_stub)


def test_chat_without_a_chat_template_names_the_template_type() -> None:
    row = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ConfigError) as e:
        templates.render_row(PromptTemplate(type="chat"), row, EOS, None)
    assert e.value.field == "spec.template.type"


def test_none_values_render_as_empty_text() -> None:
    row = {"Question": "Q", "Complex_CoT": None, "Response": "A"}
    text = templates.render_row(PromptTemplate(type="r1-reasoning", add_eos=False), row, EOS)
    assert text.endswith("<think>\n\n</think>\nA")
