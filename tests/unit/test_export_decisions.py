from __future__ import annotations

import numpy as np
import pytest
from finetune_trainer.artifacts import empty_state, parse_sums, with_stage
from finetune_trainer.export import plan_stages
from finetune_trainer.gguf import LOG_PROB_TOLERANCE, ExportError, check_log_probs, log_probs_of
from finetune_trainer.merge import merged_dtype
from finetune_trainer.samples import samples_document, samples_markdown
from finetune_trainer.spec import ExportSpec


def test_default_export_writes_q8_0_without_an_f16_stage() -> None:
    assert plan_stages(ExportSpec(), has_prompts=False) == ["adapter", "merged", "gguf-q8_0"]


def test_adapter_only_when_nothing_else_is_asked() -> None:
    assert plan_stages(ExportSpec(gguf=[]), has_prompts=False) == ["adapter"]


def test_full_plan_order_follows_the_spec() -> None:
    spec = ExportSpec(
        merged_16bit=True,
        gguf=["q4_k_m", "f16", "bf16", "f16"],
        push={"repo": "me/m", "tokenSecretRef": {"name": "s", "key": "k"}},
    )
    assert plan_stages(spec, has_prompts=True) == [
        "adapter",
        "merged",
        "gguf-q4_k_m",
        "gguf-f16",
        "gguf-bf16",
        "samples",
        "push",
    ]


def test_log_probs_of_rows() -> None:
    logits = np.array([[0.0, 0.0], [3.0, 1.0]])
    got = log_probs_of(logits, [1, 0])
    assert got == pytest.approx([np.log(0.5), 3.0 - np.log(np.exp(3.0) + np.exp(1.0))])


def test_log_prob_check_passes_within_tolerance_and_reports_mean_and_largest() -> None:
    tol = LOG_PROB_TOLERANCE["q8_0"]
    mean, largest = check_log_probs(
        "q8_0",
        prompts=["a", "b"],
        expected=[[-0.1, -2.0], [-0.5]],
        # one position off by more than the tolerance: a single near-tie does not fail the file
        actual=[[-0.1 - 2 * tol, -2.0], [-0.5 + tol / 2]],
        token_text=str,
        tokens=[[5, 6], [7]],
    )
    assert mean == pytest.approx(2.5 * tol / 3) and largest == pytest.approx(2 * tol)


def test_log_prob_check_names_the_mean_the_tolerance_and_the_worst_token() -> None:
    with pytest.raises(ExportError) as e:
        check_log_probs(
            "f16",
            prompts=["hi there"],
            expected=[[-0.2, -0.3, -1.0]],
            actual=[[-0.2, -0.3, -4.5]],
            token_text=lambda t: f"<t{t}>",
            tokens=[[7, 8, 9]],
        )
    message = str(e.value)
    assert "export.verifyTokens" in message and "3 greedy tokens" in message and "1.167 nats" in message
    assert "0.01 allowed for f16" in message
    assert "token 2 of the answer to 'hi there', 9 '<t9>': GGUF -4.500, merged model -1.000" in message


def test_every_exportable_type_has_a_tolerance() -> None:
    from typing import get_args

    from finetune_trainer.spec import GgufQuantization

    assert set(get_args(GgufQuantization)) == set(LOG_PROB_TOLERANCE)


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
