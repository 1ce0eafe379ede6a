from __future__ import annotations

import pytest
from finetune_trainer.artifacts import empty_state, parse_sums, with_stage
from finetune_trainer.export import plan_stages
from finetune_trainer.gguf import ExportError, check_greedy_match, first_mismatch
from finetune_trainer.merge import merged_dtype
from finetune_trainer.samples import samples_document, samples_markdown
from finetune_trainer.spec import ExportSpec


def test_default_export_builds_f16_for_quantizing_and_checking() -> None:
    assert plan_stages(ExportSpec(), has_prompts=False) == ["adapter", "merged", "gguf-f16", "gguf-q8_0"]


def test_adapter_only_when_nothing_else_is_asked() -> None:
    assert plan_stages(ExportSpec(gguf=[]), has_prompts=False) == ["adapter"]


def test_full_plan_order() -> None:
    spec = ExportSpec(
        merged_16bit=True,
        gguf=["q4_k_m", "f16", "bf16"],
        push={"repo": "me/m", "tokenSecretRef": {"name": "s", "key": "k"}},
    )
    assert plan_stages(spec, has_prompts=True) == [
        "adapter",
        "merged",
        "gguf-f16",
        "gguf-q4_k_m",
        "gguf-bf16",
        "samples",
        "push",
    ]


def test_first_mismatch() -> None:
    assert first_mismatch([1, 2, 3], [1, 2, 3], 3) is None
    assert first_mismatch([1, 2, 3], [1, 5, 3], 3) == 1
    assert first_mismatch([1, 2, 3, 4], [1, 2, 3, 5], 3) is None  # beyond n
    assert first_mismatch([1, 2], [1, 2, 3], 3) == 2  # HF stopped, GGUF went on
    assert first_mismatch([1, 2], [1, 2], 16) is None  # both stopped


def test_greedy_mismatch_names_position_and_both_tokens() -> None:
    with pytest.raises(ExportError) as e:
        check_greedy_match(["hi"], [[7, 8, 9]], [[7, 8, 4]], 3, lambda t: f"<t{t}>")
    assert "position 2 of 3" in str(e.value)
    assert "9 '<t9>'" in str(e.value) and "4 '<t4>'" in str(e.value)
    assert "export.verifyTokens" in str(e.value)


def test_merged_dtype_keeps_16_bit_bases() -> None:
    assert merged_dtype("torch.float16") == "float16"
    assert merged_dtype("bfloat16") == "bfloat16"
    assert merged_dtype("float32") == "bfloat16"
    assert merged_dtype(None) == "bfloat16"


def test_state_records_stages_without_mutating() -> None:
    state = empty_state()
    later = with_stage(state, "adapter", {"artifacts": []}, 1.23456)
    assert state["stages"] == {}
    assert later["stages"]["adapter"]["seconds"] == 1.235


def test_parse_sums() -> None:
    assert parse_sums("abc  a/b.json\ndef  c d.bin\n") == {"a/b.json": "abc", "c d.bin": "def"}


def test_samples_document_and_markdown() -> None:
    records = samples_document(["p"], None, ["after"], {"q8_0": ["gg"]})
    assert records == [{"prompt": "p", "before": None, "after": "after", "gguf": {"q8_0": "gg"}}]
    md = samples_markdown(records)
    assert "_not recorded_" in md and "**GGUF q8_0 (llama.cpp)**" in md
    assert "````text\nx ``` y\n````" in samples_markdown(samples_document(["x ``` y"], ["b"], ["a"], {}))
