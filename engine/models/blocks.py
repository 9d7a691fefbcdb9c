"""Running transformer blocks with activation checkpointing when only adapters train.

With PEFT (LoRA, DoRA, VPT, ViT-Adapter, linear probe) a block's own weights are frozen, yet
autograd still keeps every intermediate of every block (attention, the MLP's 4×-wide hidden
layer, LoRA's inputs) for the backward pass: most of training's memory. Checkpointing keeps only
each block's input and runs the block's forward once more during backward, in the same autocast
state and random-number state. The recomputation performs the same operations in the same order
on the same values, so the gradients are bit-for-bit those of the plain loop
(tests/test_checkpointing.py); the cost is one more forward of the blocks per step.

Every encoder's block loop calls ``run_block`` for each block::

    from engine.models.blocks import checkpoint_block, run_block

    for block in self.blocks:
        tokens = run_block(block, tokens, checkpoint_block(block))

Full fine-tuning is not checkpointed: there the weights, their gradients and the optimiser's
moments dominate memory, and the extra forward would cost time for a small saving.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

ADAPTER_MARKERS = ("lora_",)  # peft's LoRA/DoRA parameters (lora_A, lora_B, lora_magnitude_vector)
_enabled = True


def checkpointing_enabled() -> bool:
    return _enabled


@contextmanager
def checkpointing(enabled: bool):
    """Turn block checkpointing on or off for the duration (process-wide; for benchmarks that
    measure with and without it, and for tests)."""
    global _enabled
    before, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = before


def only_adapters_train(block: nn.Module) -> bool:
    """Whether none of ``block``'s parameters trains except peft adapters inside it."""
    return all(not p.requires_grad or any(m in name for m in ADAPTER_MARKERS)
               for name, p in block.named_parameters())


def checkpoint_block(block: nn.Module) -> bool:
    """Whether ``block`` should run checkpointed now: checkpointing is enabled, the block is in
    training mode, autograd is recording, and only adapters (or nothing) of the block train."""
    return _enabled and block.training and torch.is_grad_enabled() and only_adapters_train(block)


def run_block(block: nn.Module, tokens: torch.Tensor, checkpoint: bool, *args, **kwargs) -> torch.Tensor:
    """``block(tokens, *args, **kwargs)``; with ``checkpoint``, through non-reentrant activation
    checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``): only the inputs are kept,
    the block runs again in backward. Nothing is checkpointed when no gradient can flow through
    the block (a frozen block on inputs that need none: there is nothing to keep anyway)."""
    if checkpoint and (tokens.requires_grad or any(p.requires_grad for p in block.parameters())):
        return _checkpoint(block, tokens, *args, use_reentrant=False, **kwargs)
    return block(tokens, *args, **kwargs)
