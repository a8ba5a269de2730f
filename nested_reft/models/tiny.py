"""Tiny random-initialised models and a byte-level tokenizer, built offline from configs.

They exist so that every code path (nesting, rollouts, GRPO, SFT, sweeps) can be exercised in seconds on
a CPU without a model hub: unit tests, the tiny benchmark rows and `load_model("tiny-llama")` all use them.
The weights are random, so their text is noise; the point is the shapes and the plumbing.
"""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# A Qwen-style chat template (ChatML), the format of Qwen2.5-Math-Instruct and SmolLM2-Instruct.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")

_COMMON = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=512)

# Architecture name -> (config class, extra config kwargs). One table, so adding an architecture is one line.
TINY_ARCHITECTURES: dict[str, tuple[type, dict]] = {
    "llama": (transformers.LlamaConfig, dict(_COMMON, num_key_value_heads=2)),
    "qwen2": (transformers.Qwen2Config, dict(_COMMON, num_key_value_heads=2)),
    "qwen3": (transformers.Qwen3Config, dict(_COMMON, num_key_value_heads=2, head_dim=8)),
    "mistral": (transformers.MistralConfig, dict(_COMMON, num_key_value_heads=2, sliding_window=None)),
    "gemma": (transformers.GemmaConfig, dict(_COMMON, num_key_value_heads=1, head_dim=8)),
    "gemma2": (
        transformers.Gemma2Config,
        dict(_COMMON, num_key_value_heads=2, head_dim=8, sliding_window=6, query_pre_attn_scalar=8),
    ),
    "phi3": (transformers.Phi3Config, dict(_COMMON, num_key_value_heads=2)),
    "gpt2": (transformers.GPT2Config, dict(n_embd=32, n_head=4, n_positions=512)),
    "gpt_neox": (transformers.GPTNeoXConfig, dict(_COMMON)),
    "opt": (
        transformers.OPTConfig,
        dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=512),
    ),
    "falcon": (transformers.FalconConfig, dict(hidden_size=32, num_attention_heads=4, new_decoder_architecture=False)),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges (256 byte tokens + ChatML specials), left-padded."""
    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(byte_to_unicode))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token=None,
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
        padding_side="left",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_config(architecture: str = "llama", num_layers: int = 6, vocab_size: int = 260) -> transformers.PretrainedConfig:
    """The config of a tiny `architecture` model with `num_layers` decoder blocks."""
    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {architecture!r}; expected one of {sorted(TINY_ARCHITECTURES)}")
    config_class, kwargs = TINY_ARCHITECTURES[architecture]
    tokenizer = byte_tokenizer()
    special_ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config = config_class(vocab_size=vocab_size, **special_ids, **kwargs)
    config.num_hidden_layers = num_layers  # GPT-2 style configs map this onto n_layer
    if getattr(config, "layer_types", None) is not None and len(config.layer_types) != num_layers:
        config.layer_types = config_class(vocab_size=vocab_size, num_hidden_layers=num_layers, **kwargs).layer_types
    return config


def tiny_model(
    architecture: str = "llama", num_layers: int = 6, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[transformers.PreTrainedModel, PreTrainedTokenizerFast]:
    """A random-initialised causal LM of `architecture` and its byte tokenizer, reproducible from `seed`."""
    tokenizer = byte_tokenizer()
    config = tiny_config(architecture, num_layers, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model.eval(), tokenizer
