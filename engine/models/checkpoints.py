"""Loading published backbone weights into an encoder.

Sources: a local file (``.pt``/``.pth`` plain state dict, loaded with ``weights_only=True``, or
``.safetensors``), the Hugging Face hub (``hub``: must work; ``auto``: when reachable, else
random weights with a loud warning) or ``none`` (random weights, loudly).

Prithvi files hold the full MAE (``encoder.``/``decoder.`` prefixes, or the legacy flat
layout). We keep the encoder, drop the MAE decoder, the fixed ``pos_embed`` (recomputed for the
chip size) and the TL metadata scalars, split the fused ``qkv`` into q, k, v, adapt the patch
embedding to the user's bands by name, and then load strictly: any other mismatch is an error.
"""
from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from engine.models.registry import BackboneSpec, canonical_band
from engine.protocol import EngineError, Reporter

DROPPED_KEYS = ("pos_embed", "mask_token", "temporal_embed_enc.scale", "location_embed_enc.scale")


@dataclass
class LoadedWeights:
    source: str  # "file", "hub" or "random"
    path: str | None = None
    sha256: str | None = None
    matched_bands: dict[str, int] = field(default_factory=dict)  # user band → pretrained channel
    fresh_bands: list[str] = field(default_factory=list)

    def as_card(self) -> dict:
        return {"source": self.source, "path": self.path, "sha256": self.sha256,
                "matched_bands": self.matched_bands, "fresh_bands": self.fresh_bands}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_weights(spec: BackboneSpec, weights: str | None, reporter: Reporter) -> Path | None:
    """A local checkpoint path for ``weights`` (path, ``hub``, ``auto`` or ``none``)."""
    if weights in (None, "", "none"):
        reporter.warning(f"{spec.name}: no pretrained weights (--weights none); the backbone starts "
                         "from RANDOM weights, so results will be far below what the foundation model gives")
        return None
    if weights in ("hub", "auto"):
        path = download_from_hub(spec, reporter)
        if path is None and weights == "hub":
            raise EngineError(f"could not download {spec.name} weights from the Hugging Face hub "
                              f"({spec.hub_repo}/{spec.hub_file})",
                              hint="check the network, or download the file yourself and pass --weights PATH")
        if path is None:
            reporter.warning(f"{spec.name}: pretrained weights are not available offline (hub "
                             f"{spec.hub_repo} unreachable and not cached); training from RANDOM weights. "
                             "Pass --weights PATH with a downloaded checkpoint for real results")
        return path
    path = Path(weights)
    if not path.is_file():
        raise EngineError(f"weights file not found: {path}",
                          hint="pass a local checkpoint file, 'auto', 'hub' or 'none'")
    return path


def download_from_hub(spec: BackboneSpec, reporter: Reporter) -> Path | None:
    if not spec.hub_repo:
        return None
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        from huggingface_hub import hf_hub_download
        try:  # cached copy first: no network needed
            return Path(hf_hub_download(spec.hub_repo, spec.hub_file, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached
            pass
        if not _hub_reachable():
            reporter.info("the Hugging Face hub is not reachable (offline?)")
            return None
        reporter.info(f"downloading {spec.hub_repo}/{spec.hub_file} from the Hugging Face hub …")
        return Path(hf_hub_download(spec.hub_repo, spec.hub_file))
    except Exception as exc:  # noqa: BLE001 - offline, DNS, HTTP errors: all mean "not available"
        reporter.info(f"hub download failed: {type(exc).__name__}: {exc}")
        return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so an offline machine doesn't sit through the hub
    client's retries and back-off (about half a minute)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a checkpoint file; a clear error for anything else."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip/safetensors raise many kinds
        raise EngineError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc)[:300]}",
                          hint="the file is corrupt or not a PyTorch/safetensors state dict; download it again") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # Lightning-style wrapper
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EngineError(f"checkpoint {path} is not a state dict of tensors",
                          hint="pass the published backbone weights file (e.g. Prithvi_EO_V2_300M.pt)")
    return state


def prithvi_encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder tensors with our key layout (see module docstring)."""
    if any(k.startswith("encoder.") for k in state):
        enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    else:  # legacy flat V1 layout
        enc = {k: v for k, v in state.items()
               if "decoder" not in k and "_dec" not in k and k != "mask_token"}
    enc = {k[len("model."):] if k.startswith("model.") else k: v for k, v in enc.items()}
    out = {}
    for k, v in enc.items():
        if k in DROPPED_KEYS:
            continue
        if k.endswith("attn.qkv.weight") or k.endswith("attn.qkv.bias"):
            stem, kind = k.rsplit(".", 1)
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{stem}.{name}.{kind}"] = part.clone()
            continue
        if k == "patch_embed.proj.weight" and v.ndim == 4:  # 2-D patch embedding → 1 frame
            v = v.unsqueeze(2)
        out[k] = v
    return out


def adapt_patch_embedding(weight: torch.Tensor, pretrained_bands: tuple[str, ...],
                          user_bands: list[str], fresh: torch.Tensor) -> tuple[torch.Tensor, dict, list]:
    """Copy pretrained input channels to the user's bands by name; others keep ``fresh`` init."""
    out = fresh.clone()
    index = {canonical_band(b): i for i, b in enumerate(pretrained_bands)}
    matched, new = {}, []
    for j, name in enumerate(user_bands):
        i = index.get(canonical_band(name)) if name else None
        if i is not None and i < weight.shape[1]:
            out[:, j] = weight[:, i]
            matched[name] = i
        else:
            new.append(name or f"band {j + 1}")
    return out, matched, new


def load_backbone_weights(encoder: nn.Module, spec: BackboneSpec, path: Path | None,
                          band_names: list[str], reporter: Reporter) -> LoadedWeights:
    if path is None:
        return LoadedWeights("random")
    state = prithvi_encoder_state(read_state_dict(path))
    own = encoder.state_dict()
    key = "patch_embed.proj.weight"
    matched, fresh = {}, []
    if key in state and key in own:
        w = state[key]
        if w.shape[0] != own[key].shape[0] or w.shape[2:] != own[key].shape[2:]:
            raise EngineError(f"checkpoint {path.name} does not fit backbone {spec.name}: patch embedding "
                              f"{tuple(w.shape)} vs {tuple(own[key].shape)}",
                              hint="pick the --backbone that matches the weights file")
        state[key], matched, fresh = adapt_patch_embedding(w, spec.bands, band_names, own[key])
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
                           for label, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("wrong shape", wrong)) if keys)
        raise EngineError(f"checkpoint {path.name} does not match backbone {spec.name} ({detail})",
                          hint="pick the --backbone that matches the weights file")
    encoder.load_state_dict(state, strict=True)
    if matched:
        reporter.info("pretrained bands matched by name: " +
                      ", ".join(f"{u}→{spec.bands[i]}" for u, i in matched.items()))
    if fresh:
        reporter.warning(f"bands without a pretrained counterpart start from fresh weights: {', '.join(fresh)} "
                         f"(the model was pretrained on {', '.join(spec.bands)}; name your bands with "
                         "--band-names to match them)")
    return LoadedWeights("file", str(Path(path).resolve()), sha256_file(path), matched, fresh)
