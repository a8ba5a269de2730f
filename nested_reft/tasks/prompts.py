"""Prompt templates: the Qwen-math chat template of Liu et al. 2025, and a plain one for base models.

The paper formats prompts "using a Qwen-chat template commonly used by practitioners [Liu et al., 2025]": a
system message asking for step-by-step reasoning and a boxed answer, the question as the user message, and
the assistant turn opened. With a ChatML tokenizer (Qwen2.5-Math, SmolLM2) this gives exactly

    <|im_start|>system\\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n
"""

from __future__ import annotations

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

# For tokenizers without a chat template (base models, GPT-2): the same instruction, in plain text.
PLAIN_TEMPLATE = "Question: {question}\n{instruction}\nAnswer:"


def build_prompt(tokenizer, question: str) -> str:
    """The prompt text for `question`: the tokenizer's chat template with the Qwen-math system prompt and the
    assistant turn opened, or `PLAIN_TEMPLATE` where the tokenizer has no chat template.

    Some chat templates refuse a system role (Gemma's raises "System role not supported"); for those the
    instruction goes after the question in the user message, so the model still sees it.
    """
    if not getattr(tokenizer, "chat_template", None):
        return PLAIN_TEMPLATE.format(question=question, instruction=SYSTEM_PROMPT)
    from jinja2.exceptions import TemplateError

    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError:
        messages = [{"role": "user", "content": f"{question}\n{SYSTEM_PROMPT}"}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
