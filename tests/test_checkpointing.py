"""Training memory levers change memory, not results: activation checkpointing of frozen blocks
(``engine.models.blocks``) and frozen block weights held in bf16 under bf16 autocast
(``engine.training.memory``) give bit-for-bit the loss and gradients of the plain model."""
from __future__ import annotations

import engine.models  # noqa: F401 - torchvision fix before timm
import pytest
import torch
import torch.nn.functional as F

from engine.models import blocks
from engine.models.segmentor import build_segmentor
from engine.training.memory import frozen_linears, frozen_weights_in_bf16, fp32_state
from engine.tuning import TuningConfig, apply_tuning

CHIP = 32


def _model(method: str, backbone: str = "prithvi_eo_v2_tiny"):
    torch.manual_seed(0)
    model = apply_tuning(build_segmentor(backbone, 6, CHIP, 2, method=method), TuningConfig(method))
    for name, p in model.named_parameters():  # LoRA's B starts at zero: make every adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


def _grads(model, bf16: bool, checkpoint: bool, bf16_weights: bool = False):
    x = torch.randn(2, 6, CHIP, CHIP, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 2, (2, CHIP, CHIP), generator=torch.Generator().manual_seed(2))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # VPT's prompt dropout
    with blocks.checkpointing(checkpoint), frozen_weights_in_bf16(model, bf16_weights):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model, checkpoint: bool) -> int:
    """Bytes autograd keeps for backward during one forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = torch.randn(2, 6, CHIP, CHIP)
    with blocks.checkpointing(checkpoint), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return total


@pytest.mark.parametrize("backbone, method", [("prithvi_eo_v2_tiny", m) for m in ("lora", "dora", "vpt", "vit-adapter")]
                         + [("timm:vit_tiny_patch16_224", m) for m in ("lora", "vpt")])
@pytest.mark.parametrize("bf16", [False, True])
def test_checkpointed_blocks_give_bit_identical_gradients(backbone, method, bf16):
    model = _model(method, backbone)
    loss, plain = _grads(model, bf16, checkpoint=False)
    loss_ckpt, ckpt = _grads(model, bf16, checkpoint=True)
    assert torch.equal(loss, loss_ckpt)
    assert plain.keys() == ckpt.keys() and plain
    different = [n for n in plain if not torch.equal(plain[n], ckpt[n])]
    assert not different, different[:5]


@pytest.mark.parametrize("backbone, method", [("prithvi_eo_v2_tiny", "lora"), ("prithvi_eo_v2_tiny", "vit-adapter"),
                                             ("timm:vit_tiny_patch16_224", "lora")])
def test_checkpointing_keeps_less_for_backward_and_only_when_adapters_train(backbone, method, monkeypatch):
    peft = _model(method, backbone)
    assert _saved_bytes(peft, checkpoint=True) < 0.6 * _saved_bytes(peft, checkpoint=False)
    calls = []
    monkeypatch.setattr(blocks, "_checkpoint", lambda fn, *a, **k: calls.append(1) or fn(*a))
    peft(torch.randn(2, 6, CHIP, CHIP))
    assert len(calls) == len(peft.encoder.blocks)
    calls.clear()
    with torch.no_grad():  # prediction, validation
        peft(torch.randn(2, 6, CHIP, CHIP))
    peft.eval()(torch.randn(2, 6, CHIP, CHIP))
    _model("full", backbone)(torch.randn(2, 6, CHIP, CHIP))  # the blocks' own weights train
    assert calls == []


@pytest.mark.parametrize("method", ["lora", "vpt", "dora"])
def test_frozen_weights_in_bf16_change_nothing_under_bf16_autocast(method):
    model = _model(method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, plain = _grads(model, bf16=True, checkpoint=True)
    layers = frozen_linears(model)
    dora_bases = {id(m.get_base_layer()) for m in model.modules() if len(getattr(m, "lora_magnitude_vector", ()))}
    assert bool(dora_bases) == (method == "dora")
    # DoRA reads its base weights outside the linear call (its weight norm, in fp32): those stay fp32
    assert not dora_bases & {id(m) for m in layers}
    # q, k, v, proj, fc1, fc2 per block; under DoRA k and proj only
    assert len(layers) == (2 if method == "dora" else 6) * len(model.encoder.blocks)
    loss_bf16, bf16 = _grads(model, bf16=True, checkpoint=True, bf16_weights=True)
    assert torch.equal(loss, loss_bf16)
    different = [n for n in plain if not torch.equal(plain[n], bf16[n])]
    assert not different, different[:5]
    # back in fp32 after, holding the bf16-rounded values
    after = model.state_dict()
    assert all(after[k].dtype == before[k].dtype for k in before)
    for layer in layers:
        assert torch.equal(layer.weight, layer.weight.bfloat16().float())
    state = fp32_state({"w": torch.ones(2, dtype=torch.bfloat16), "n": torch.ones(2, dtype=torch.int64)})
    assert state["w"].dtype == torch.float32 and state["n"].dtype == torch.int64


def test_training_with_the_levers_saves_what_training_without_them_saves(small_scene, tmp_path, monkeypatch):
    """Through ``train`` (LoRA on a random backbone, so the frozen weights are saved too): the
    kept tensors are bit-for-bit those of a run with the levers off, except the frozen block
    weights, which are their bf16 rounding (what autocast computed with in both runs), in fp32."""
    from safetensors.torch import load_file

    import engine.training.memory as memory
    from engine.training.train import TrainConfig, run_training

    dtypes = []
    real_fit = __import__("lightning").Trainer.fit

    def fit(trainer, task, *args, **kwargs):  # the weights' dtype while training
        dtypes.append(task.model.encoder.blocks[0].mlp.fc2.base_layer.weight.dtype)
        return real_fit(trainer, task, *args, **kwargs)

    monkeypatch.setattr("lightning.Trainer.fit", fit)
    saved = {}
    for levers in (False, True):
        monkeypatch.setattr(memory, "use_bf16_weights", lambda precision, accelerator, on=levers: on)
        cfg = TrainConfig(images=[str(small_scene.image)], labels=str(small_scene.labels),
                          out=str(tmp_path / str(levers)), weights="none", tuning=TuningConfig("lora"), chip_size=32,
                          batch_size=4, epochs=2, chips_per_epoch=8, precision="bf16-mixed", device="cpu")
        with blocks.checkpointing(levers):
            run_training(cfg)
        saved[levers] = load_file(str(tmp_path / str(levers) / "adapter.safetensors"))
    assert dtypes == [torch.float32, torch.bfloat16]
    plain, levered = saved[False], saved[True]
    assert plain.keys() == levered.keys() and all(v.dtype == plain[k].dtype for k, v in levered.items())
    rounded = [k for k in plain if not torch.equal(plain[k], levered[k])]
    assert rounded and all(k.startswith("encoder.blocks.") and ("base_layer" in k or "lora_" not in k) for k in rounded)
    for k in rounded:
        assert torch.equal(levered[k], plain[k].bfloat16().float()), k
    assert any("lora_B" in k for k in plain) and not any("lora_" in k for k in rounded)
