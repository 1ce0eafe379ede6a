"""Every generated Modelfile read by Ollama's own parser and rendered by its own template engine
(hack/consumers/ollama-modelfile: github.com/ollama/ollama v0.17.4's `parser` and `template`, the
model's SYSTEM put first as its chat handler does), per template family, single and multi-turn.

The expectation is always the training code's own text (`templates.render_prompt`/`render_row`,
and for chat the tokenizer's chat template rendered by transformers): one turn is exactly the
training prompt; earlier turns are complete training samples (chat: what the chat template renders
for the whole conversation); a system message takes the place of the preamble or system prompt; and
a BOS the model adds itself is not in the text a second time."""

from __future__ import annotations

import json
import subprocess

import consumers
import pytest
from finetune_trainer.modelfile import modelfile_for, stop_strings
from finetune_trainer.spec import PromptTemplate
from finetune_trainer.templates import ALPACA_PREAMBLE, preamble, render_prompt, render_row
from transformers.utils.chat_template_utils import render_jinja_template

# Chat templates as their models' tokenizer_config.json ships them (tools and images left out).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + "
    "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\\n'}}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + "
    "message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + "
    "message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' "
    "+ message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# name: (chat template, BOS the model adds itself or None, EOS, whether it takes a system message)
CHATS = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", True),
    "chatml": (CHATML, None, "<|im_end|>", True),
    "gemma": (GEMMA, "<bos>", "<eos>", False),
    "mistral": (MISTRAL, "<s>", "</s>", False),
    "phi3": (PHI3, None, "<|end|>", True),
}
EOS = "</s>"


def chat_renderer(name: str):
    """The chat template rendered by transformers, as apply_chat_template renders it."""
    source, bos, eos, _ = CHATS[name]

    def render(messages, add_generation_prompt):
        rendered, _ = render_jinja_template(
            conversations=[messages],
            chat_template=source,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos or "",
            eos_token=eos,
        )
        return rendered[0]

    return render


def ollama(modelfile: str, *conversations: list[dict[str, str]]) -> dict:
    request = [{"modelfile": modelfile, "conversations": list(conversations)}]
    done = subprocess.run(
        [consumers.binary("ollama-modelfile")],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        check=True,
    )
    (result,) = json.loads(done.stdout)
    assert "error" not in result, result["error"]
    return result


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


INSTRUCTION_TEMPLATES = {
    "alpaca": PromptTemplate(type="alpaca"),
    "alpaca-system": PromptTemplate(type="alpaca", systemPrompt="You answer {{ in }} one word."),
    "alpaca-no-eos": PromptTemplate(type="alpaca", addEos=False),
    "r1-reasoning": PromptTemplate(type="r1-reasoning"),
    "custom": PromptTemplate(type="custom", format="Q: {question}\nA: {answer}"),
}
ROW = {
    "alpaca": lambda q, a: {"instruction": q, "input": "", "output": a},
    "r1-reasoning": lambda q, a: {
        "Question": q,
        "Complex_CoT": a.split("\n</think>\n")[0],
        "Response": a.split("\n</think>\n")[1],
    },
    "custom": lambda q, a: {"question": q, "answer": a},
}
ANSWER = {"r1-reasoning": "Count them.\n</think>\nFour."}


@pytest.mark.parametrize("name", INSTRUCTION_TEMPLATES)
def test_instruction_family_single_and_multi_turn(name):
    template = INSTRUCTION_TEMPLATES[name]
    answer = ANSWER.get(template.type, "Four.")
    result = ollama(
        modelfile_for(template, "m.gguf", EOS),
        [user("How many legs has a cat?")],
        [user("How many legs has a cat?"), assistant(answer), user("And a bird?")],
    )
    one, two = result["prompts"]
    assert one == render_prompt(template, "How many legs has a cat?")
    sample = render_row(template, ROW[template.type]("How many legs has a cat?", answer), EOS)
    if not template.add_eos:
        sample += "\n\n"  # no EOS to end the turn: a blank line before the next sample
    assert two == sample + render_prompt(template, "And a bird?")


