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

from engine.protocol import EngineError

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


class DeepPrompts:
    """Deep visual prompt tuning (VPT, Jia et al. 2022) for a ViT encoder with ``blocks``,
    ``embed_dim``, ``patch_size`` and ``prompts`` (None until ``add_prompts``); shared by the
    Prithvi, Clay and timm ViTs (through ``ViTBlocks``, whose block loop runs block ``i`` on
    ``insert_prompts(i, tokens, prefix)`` and passes its output through ``remove_prompts``)."""

    def add_prompts(self, tokens: int, dropout: float = 0.1) -> None:
        """Deep visual prompts: ``tokens`` learned tokens per block, inserted after CLS before
        the block and dropped after it, so the outputs keep their layout. Initialised uniform in
        ±sqrt(6 / (3·p² + D)), as in the VPT paper (Xavier over the patch's inputs)."""
        if tokens < 1:
            raise EngineError(f"VPT needs at least one prompt token, not {tokens}")
        bound = (6.0 / (3 * self.patch_size ** 2 + self.embed_dim)) ** 0.5
        device = next(self.blocks.parameters()).device
        self.prompts = nn.Parameter(torch.empty(len(self.blocks), tokens, self.embed_dim, device=device)
                                    .uniform_(-bound, bound))
        self.prompt_dropout = nn.Dropout(dropout)

    def insert_prompts(self, i: int, tokens: torch.Tensor, prefix: int = 1) -> torch.Tensor:
        """[B, prefix + N, D] → [B, prefix + n + N, D]: block ``i``'s n prompts after the prefix
        tokens (CLS, registers)."""
        prompts = self.prompt_dropout(self.prompts[i]).unsqueeze(0).expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        return torch.cat([tokens[:, :prefix], prompts, tokens[:, prefix:]], dim=1)

    def remove_prompts(self, tokens: torch.Tensor, prefix: int = 1) -> torch.Tensor:
        """The block's output without its prompts: the layout the block was given."""
        return torch.cat([tokens[:, :prefix], tokens[:, prefix + self.prompts.shape[1]:]], dim=1)


class ViTBlocks(DeepPrompts):
    """The block loop of a ViT encoder (Prithvi, Clay, timm ViTs): checkpointed frozen blocks,
    deep prompts, the outputs of the chosen blocks (the last after the final norm). The encoder
    provides ``embed_tokens(x, *args) -> (tokens, prefix, grid)``, ``tokens_to_image(tokens,
    prefix, grid)``, ``blocks``, ``norm``, ``feature_layers``, ``prompts`` and ``adapter``."""

    def _blocks(self, x: torch.Tensor, *embed_args, keep: set[int] | None = None,
                as_image: bool = False) -> dict[int, torch.Tensor]:
        """Tokens after the blocks in ``keep`` (None: every block), the last block's after the
        final norm; ``as_image``: as feature maps instead (``tokens_to_image``), made as each
        block ends (the order of operations, and so the gradients to the last bit, of the loop
        before this was shared)."""
        tokens, prefix, grid = self.embed_tokens(x, *embed_args)
        out = {}
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            # frozen blocks (PEFT) in training: activation checkpointing, the same values
            checkpoint = checkpoint_block(block)
            if self.prompts is None:
                tokens = run_block(block, tokens, checkpoint)
            else:  # deep VPT: this block's prompts after the prefix tokens, removed from its output
                tokens = self.remove_prompts(run_block(block, self.insert_prompts(i, tokens, prefix), checkpoint),
                                             prefix)
            if keep is None or i in keep:
                out[i] = self.norm(tokens) if i == last else tokens
                if as_image:
                    out[i] = self.tokens_to_image(out[i], prefix, grid)
        return out

    def forward_features(self, x: torch.Tensor, *embed_args) -> list[torch.Tensor]:
        """Every block's output tokens [B, prefix + N, D] (CLS first; the last after the final norm)."""
        out = self._blocks(x, *embed_args)
        return [out[i] for i in range(len(self.blocks))]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature layers' outputs as maps (or the ViT-Adapter's pyramid when it is attached)."""
        if self.adapter is not None:
            return self.adapter(self, x)
        out = self._blocks(x, keep=set(self.feature_layers), as_image=True)
        return [out[i] for i in self.feature_layers]
