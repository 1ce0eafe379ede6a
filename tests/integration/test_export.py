"""Export end to end on a tiny Llama with a SentencePiece tokenizer, built here: real llama.cpp
converter, quantizer and loader, real S3 (moto's server over HTTP), a real SIGKILL mid-export."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import consumers
import pytest
from finetune_trainer.gguf import LOG_PROB_TOLERANCE
from finetune_trainer.spec import PromptTemplate
from finetune_trainer.templates import render_prompt
from s3server import TEST_CREDENTIALS, start_moto_server
from trainer_fixtures import build_tokenizer

pytestmark = pytest.mark.slow

BUCKET = "exports"
PROMPTS = ["the cat sat on", "one two three"]
CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "one two three four five six seven eight nine ten",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "red green blue yellow orange purple black white",
]


def train_steps(model: Any, tokenizer: Any, texts: list[str], steps: int, lr: float) -> None:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base model folder in bf16, LoRA adapter folder). The base is trained a little so its greedy
    continuations are decisive; the adapter is trained too, so the merge changes the weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    build_tokenizer(base, vocab_size=320, text=CORPUS * 20)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.unk_token
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,  # k-quants need rows that are multiples of 256
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    train_steps(model, tokenizer, CORPUS, steps=60, lr=3e-3)
    model.to(torch.bfloat16).save_pretrained(base)

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lora)
    train_steps(peft_model, tokenizer, ["the cat sat on the log", "one two three four"], steps=5, lr=1e-2)
    peft_model.save_pretrained(adapter)
    return base, adapter


@pytest.fixture(scope="module")
def s3() -> Any:
    """A moto S3 server with an empty bucket; yields (endpoint, boto3 client)."""
    import boto3

    saved = {k: os.environ.get(k) for k in TEST_CREDENTIALS}
    os.environ.update(TEST_CREDENTIALS)
    endpoint, stop = start_moto_server()
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    yield endpoint, client
    stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def job_spec(base: Path, endpoint: str, prefix: str, **export: Any) -> Any:
    from finetune_trainer.spec import TrainingSpec

    return TrainingSpec.model_validate(
        {
            "model": {"path": str(base)},
            "data": {"path": "/unused.jsonl"},
            "export": export,
            "samples": {"prompts": PROMPTS, "maxNewTokens": 12},
            "storage": {"uri": f"s3://{BUCKET}/{prefix}", "endpoint": endpoint},
        }
    )


def record_before(spec: Any, base: Path, store: Any) -> None:
    """What the trainer does before its first step."""
    from finetune_trainer.samples import record_before as record
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record(spec, AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base), store)


def s3_sha256(client: Any, key: str) -> str:
    return hashlib.sha256(client.get_object(Bucket=BUCKET, Key=key)["Body"].read()).hexdigest()


def state_of(client: Any, prefix: str) -> dict[str, Any]:
    return json.loads(client.get_object(Bucket=BUCKET, Key=f"{prefix}/export/state.json")["Body"].read())


def test_export_adapter_merged_and_verified_gguf_to_s3(
    tiny: tuple[Path, Path], s3: Any, tmp_path: Path
) -> None:
    from finetune_trainer.export import run_export
    from finetune_trainer.gguf import generate
    from finetune_trainer.storage import open_store
    from safetensors.torch import load_file

    base, adapter = tiny
    endpoint, client = s3
    spec = job_spec(
        base, endpoint, "job-a", merged_16bit=True, gguf=["f16", "q8_0", "q4_k_m"], verifyTokens=16
    )
    store = open_store(spec.storage, tmp_path / "unused")
    record_before(spec, base, store)

    artifacts = run_export(spec, base, adapter, store, tmp_path / "work", "cpu")

    by_name = {a["name"]: a for a in artifacts}
    assert set(by_name) == {
        "adapter",
        "merged_16bit",
        *(f"{kind}-{q}" for kind in ("gguf", "modelfile") for q in ("f16", "q8_0", "q4_k_m")),
        "samples-json",
        "samples-md",
    }
    out = tmp_path / "work" / "artifacts"
    for q in ("f16", "q8_0", "q4_k_m"):
        a, local = by_name[f"gguf-{q}"], out / f"model-{q}.gguf"
        assert a["uri"] == f"s3://{BUCKET}/job-a/artifacts/model-{q}.gguf"
        assert a["sizeBytes"] == local.stat().st_size
        assert a["sha256"] == s3_sha256(client, f"job-a/artifacts/model-{q}.gguf")
        assert a["sha256"] == hashlib.sha256(local.read_bytes()).hexdigest()
        # the stored file loads in llama.cpp and generates from a prompt
        client.download_file(BUCKET, f"job-a/artifacts/model-{q}.gguf", str(tmp_path / "dl.gguf"))
        assert len(generate(tmp_path / "dl.gguf", [[1, 5, 6, 7]], 4, gpu=False)[0]) >= 1
    assert by_name["adapter"]["sha256"] == s3_sha256(client, "job-a/artifacts/adapter/SHA256SUMS")
    assert by_name["merged_16bit"]["sha256"] == s3_sha256(client, "job-a/artifacts/merged_16bit/SHA256SUMS")

    stages = state_of(client, "job-a")["stages"]
    assert list(stages) == ["adapter", "merged", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "samples"]
    for q in ("f16", "q8_0", "q4_k_m"):
        # every file was checked against the merged model before it was stored
        assert stages[f"gguf-{q}"]["verifiedTokens"] == 16
        assert 0 <= stages[f"gguf-{q}"]["meanLogProbDelta"] <= LOG_PROB_TOLERANCE[q]
        assert all(stages[f"gguf-{q}"]["answers"])
    print(
        {
            q: (stages[f"gguf-{q}"]["meanLogProbDelta"], stages[f"gguf-{q}"]["maxLogProbDelta"])
            for q in ("f16", "q8_0", "q4_k_m")
        }
    )
    assert stages["gguf-f16"]["answers"] == stages["merged"]["after"]  # same greedy text as HF

    # the merge changed the weights (the adapter is not a no-op), in 16-bit
    merged = load_file(out / "merged_16bit" / "model.safetensors")
    original = load_file(base / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert merged[name].dtype == original[name].dtype
    assert not merged[name].equal(original[name])

    # The Modelfile as Ollama reads it: one turn is the prompt the export's answers were made from.
    modelfile = (out / "model-q8_0.Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf\n")
    request = [{"modelfile": modelfile, "conversations": [[{"role": "user", "content": PROMPTS[0]}]]}]
    done = subprocess.run(
        [consumers.binary("ollama-modelfile")],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        check=True,
    )
    (ollama,) = json.loads(done.stdout)
    assert ollama["prompts"] == [render_prompt(PromptTemplate(), PROMPTS[0])]
    assert ollama["parameters"]["stop"] == ["</s>", "### Instruction:"]

    records = json.loads(client.get_object(Bucket=BUCKET, Key="job-a/artifacts/samples.json")["Body"].read())
    assert [r["prompt"] for r in records] == PROMPTS
    assert all(r["before"] is not None and set(r["gguf"]) == {"f16", "q8_0", "q4_k_m"} for r in records)


CHILD = """
import sys, time
from pathlib import Path
from finetune_trainer.export import run_export
from finetune_trainer.spec import TrainingSpec
from finetune_trainer.storage import open_store

