"""Log-probs of chosen tokens, computed in row chunks: the same values and gradients as a float32 log-softmax over
the whole vocabulary, without keeping a float32 copy of the logits for the backward pass."""

from __future__ import annotations

import contextlib

import pytest
import torch

from nested_reft.engines.logprobs import chosen_logprobs, kl_from_logits


def reference(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """The whole-vocabulary computation `completion_logprobs` did before the chunks."""
    scaled = logits.float() / temperature
    return scaled.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 1000])
def test_chunked_logprobs_and_gradients_are_the_whole_log_softmaxs_to_the_bit(dtype, chunk_rows, temperature):
    """The same bits, not only close values: a run trains as it did before the chunks (ReFT on a small model is
    chaotic: a gradient 1e-6 off changed a study run's rewards from step 5 on)."""
    generator = torch.Generator().manual_seed(chunk_rows)
    logits = (3 * torch.randn(3, 5, 50, generator=generator)).to(dtype)
    tokens = torch.randint(0, 50, (3, 5), generator=generator)
    weights = torch.randn(3, 5, generator=generator)
    ours_in, theirs_in = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours, theirs = chosen_logprobs(ours_in, tokens, temperature, chunk_rows), reference(theirs_in, tokens, temperature)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    assert ours.dtype == torch.float32 and ours.shape == (3, 5)
    assert torch.equal(ours, theirs)
    assert ours_in.grad.dtype == dtype and torch.equal(ours_in.grad, theirs_in.grad)


def test_the_backward_keeps_the_logits_and_no_float32_copy():
    """What autograd saves for the backward pass: the bfloat16 logits and the token ids, nothing of size V in
    float32 (a whole log-softmax keeps its float32 input)."""
    logits = torch.randn(4, 6, 64).to(torch.bfloat16).requires_grad_(True)
    tokens = torch.randint(0, 64, (4, 6))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        chosen_logprobs(logits, tokens, 1.0, chunk_rows=5).sum()
    assert sorted((str(t.dtype), tuple(t.shape)) for t in saved) == [("torch.bfloat16", (4, 6, 64)),
                                                                       ("torch.int64", (4, 6))]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        reference(logits, tokens, 1.0).sum()
    assert any(t.dtype == torch.float32 and t.shape[-1] == 64 for t in saved)  # what the chunks avoid


def test_training_forwards_attend_without_cudnn_on_cuda_and_as_before_elsewhere(monkeypatch):
    """cuDNN's SDPA backward gives NaN gradients on Hopper for padded batches (pytorch/pytorch#196678): the forward
    pass that gradients flow through must not choose it; on a CPU the backends are left alone."""
    import nested_reft.engines.logprobs as policy

    chosen = []
    monkeypatch.setattr(policy, "sdpa_kernel", lambda backends: chosen.append(backends) or contextlib.nullcontext())
    policy.attention_for_training(torch.device("cuda"))
    assert chosen and torch.nn.attention.SDPBackend.CUDNN_ATTENTION not in chosen[0]
    assert torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION in chosen[0]  # masks need a backend that takes them
    assert isinstance(policy.attention_for_training(torch.device("cpu")), contextlib.nullcontext)
    assert len(chosen) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_chunked_kl_and_its_gradient_equal_a_whole_float64_kl_and_only_the_model_side_moves(dtype, chunk_rows):
    generator = torch.Generator().manual_seed(chunk_rows)
    target, logits = ((3 * torch.randn(2, 3, 5, 40, generator=generator)).to(dtype) for _ in range(2))
    weights = torch.randn(2, 3, 5, generator=generator)
    target_in, ours_in = target.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    theirs_in = logits.double().requires_grad_(True)
    ours = kl_from_logits(target_in, ours_in, chunk_rows)
    log_p = torch.log_softmax(target.double(), dim=-1)
    theirs = (log_p.exp() * (log_p - torch.log_softmax(theirs_in, dim=-1))).sum(-1)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    assert ours.dtype == torch.float32 and ours.shape == (2, 3, 5) and (ours >= -1e-6).all()
    torch.testing.assert_close(ours.double(), theirs.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_in.grad.double(), theirs_in.grad, atol=1e-5 if dtype == torch.float32 else 1e-2,
                               rtol=0)
    assert target_in.grad is None  # the target is detached: the full model is not pulled towards the nested one
    assert kl_from_logits(logits, logits).abs().max() < 1e-5


def test_recomputed_forwards_attend_as_the_first_forward_did(monkeypatch):
    """Activation checkpointing reruns each layer's forward inside the backward pass; that rerun must choose the
    attention kernels the first forward chose (on an H200 it chose cuDNN's and torch refused the step)."""
    import transformers
    from accelerate import Accelerator

    import nested_reft.engines.logprobs as policy

    inside = []

    @contextlib.contextmanager
    def recording_choice(device):
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    monkeypatch.setattr(policy, "attention_for_training", recording_choice)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    seen = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(lambda *_: seen.append(bool(inside)))
    prompt = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(0))
    completion = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(1))
    logp = policy.completion_logprobs(model, prompt, torch.ones_like(prompt), completion, torch.ones_like(completion))
    policy.training_backward(Accelerator(cpu=True), logp.sum())
    assert seen == [True] * 4  # two layers' forwards, then their two recomputations
