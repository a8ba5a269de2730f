"""Log-probs of given completions under the target policy pi_theta (one forward pass, with gradient).

Used by the GRPO update (log pi_theta of the sampled tokens) and by the SFT warm-up (cross-entropy is
minus the mean of the same quantity over solution tokens).
"""

from __future__ import annotations

import torch


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
    log-softmax is taken in float32 whatever the model's dtype.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    length = completion_ids.shape[1]
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=length + 1,
    ).logits[:, :-1]
    logits = logits.float() / (temperature or 1.0)
    chosen = logits.gather(-1, completion_ids[..., None]).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)