class StallAfterF16:
    '''Passes through to the real store; once the state records gguf-f16, hangs (to be killed).'''
    def __init__(self, inner):
        self.inner = inner
    def __getattr__(self, name):
        return getattr(self.inner, name)
    def put_bytes(self, key, data):
        self.inner.put_bytes(key, data)
        if key == "export/state.json" and b'"gguf-f16"' in data:
            time.sleep(3600)

spec = TrainingSpec.model_validate_json(Path(sys.argv[1]).read_text())
store = StallAfterF16(open_store(spec.storage, Path(sys.argv[4])))
run_export(spec, Path(sys.argv[2]), Path(sys.argv[3]), store, Path(sys.argv[4]), "cpu")
"""


def test_export_killed_mid_way_resumes_without_redoing_finished_stages(
    tiny: tuple[Path, Path], s3: Any, tmp_path: Path
) -> None:
    from finetune_trainer.export import run_export
    from finetune_trainer.storage import open_store

    base, adapter = tiny
    endpoint, client = s3
    spec = job_spec(base, endpoint, "job-b", gguf=["f16", "q8_0"])
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json(by_alias=True))
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))

    child = subprocess.Popen(
        [sys.executable, str(script), str(spec_file), str(base), str(adapter), str(tmp_path / "pod1")],
        env={**os.environ, **TEST_CREDENTIALS},
    )
    try:
        deadline = time.monotonic() + 600
        while "gguf-f16" not in _stages_or_empty(client, "job-b"):
            assert child.poll() is None, f"export exited early with {child.returncode}"
            assert time.monotonic() < deadline, "export never finished gguf-f16"
            time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()

    before = state_of(client, "job-b")["stages"]
    assert set(before) == {"adapter", "merged", "gguf-f16"}
    f16_modified = client.head_object(Bucket=BUCKET, Key="job-b/artifacts/model-f16.gguf")["LastModified"]

    # a new pod: empty work folder, same store
    store = open_store(spec.storage, tmp_path / "unused")
    artifacts = run_export(spec, base, adapter, store, tmp_path / "pod2", "cpu")

    after = state_of(client, "job-b")["stages"]
    for stage in ("adapter", "merged", "gguf-f16"):
        assert after[stage] == before[stage], f"{stage} was redone"
    assert (
        client.head_object(Bucket=BUCKET, Key="job-b/artifacts/model-f16.gguf")["LastModified"]
        == f16_modified
    )
    assert {"gguf-q8_0", "samples"} <= set(after)
    q8 = next(a for a in artifacts if a["name"] == "gguf-q8_0")
    assert q8["sha256"] == s3_sha256(client, "job-b/artifacts/model-q8_0.gguf")


def _stages_or_empty(client: Any, prefix: str) -> dict[str, Any]:
    try:
        return state_of(client, prefix)["stages"]
    except client.exceptions.NoSuchKey:
        return {}


def test_push_is_off_by_default_and_never_leaks_the_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    from finetune_trainer.gguf import ExportError
    from finetune_trainer.hubpush import push_folder
    from finetune_trainer.spec import ExportSpec, HubPush

    assert ExportSpec().push is None
    with socket.socket() as s:  # a port nobody listens on: the hub is unreachable
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "a.txt").write_text("x")
    token = "hf_SECRET_never_printed_123"
    push = HubPush(repo="me/model", tokenSecretRef={"name": "hub", "key": "token"})
    with caplog.at_level("DEBUG"), pytest.raises(ExportError) as e:
        push_folder(tmp_path, push, {"HF_PUSH_TOKEN": token, "HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert "push to me/model failed" in str(e.value)
    assert token not in str(e.value) and token not in caplog.text
    assert e.value.__cause__ is None and e.value.__suppress_context__


def vendored_gguf() -> Any:
    """The gguf-py package of the llama.cpp tree the converter runs from (it reads what it writes)."""
    from finetune_trainer.gguf import llama_cpp_dir

    gguf_py = str(llama_cpp_dir() / "gguf-py")
    sys.path.insert(0, gguf_py)
    try:
        import gguf
    finally:
        sys.path.remove(gguf_py)
    return gguf


def test_streamed_gguf_is_the_converters_file_of_the_merged_folder(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    """gguf_write (merged tensors, quantized in torch) against llama.cpp's own convert_hf_to_gguf.py
    run on the merged folder: the same tensors, types and bytes, the same metadata but the name
    (taken from the input folder's name)."""
    from finetune_trainer import gguf as g
    from finetune_trainer.merge import merge_adapter

    reader = vendored_gguf().GGUFReader
    base, adapter = tiny
    merge_adapter(base, adapter, tmp_path / "merged", "cpu")
    for outtype in ("q8_0", "f16"):
        ours, theirs = tmp_path / f"ours-{outtype}.gguf", tmp_path / f"cli-{outtype}.gguf"
        g.write_merged(base, adapter, ours, outtype, "cpu")
        g.convert(tmp_path / "merged", theirs, outtype)
        a, b = reader(ours), reader(theirs)
        assert [(t.name, t.tensor_type, t.shape.tolist()) for t in a.tensors] == [
            (t.name, t.tensor_type, t.shape.tolist()) for t in b.tensors
        ]
        for x, y in zip(a.tensors, b.tensors, strict=True):
            assert x.data.tobytes() == y.data.tobytes(), f"{outtype} {x.name}"
        fields = {k for k in a.fields if k != "general.name"}
        assert fields == {k for k in b.fields if k != "general.name"}
        assert all(a.fields[k].parts[-1].tobytes() == b.fields[k].parts[-1].tobytes() for k in fields)


def test_a_wrong_gguf_fails_the_check(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Shuffling the rows of one attention projection (the kind of error a wrong tensor layout
    makes) moves the verified log-probabilities far past every type's tolerance."""
    import numpy as np
    from finetune_trainer import gguf as g
    from finetune_trainer.export import teacher_forced_log_probs
    from finetune_trainer.merge import merged_model
    from finetune_trainer.samples import greedy_ids
    from transformers import AutoTokenizer

    base, adapter = tiny
    path = tmp_path / "model-q8_0.gguf"
    g.write_merged(base, adapter, path, "q8_0", "cpu")
    tok = AutoTokenizer.from_pretrained(base)
    model = merged_model(base, adapter, "cpu")
    prompt = tok(PROMPTS[0])["input_ids"]
    reference = greedy_ids(model, tok, prompt, 12)
    expected = [teacher_forced_log_probs(model, prompt, reference)]

    def check(actual: list[list[float]], quant: str) -> float:
        mean, _largest = g.check_log_probs(
            quant, prompts=PROMPTS[:1], expected=expected, actual=actual, token_text=str, tokens=[reference]
        )
        return mean

    assert check(g.gguf_log_probs(path, [prompt], [reference]), "q8_0") <= LOG_PROB_TOLERANCE["q8_0"]

    file = vendored_gguf().GGUFReader(path, "r+")
    tensor = next(t for t in file.tensors if t.name == "blk.0.attn_q.weight")
    tensor.data[:] = np.array(tensor.data)[np.random.default_rng(0).permutation(len(tensor.data))]
    file.data.flush()
    del file
    bad = g.gguf_log_probs(path, [prompt], [reference])
    mean = sum(abs(a - b) for a, b in zip(expected[0], bad[0], strict=True)) / len(reference)
    print(f"shuffled attn_q: mean log-probability difference {mean:.3f}")
    assert mean > 4 * max(LOG_PROB_TOLERANCE.values())
    with pytest.raises(g.ExportError, match=r"export\.verifyTokens"):
        check(bad, "q4_k_m")
