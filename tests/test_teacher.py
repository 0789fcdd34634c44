"""Teachers: resolution (local dir, hub cache, packaged GGUF), family check, loading, tiny tokenizer."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import gguf
import pytest
import torch

from merge_xlstm import teacher as teacher_module
from merge_xlstm.errors import UserError
from merge_xlstm.registry import Registry
from merge_xlstm.teacher import cache_dir, load_teacher, resolve_teacher, teacher_family
from merge_xlstm.testing import tiny_config, tiny_tokenizer

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
UNSUPPORTED = "teacher model_type 'gpt2' is not supported (supported: llama, olmo2, qwen2)"


# ------------------------------------------------------------------------------ tiny tokenizer
def test_tiny_tokenizer_matches_the_tiny_teachers() -> None:
    tok = tiny_tokenizer()
    assert len(tok) <= tiny_config("llama").vocab_size
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "def add(a, b):\n    return a + b  # ~!"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < len(tok)
    assert tok("é")["input_ids"] == [tok.unk_token_id]


def test_tiny_tokenizer_instances_are_independent() -> None:
    first = tiny_tokenizer()
    first.padding_side = "left"
    assert tiny_tokenizer().padding_side == "right"


def test_tiny_tokenizer_chat_template_survives_save(tmp_path: Path) -> None:
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    rendered = loaded.apply_chat_template(chat, tokenize=False)
    assert rendered == "<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"
    prompt = loaded.apply_chat_template(chat[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert loaded.convert_ids_to_tokens(prompt) == ["<|user|>", "\n", "H", "i", "</s>", "\n", "<|assistant|>", "\n"]


# ------------------------------------------------------------------------ tiny teachers, families
def test_load_teacher_round_trips_each_family(teacher: torch.nn.Module, teacher_dir: Path) -> None:
    model, tok = load_teacher(teacher_dir)
    assert not model.training and model.config.model_type == teacher.config.model_type
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    ids = torch.tensor([tok("hello teacher")["input_ids"]])
    with torch.no_grad():  # close, not equal: the loaded model uses SDPA, the tiny teacher eager attention
        torch.testing.assert_close(model(ids).logits, teacher(ids).logits)


def test_teacher_family_accepts_supported_configs(family: str, tmp_path: Path) -> None:
    tiny_config(family).save_pretrained(tmp_path)
    assert teacher_family(tmp_path) == family


def test_unsupported_family_is_one_line_error(tmp_path: Path) -> None:
    from transformers import GPT2Config

    gpt2_dir = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(gpt2_dir)
    with pytest.raises(UserError) as err:
        teacher_family(gpt2_dir)
    assert str(err.value) == f"{gpt2_dir}: {UNSUPPORTED}"
    # load_teacher refuses it from config.json alone, before looking for weights or a tokenizer
    with pytest.raises(UserError, match=re.escape(UNSUPPORTED)):
        load_teacher(gpt2_dir)


def test_missing_pad_token_becomes_eos(teacher_dir: Path) -> None:
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(teacher_dir)
    _, loaded = load_teacher(teacher_dir)
    assert loaded.pad_token == loaded.eos_token == "</s>"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("./no/such/teacher", "no such model directory"),
        ("not a hub id", "no such model directory"),
        ("no-such-org/no-such-model", "neither a local directory nor in the Hugging Face cache"),
    ],
)
def test_unresolvable_teachers_are_one_line_errors(name: str, message: str) -> None:
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        resolve_teacher(name)
    assert str(err.value).startswith(f"{name}: {message}") and "\n" not in str(err.value)
    assert time.perf_counter() - start < 5  # offline: no waiting on the network


def test_incomplete_teacher_dirs_are_user_errors(teacher_dir: Path) -> None:
    (teacher_dir / "model.safetensors").unlink()
    with pytest.raises(UserError, match="cannot load the teacher: .*no file named model.safetensors"):
        load_teacher(teacher_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (teacher_dir / name).unlink()
    with pytest.raises(UserError, match="no tokenizer files"):
        load_teacher(teacher_dir)
    with pytest.raises(UserError, match="expected a model directory, got a file"):
        resolve_teacher(teacher_dir / "config.json")


def test_concurrent_packaged_conversions_do_not_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes converting the same packaged teacher at once: one wins, the other uses its copy."""
    fake = Registry("packaged teacher")
    fake.register("test-org/fake-teacher")(lambda: Path("fake.gguf"))
    monkeypatch.setattr(teacher_module, "PACKAGED_TEACHERS", fake)
    both_converting = threading.Barrier(2, timeout=30)
    conversions = []

    def convert(gguf_path: Path, out: Path) -> None:
        conversions.append(out)
        both_converting.wait()  # neither has renamed its result into place yet
        (out / "config.json").write_text(f'{{"model_type": "llama", "writer": {len(conversions)}}}')

    monkeypatch.setattr(teacher_module, "_convert_gguf", convert)
    results: list[Path] = []
    def resolve() -> None:
        results.append(resolve_teacher("test-org/fake-teacher"))

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    target = cache_dir() / "teachers" / "test-org--fake-teacher"
    assert results == [target, target] and len(conversions) == 2
    assert teacher_family(target) == "llama"
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []  # no temp leftovers
    assert resolve_teacher("test-org/fake-teacher") == target and len(conversions) == 2  # cached now


# ---------------------------------------------------------------------------- packaged SmolLM2
@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """SmolLM2 resolved offline: the session's first call converts the packaged GGUF into the cache."""
    path = resolve_teacher(SMOLLM2)
    assert path == cache_dir() / "teachers" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    return path


def greedy_answer(model: torch.nn.Module, tok, question: str, new_tokens: int = 12) -> str:
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_packaged_smollm2_is_a_plain_safetensors_dir(smollm2_dir: Path) -> None:
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert not any(name.endswith((".gguf", ".bin")) for name in names)
    assert teacher_family(smollm2_dir) == "llama"
    assert "quantization_config" not in (smollm2_dir / "config.json").read_text()


@pytest.mark.slow
def test_packaged_smollm2_cache_is_reused(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(gguf, "GGUFReader", no_gguf)  # every GGUF read in transformers goes through it
    monkeypatch.setattr(teacher_module, "_convert_gguf", no_gguf)
    assert resolve_teacher(SMOLLM2) == smollm2_dir
    model, tok = load_teacher(SMOLLM2)
    assert model.dtype == torch.float32 and tok.pad_token is not None
    assert weights.stat().st_mtime_ns == before


@pytest.mark.slow
def test_packaged_smollm2_answers_greedily_and_deterministically(smollm2_dir: Path) -> None:
    answers = []
    for _ in range(2):
        model, tok = load_teacher(SMOLLM2)
        answers.append(greedy_answer(model, tok, "What is the capital of France?"))
        del model
    assert "Paris" in answers[0]  # observed: "The capital of France is Paris."
    assert answers[1] == answers[0]
