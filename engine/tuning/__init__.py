"""Fine-tuning methods: which parameters train, and how adapters fold back into the backbone.

- ``lora`` / ``dora``: Hugging Face peft adapters on q, v, mlp.fc1 and mlp.fc2 of every
  encoder block (the paper's targets; r = α = 16); the backbone stays frozen.
- ``linear-probe``: the backbone stays frozen; only the light linear head trains (the paper's
  baseline; training picks the ``linear`` decoder for it).
- ``vpt``: deep visual prompt tuning (Jia et al. 2022, as in the paper): ``prompt_tokens``
  learned tokens (default 100, dropout 0.1) enter every encoder block after CLS and leave after
  it; the backbone stays frozen.
- ``vit-adapter``: the ViT-Adapter (Chen et al. 2023, as in the paper) around the frozen ViT:
  a convolutional spatial prior, injectors and extractors made of standard attention (so it
  runs on CPUs and exports to ONNX), giving a 1/4…1/32 pyramid; built with the model
  (``build_segmentor(method=...)``, see ``engine.tuning.vit_adapter``).
- ``full``: everything trains.
Neck and decoder always train. When some input bands have no pretrained counterpart
(``patch_embed``), the patch embedding trains too: its fresh columns would otherwise stay at
their random start, and they must be saved so a reloaded model is the trained one.
``merge`` folds adapters into plain Linear layers for export.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from engine.protocol import EngineError

METHODS = ("lora", "dora", "vpt", "vit-adapter", "full", "linear-probe")


@dataclass
class TuningConfig:
    method: str = "lora"
    rank: int = 16  # LoRA rank r
    alpha: int = 16  # LoRA scaling α
    dropout: float = 0.0
    prompt_tokens: int = 100  # VPT: learned tokens per block
    prompt_dropout: float = 0.1  # VPT: dropout on the prompts
    target_modules: str = ""  # regex of the layers LoRA adapts; "" → the backbone's own (the paper's)
    patch_embed: bool = False  # train (and save) the patch embedding: set when bands are fresh

    def as_dict(self) -> dict:
        return asdict(self)


def check_method(encoder: nn.Module, method: str) -> None:
    """Refuse a method the encoder cannot take (VPT or the ViT-Adapter on a CNN), naming what it
    supports: before anything loads (``build_segmentor``) and when tuning."""
    if method not in encoder.methods:
        name = getattr(getattr(encoder, "spec", None), "name", "this backbone")
        raise EngineError(f"tuning method {method!r} does not suit {name}",
                          hint=f"{name} supports: {', '.join(encoder.methods)}")


def apply_tuning(model: nn.Module, cfg: TuningConfig) -> nn.Module:
    """Set up ``model`` (a Segmentor) in place for ``cfg.method``; returns it."""
    if cfg.method not in METHODS:
        raise EngineError(f"unknown tuning method {cfg.method!r}", hint=f"choose one of: {', '.join(METHODS)}")
    check_method(model.encoder, cfg.method)
    if cfg.method == "vit-adapter" and getattr(model.encoder, "adapter", None) is None:
        raise ValueError("build the model with method='vit-adapter' (build_segmentor) before tuning it")
    if cfg.method == "full":
        model.requires_grad_(True)
        return model
    if cfg.method == "vpt":
        model.encoder.add_prompts(cfg.prompt_tokens, cfg.prompt_dropout)
    if cfg.method in ("lora", "dora"):
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                            target_modules=cfg.target_modules or lora_targets(model), use_dora=cfg.method == "dora")
        inject_adapter_in_model(config, model)  # freezes all but the adapters
    model.encoder.requires_grad_(False)
    for name, p in model.encoder.named_parameters():
        if "lora_" in name or name == "prompts" or name.startswith("adapter."):
            p.requires_grad_(True)
    first = getattr(model.encoder, "first_layer_key", None)
    if first:
        model.encoder.get_submodule(first.rsplit(".", 1)[0]).requires_grad_(cfg.patch_embed)
    model.neck.requires_grad_(True)
    model.decoder.requires_grad_(True)
    return model


def lora_targets(model: nn.Module) -> str:
    """The layers LoRA/DoRA adapt in ``model`` (a Segmentor): its encoder's own targets."""
    return r".*encoder\." + model.encoder.lora_targets


def trainable_state_dict(model: nn.Module, include_frozen: bool = False) -> dict:
    """Only what training changed: the tensors saved beside the model card.

    ``include_frozen``: everything, for a backbone that started from random weights (no file
    to reference, so it must travel with the model)."""
    keys = trainable_keys(model, include_frozen)
    return {k: _copy(v) for k, v in model.state_dict().items() if k in keys}


def trainable_keys(model: nn.Module, include_frozen: bool = False) -> set[str]:
    """The state-dict keys ``trainable_state_dict`` keeps."""
    if include_frozen:
        return set(model.state_dict())
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    # BatchNorm running statistics of trained modules change too.
    buffers = {n for n, _ in model.named_buffers()
               if n.rsplit(".", 1)[0] in {m.rsplit(".", 1)[0] for m in names}}
    return names | buffers


def _copy(tensor):
    """A snapshot on the CPU that later optimiser steps cannot touch (``.cpu()`` alone returns
    the live storage of a CPU tensor)."""
    return tensor.detach().to("cpu", copy=True).contiguous()


def merge(model: nn.Module) -> nn.Module:
    """Fold peft adapters into their base layers and put the plain layers back, then fuse the
    split q/k/v projections into one Linear each (in place; for inference and export)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from engine.models.prithvi import SplitQKV

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            _replace(model, name, module.get_base_layer())
    for name, module in list(model.named_modules()):
        if isinstance(module, SplitQKV):
            _replace(model, name, module.fused())
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def count_parameters(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter = sum(p.numel() for n, p in model.named_parameters()
                  if "lora_" in n or n.endswith("encoder.prompts") or ".adapter." in f".{n}")
    return {"total": total, "trainable": trainable, "adapter": adapter}
