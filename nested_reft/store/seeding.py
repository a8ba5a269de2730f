"""Seeded generators: every random draw of a run comes from a generator keyed by what it is for.

A generator seeded by a hash of (seed, step, purpose) alone draws the same values whatever ran before it,
so a run resumed at step s draws the data order, skip sets and tokens that the uninterrupted run drew, and
ranks or benchmarks that draw side by side do not share a stream.
"""

from __future__ import annotations

import hashlib

import torch


def seeded_generator(key: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator on `device` (where the draws happen) seeded from a SHA-256 of `key` alone."""
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def step_generator(seed: int, step: int, purpose: str, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator of one purpose ("skip", "data", "sample-<rank>", ...) at one step of a run seeded `seed`."""
    return seeded_generator(f"{seed}:{step}:{purpose}", device)
