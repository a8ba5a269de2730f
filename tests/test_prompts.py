"""Prompt templates: the Qwen-math chat prompt of Liu et al. 2025, the plain fallback, system-less templates."""

from __future__ import annotations

import copy

import pytest

from nested_reft.tasks.prompts import SYSTEM_PROMPT, build_prompt
from nested_reft.models.tiny import byte_tokenizer

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have now?"

# What Liu et al. (sail-sg/understand-r1-zero, apply_qwen_math_template) write by hand for Qwen2.5-Math.
QWEN_MATH = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    "<|im_start|>user\n" + QUESTION + "<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def chatml():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def plain(chatml):
    tokenizer = copy.deepcopy(chatml)
    tokenizer.chat_template = None
    return tokenizer


def test_system_prompt_is_the_qwen_math_one():
    assert SYSTEM_PROMPT == "Please reason step by step, and put your final answer within \\boxed{}."


def test_chat_template_gives_the_qwen_math_prompt(chatml):
    assert build_prompt(chatml, QUESTION) == QWEN_MATH


def test_prompt_is_a_string_that_tokenizes_back(chatml):
    prompt = build_prompt(chatml, QUESTION)
    ids = chatml(prompt, add_special_tokens=False)["input_ids"]
    assert chatml.decode(ids) == prompt


def test_plain_template_without_chat_template(plain):
    prompt = build_prompt(plain, QUESTION)
    assert prompt == f"Question: {QUESTION}\n{SYSTEM_PROMPT}\nAnswer:"
    assert "<|im_start|>" not in prompt


def test_braces_in_the_question_are_kept(chatml, plain):
    question = "Simplify $\\frac{6}{4}$ and write it as {a}/{b}."
    assert question in build_prompt(chatml, question)
    assert question in build_prompt(plain, question)


def test_template_without_system_role_gets_the_instruction_in_the_user_turn(chatml):
    tokenizer = copy.deepcopy(chatml)
    tokenizer.chat_template = (  # Gemma-style: refuses a system message
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    prompt = build_prompt(tokenizer, QUESTION)
    assert prompt == f"<start_of_turn>user\n{QUESTION}\n{SYSTEM_PROMPT}<end_of_turn>\n<start_of_turn>model\n"
