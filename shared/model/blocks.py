"""The paged KV cache's block rule, torch-free: the engine allocates by it and the scheduler (and
the simulations, through the scheduler's memory plan) count by it, so they always agree."""

from __future__ import annotations


def blocks_for(positions: int, block_size: int) -> int:
    """KV cache blocks of ``block_size`` positions that hold ``positions`` positions."""
    return -(-positions // block_size)