@pytest.mark.parametrize("name", ["alpaca", "alpaca-system", "r1-reasoning"])
def test_system_message_replaces_the_preamble(name):
    """The Modelfile's SYSTEM is the preamble; a user's system message takes its place."""
    template = INSTRUCTION_TEMPLATES[name]
    result = ollama(
        modelfile_for(template, "m.gguf", EOS),
        [{"role": "system", "content": "Be terse."}, user("Hi")],
    )
    assert result["system"] == preamble(template)
    assert result["prompts"] == [
        render_prompt(template.model_copy(update={"system_prompt": "Be terse."}), "Hi")
    ]


def test_alpaca_default_system_is_the_preamble():
    assert ollama(modelfile_for(PromptTemplate(type="alpaca"), "m.gguf", EOS))["system"] == ALPACA_PREAMBLE


def test_custom_format_puts_a_system_message_first():
    template = INSTRUCTION_TEMPLATES["custom"]
    result = ollama(
        modelfile_for(template, "m.gguf", EOS), [{"role": "system", "content": "Be terse."}, user("Hi")]
    )
    assert "system" not in result
    assert result["prompts"] == ["Be terse.\n\nQ: Hi\nA: "]


def _with_bos_removed(text: str, bos: str | None) -> str:
    return text[len(bos) :] if bos and text.startswith(bos) else text


@pytest.mark.parametrize(
    ("name", "system"),
    [(name, None) for name in CHATS] + [(name, "You are a vet.") for name in CHATS if CHATS[name][3]],
)
def test_chat_family_single_and_multi_turn(name, system):
    _, bos, eos, _ = CHATS[name]
    chat = chat_renderer(name)
    template = PromptTemplate(type="chat", systemPrompt=system)
    result = ollama(
        modelfile_for(template, "m.gguf", eos, chat, bos_token=bos),
        [user("How many legs has a cat?")],
        [user("How many legs has a cat?"), assistant("Four."), user("And a bird?")],
    )
    one, two = result["prompts"]
    assert one == _with_bos_removed(render_prompt(template, "How many legs has a cat?", chat), bos)
    conversation = [user("How many legs has a cat?"), assistant("Four."), user("And a bird?")]
    if system:
        conversation.insert(0, {"role": "system", "content": system})
    assert two == _with_bos_removed(chat(conversation, True), bos)
    assert result.get("system") == system


@pytest.mark.parametrize("name", ["llama3", "gemma", "mistral"])
def test_one_bos_when_the_model_adds_it(name):
    """Ollama (llama.cpp) puts the BOS before the prompt itself: the template must not write it."""
    _, bos, eos, _ = CHATS[name]
    result = ollama(
        modelfile_for(PromptTemplate(type="chat"), "m.gguf", eos, chat_renderer(name), bos_token=bos)
    )
    assert bos not in result["template"]


def test_chat_system_message_replaces_the_job_system_prompt():
    chat = chat_renderer("llama3")
    template = PromptTemplate(type="chat", systemPrompt="You are a vet.")
    result = ollama(
        modelfile_for(template, "m.gguf", "<|eot_id|>", chat, bos_token="<|begin_of_text|>"),
        [{"role": "system", "content": "Be terse."}, user("Hi")],
    )
    expected = chat([{"role": "system", "content": "Be terse."}, user("Hi")], True)
    assert result["prompts"] == [expected.removeprefix("<|begin_of_text|>")]


@pytest.mark.parametrize("eos", ["</s>", '<|"end"|>', "<\\end>", "### Ende: "])
def test_stop_strings_reach_ollama_verbatim(eos):
    template = PromptTemplate(type="alpaca")
    result = ollama(modelfile_for(template, "m.gguf", eos))
    assert result["parameters"]["stop"] == stop_strings("alpaca", eos)
    assert result["parameters"]["temperature"] == 0


def test_literal_braces_reach_the_prompt():
    template = PromptTemplate(type="custom", format="{{{{x}}}} {question}\n{answer}")
    result = ollama(modelfile_for(template, "m.gguf", EOS), [user("Hi")])
    assert result["prompts"] == [render_prompt(template, "Hi")]
