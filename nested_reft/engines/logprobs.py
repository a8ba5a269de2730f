"""Log-probs of given completions under the target policy pi_theta (one forward pass, with gradient).

Used by the GRPO update (log pi_theta of the sampled tokens) and by the SFT warm-up (cross-entropy is
minus the mean of the same quantity over solution tokens).
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

CHUNK_ROWS = 256  # rows of (position, vocabulary) turned into float32 at a time: 0.16 GB at Qwen's 152k vocabulary


def completion_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log softmax(logits / temperature) at each completion token: (N, T) float32.

    Prompts are left-padded (N, P), completions right-padded (N, T). Position ids follow the
    attention mask, as in sampling, so each token sees the positions it was sampled with. Only the T
    positions that predict completion tokens are turned into logits (`logits_to_keep`), and the
    log-softmax is taken in float32, a chunk of rows at a time, whatever the model's dtype.
    """
    logits = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    return chosen_logprobs(logits, completion_ids, temperature or 1.0)


def completion_logits(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor) -> torch.Tensor:
    """The logits that predict each completion token, (N, T, V) in the model's dtype. Apart from
    `completion_logprobs` for the warm-up's distillation, which compares whole distributions, not one token's."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    length = completion_ids.shape[1]
    with attention_for_training(input_ids.device):
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=length + 1,
        ).logits[:, :-1]


TRAINING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # on CUDA


def attention_for_training(device: torch.device) -> contextlib.AbstractContextManager:
    """The attention kernels a forward pass with gradient may use: on CUDA every SDPA backend but cuDNN's.

    Why: cuDNN's SDPA backward (torch's default backend on Hopper since 2.11) returns NaN query gradients when a
    mask is passed, the sequence length is 64 mod 128, and a row's logsumexp is very negative, as a left-padded
    prompt's padding rows are (pytorch/pytorch#196678, TRL's workaround: no cuDNN attention). On an H200 every
    ReFT step at 192 + 256 tokens had a NaN gradient norm and was skipped (docs/benchmarks.md). The backward
    runs the kernel its forward chose, so the forward is where to choose. Elsewhere nothing changes.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(TRAINING_ATTENTION)


def training_backward(accelerator, loss: torch.Tensor) -> None:
    """`accelerator.backward(loss)` under the forward's attention kernels (`attention_for_training`).

    Why: with activation checkpointing the backward pass recomputes each layer's forward, and that recomputation
    must choose the kernels the first forward chose: on an H200 it chose cuDNN's again outside the context, whose
    saved tensors differ in shape from the efficient kernel's, and torch refused the step (CheckpointError).
    """
    with attention_for_training(loss.device):
        accelerator.backward(loss)


def chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                    chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`: logits (..., V) in any float dtype, tokens (...) long;
    returns (...) float32, differentiable with respect to `logits`.

    Why not `log_softmax(logits.float())`: autograd would keep a float32 copy of every logit for the backward
    pass (n x T x V x 4 bytes: 2.5 GB for 16 completions of 256 tokens over Qwen's 152k vocabulary, more with
    the temporaries beside it). Here the float32 work is done `chunk_rows` rows at a time, in the forward and
    again in the backward, which keeps only the logits themselves (as the model returned them) and one
    chunk's float32 temporaries: TRL's `selective_log_softmax` does the row loop for the forward alone.
    """
    return _ChosenLogprobs.apply(logits, tokens, float(temperature), int(chunk_rows))


class _ChosenLogprobs(torch.autograd.Function):
    """Forward: chosen logit minus logsumexp, per row chunk in float32. Backward: d/dz log p(k) =
    (onehot(k) - softmax(z)) / temperature, the softmax recomputed per chunk as exp(z - logsumexp(z)), and every
    operation in the order autograd runs the whole-vocabulary computation's: the same bits (tests/test_policy.py),
    so runs reproduce what they did before the chunks."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, chunk_rows):
        flat, flat_tokens = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
        out = torch.empty(flat_tokens.shape, dtype=torch.float32, device=logits.device)
        for rows in _chunks(flat.shape[0], chunk_rows):
            scaled = flat[rows].float() / temperature
            out[rows] = scaled.gather(-1, flat_tokens[rows, None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)
        ctx.save_for_backward(logits, tokens)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return out.reshape(tokens.shape)

    @staticmethod
    def backward(ctx, grad_output):
        logits, tokens = ctx.saved_tensors
        flat, flat_tokens = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
        flat_grad = grad_output.reshape(-1).float()
        grad = torch.empty_like(flat)
        for rows in _chunks(flat.shape[0], ctx.chunk_rows):
            scaled = flat[rows].float() / ctx.temperature
            chosen_grad = flat_grad[rows, None]
            # logsumexp's backward, then gather's (a scatter of the chosen tokens' gradients), then the division's
            chunk = -chosen_grad * (scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)).exp()
            chunk.scatter_add_(-1, flat_tokens[rows, None], chosen_grad)
            grad[rows] = (chunk / ctx.temperature).to(grad.dtype)
        return grad.reshape(logits.shape), None, None, None


def kl_from_logits(target_logits: torch.Tensor, logits: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """KL(target || model) at each position, sum_v p(v) (log p(v) - log q(v)) with p = softmax(target_logits) and
    q = softmax(logits), both (..., V) in any float dtype; returns (...) float32, differentiable with respect to
    `logits` only (the target is what the model is pulled towards: the warm-up's sft.distill_nested).

    In row chunks, as `chosen_logprobs`, for the same reason twice over: two float32 copies of the logits kept for
    the backward would cost 2 x n x T x V x 4 bytes; autograd here keeps the two logit tensors as they are.
    """
    return _KLFromLogits.apply(target_logits.detach(), logits, int(chunk_rows))


class _KLFromLogits(torch.autograd.Function):
    """Forward: sum p (log p - log q) per row chunk in float32. Backward: d/dz KL = softmax(z) - p, recomputed
    per chunk."""

    @staticmethod
    def forward(ctx, target_logits, logits, chunk_rows):
        flat_target, flat = target_logits.reshape(-1, logits.shape[-1]), logits.reshape(-1, logits.shape[-1])
        out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        for rows in _chunks(flat.shape[0], chunk_rows):
            log_p = torch.log_softmax(flat_target[rows].float(), dim=-1)
            out[rows] = (log_p.exp() * (log_p - torch.log_softmax(flat[rows].float(), dim=-1))).sum(-1)
        ctx.save_for_backward(target_logits, logits)
        ctx.chunk_rows = chunk_rows
        return out.reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output):
        target_logits, logits = ctx.saved_tensors
        flat_target, flat = target_logits.reshape(-1, logits.shape[-1]), logits.reshape(-1, logits.shape[-1])
        flat_grad = grad_output.reshape(-1).float()
        grad = torch.empty_like(flat)
        for rows in _chunks(flat.shape[0], ctx.chunk_rows):
            difference = torch.softmax(flat[rows].float(), dim=-1) - torch.softmax(flat_target[rows].float(), dim=-1)
            grad[rows] = (difference * flat_grad[rows, None]).to(grad.dtype)
        return None, grad.reshape(logits.shape), None


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, total)) for start in range(0, total, max(size, 1))]
