"""Loading published backbone weights into an encoder.

Sources: a local file (``.pt``/``.pth`` plain state dict, loaded with ``weights_only=True``, or
``.safetensors``; a file that needs full unpickling only with ``--trust-checkpoint``), the Hugging Face hub (``hub``: must work; ``auto``: when reachable, else
random weights with a loud warning) or ``none`` (random weights, loudly).

Prithvi files hold the full MAE (``encoder.``/``decoder.`` prefixes, or the legacy flat
layout). We keep the encoder, drop the MAE decoder, the fixed ``pos_embed`` (recomputed for the
chip size) and, for an encoder built without the TL encoders, their two scales; split the fused
``qkv`` into q, k, v, adapt the patch embedding to the user's bands by name, and then load
strictly: any other mismatch is an error.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from engine.models.registry import BackboneSpec, band_wavelength, canonical_band
from engine.protocol import EngineError, Reporter

DROPPED_KEYS = ("pos_embed", "mask_token")


@dataclass
class LoadedWeights:
    source: str  # "file", "hub" or "random"
    path: str | None = None
    sha256: str | None = None
    matched_bands: dict[str, int] = field(default_factory=dict)  # user band → pretrained channel
    fresh_bands: list[str] = field(default_factory=list)
    url: str | None = None  # hf://OWNER/REPO/FILE the file came from

    def as_card(self) -> dict:
        card = {"source": self.source, "path": self.path, "sha256": self.sha256,
                "matched_bands": self.matched_bands, "fresh_bands": self.fresh_bands}
        return {**card, "url": self.url} if self.url else card


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


HF_PREFIX = "hf://"


def parse_hf_url(url: str) -> tuple[str, str]:
    """``hf://owner/repo/path/in/repo.pt`` → (``owner/repo``, ``path/in/repo.pt``)."""
    parts = url[len(HF_PREFIX):].strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        raise EngineError(f"--weights {url}: a hub address is hf://OWNER/REPO/FILE",
                          hint="e.g. hf://ibm-nasa-geospatial/Prithvi-EO-2.0-300M/Prithvi_EO_V2_300M.pt")
    return "/".join(parts[:2]), "/".join(parts[2:])


def resolve_weights(spec: BackboneSpec, weights: str | None, reporter: Reporter) -> Path | None:
    """A local checkpoint path for ``weights`` (path, ``hf://OWNER/REPO/FILE``, ``hub``, ``auto``
    or ``none``)."""
    if weights and str(weights).startswith(HF_PREFIX):
        repo, file = parse_hf_url(str(weights))
        path = hub_file(repo, file, reporter)
        if path is None:
            from huggingface_hub.constants import HF_HUB_CACHE
            raise EngineError(f"--weights {weights}: {file} is not in the Hugging Face cache ({HF_HUB_CACHE}) and "
                              "the hub cannot be reached (offline?)",
                              hint=f"where there is network, run `huggingface-cli download {repo} {file}` (it fills "
                                   f"that cache; copy the cache folder here), or download {file} from "
                                   f"https://huggingface.co/{repo} and pass --weights with its local path")
        return path
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
        raise EngineError(f"weights file {path.name} not found ({path})",
                          hint="pass a local checkpoint file, 'auto', 'hub' or 'none'")
    return path


def download_from_hub(spec: BackboneSpec, reporter: Reporter) -> Path | None:
    if not spec.hub_repo:
        return None
    return hub_file(spec.hub_repo, spec.hub_file, reporter)


def hub_file(repo: str, file: str, reporter: Reporter) -> Path | None:
    """A file of a Hugging Face hub repository: the cached copy, else downloaded (into the hub
    cache) when the hub is reachable; None when neither works."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        from huggingface_hub import hf_hub_download
        try:  # cached copy first: no network needed
            return Path(hf_hub_download(repo, file, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached
            pass
        if not _hub_reachable():
            reporter.info("the Hugging Face hub is not reachable (offline?)")
            return None
        reporter.info(f"downloading {repo}/{file} from the Hugging Face hub …")
        return Path(hf_hub_download(repo, file))
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


# What --trust-checkpoint is for: a checkpoint saved with Python objects besides tensors (an
# argparse.Namespace of training options, a custom class) can only be read by unpickling, and
# unpickling runs whatever code the file names. Without the flag such files are refused before
# anything in them runs (torch's weights_only loader, which allows tensors and plain containers).
TRUST_FLAG = "--trust-checkpoint"


def _pickle_globals(message: str) -> list[str]:
    """The Python names a refused pickle asked for, from torch's weights_only message."""
    return list(dict.fromkeys(re.findall(r"GLOBAL ([\w.]+)", message)))


def read_state_dict(path: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Tensors from a checkpoint file; a clear error for anything else.

    ``.safetensors`` files are read as such; other files with torch's ``weights_only`` loader
    (tensors and plain containers only), or, with ``trust``, unpickled in full."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"checkpoint {path.name} not found ({path})",
                          hint="pass a local checkpoint file, 'auto', 'hub' or 'none'")
    size = path.stat().st_size
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        names = _pickle_globals(str(exc))
        # torch's weights_only loader refusing objects (a GLOBAL, or "Can only build/create …"), as
        # opposed to bytes it cannot parse ("Unsupported operand": a damaged file, most likely)
        if not trust and (names or "Can only" in str(exc)):
            objects = f" ({', '.join(names[:4])})" if names else ""
            raise EngineError(f"checkpoint {path.name} holds pickled Python objects{objects}, not only tensors: "
                              "reading it would run code from the file, so it was not loaded",
                              hint=f"only if you trust where {path.name} comes from, pass {TRUST_FLAG} to load it "
                                   "anyway; better, convert it to a .safetensors or plain state-dict file") from None
        raise _unreadable(path, size, exc, maybe_pickle=not trust) from None
    except Exception as exc:  # noqa: BLE001 - pickle/zip/safetensors raise many kinds
        raise _unreadable(path, size, exc) from None
    if isinstance(state, nn.Module):  # a whole pickled model (only with trust)
        state = state.state_dict()
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # Lightning-style wrapper
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        what = (f"a {type(state).__name__}" if not isinstance(state, dict) else
                "an empty dict" if not state else
                f"a dict with keys {', '.join(list(map(str, state))[:5])}")
        raise EngineError(f"checkpoint {path.name} is not a state dict of tensors (it holds {what})",
                          hint="pass the published backbone weights file (e.g. Prithvi_EO_V2_300M.pt)")
    return state


def _unreadable(path: Path, size: int, exc: Exception, maybe_pickle: bool = False) -> EngineError:
    text = str(exc).replace("Weights only load failed.", "").strip()
    lines = [line for line in text.splitlines() if line.strip() and "weights_only" not in line]
    detail = f"{type(exc).__name__}: {lines[-1].strip().split('. ')[0][:200] if lines else ''}"
    return EngineError(f"cannot read checkpoint {path.name}: the file is truncated or corrupt, or not a "
                       f"PyTorch/safetensors checkpoint ({size:,} bytes; {detail})",
                       hint=f"download {path.name} again (compare its size with the published one), or pass "
                            "another checkpoint with --weights" +
                            (f"; if the file is whole and from a source you trust, {TRUST_FLAG} reads it by "
                             "full unpickling" if maybe_pickle else ""))


def describe_checkpoint(state: dict[str, torch.Tensor]) -> str:
    """What a state dict looks like, in a few words: for a mismatch message."""
    keys = list(state)
    params = sum(v.numel() for v in state.values())
    text = (f"{len(keys)} tensors, {params / 1e6:.1f} M values, keys like "
            f"{', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}")
    patch = state.get("patch_embed.proj.weight")
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}
    if patch is not None and blocks:
        dim, depth = patch.shape[0], max(blocks) + 1
        text += f"; a ViT encoder of width {dim}, {depth} blocks, {patch.shape[1]} input bands"
        from engine.models.registry import BACKBONES
        fits = [s.name for s in BACKBONES.values() if s.embed_dim == dim and s.depth == depth
                and s.patch_size == patch.shape[-1]]
        if fits:
            text += f" (as {' / '.join(fits)})"
    elif any(k.startswith("layer1.") for k in keys) and any(k.startswith("conv1.") for k in keys):
        stem = next(v for k, v in state.items() if k.startswith("conv1.") and v.ndim == 4)
        text += f"; a ResNet-style CNN with {stem.shape[1]} input bands (DeCUR ResNet-50s: --backbone decur_rn50_s2/s1)"
    elif any(k.startswith("transformer.layers.") for k in keys):
        text += "; a Clay encoder"
    return text


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


def match_bands(pretrained_bands: tuple[str, ...], user_bands: list[str], tolerance: float = 0.03) -> dict[int, int]:
    """user band position → pretrained band position: by name first, else by the nearest centre
    wavelength within ``tolerance`` (relative; e.g. Sentinel-2 B8 at 842 nm → the narrow NIR band
    at 865 nm; a band named ``705nm`` → red edge 1). Each pretrained band is used once."""
    index = {canonical_band(b): i for i, b in enumerate(pretrained_bands)}
    out: dict[int, int] = {}
    for j, name in enumerate(user_bands):
        i = index.get(canonical_band(name)) if name else None
        if i is not None and i not in out.values():
            out[j] = i
    waves = [band_wavelength(b) for b in pretrained_bands]
    for j, name in enumerate(user_bands):
        wave = band_wavelength(name) if name and j not in out else None
        if wave is None:
            continue
        near = [(abs(w - wave) / w, i) for i, w in enumerate(waves)
                if w is not None and i not in out.values() and abs(w - wave) / w <= tolerance]
        if near:
            out[j] = min(near)[1]
    return out


def adapt_patch_embedding(weight: torch.Tensor, pretrained_bands: tuple[str, ...],
                          user_bands: list[str], fresh: torch.Tensor) -> tuple[torch.Tensor, dict, list]:
    """Copy pretrained input channels to the user's bands (``match_bands``: by name, else by
    wavelength); others keep ``fresh`` init."""
    out = fresh.clone()
    pairs = match_bands(pretrained_bands, user_bands)
    matched, new = {}, []
    for j, name in enumerate(user_bands):
        i = pairs.get(j)
        if i is not None and i < weight.shape[1]:
            out[:, j] = weight[:, i]
            matched[name] = i
        else:
            new.append(name or f"band {j + 1}")
    return out, matched, new


def load_backbone_weights(encoder: nn.Module, spec: BackboneSpec, path: Path | None,
                          band_names: list[str], reporter: Reporter, trust: bool = False,
                          state: dict[str, torch.Tensor] | None = None) -> LoadedWeights:
    """``trust``: unpickle a checkpoint that holds more than tensors (``--trust-checkpoint``);
    ``state``: the file's tensors when already read (``read_state_dict(path, trust)``)."""
    if path is None:
        return LoadedWeights("random")
    from engine.models.families import encoder_state
    state = encoder_state(spec, read_state_dict(path, trust) if state is None else state)
    # what tuning adds (VPT prompts, the ViT-Adapter) is not in a backbone checkpoint
    own = {k: v for k, v in encoder.state_dict().items() if not k.startswith(("adapter.", "prompts"))}
    for k in getattr(encoder, "optional_keys", ()):
        if k not in own:
            state.pop(k, None)
    key = getattr(encoder, "first_layer_key", None)
    matched, fresh = {}, []
    described = describe_checkpoint(state)  # before the first layer is adapted to the user's bands
    if key and key in state and key in own:
        w = state[key]
        if w.ndim == own[key].ndim and w.shape[0] == own[key].shape[0] and w.shape[2:] == own[key].shape[2:]:
            # one frame's bands (a multi-frame input repeats them per frame)
            state[key], matched, fresh = adapt_patch_embedding(w, spec.bands, band_names[:own[key].shape[1]], own[key])
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        same = len(set(own) & set(state)) - len(wrong)
        example = "; ".join(f"{label} e.g. {', '.join(keys[:3])}" for label, keys in
                            (("missing", missing), ("unexpected", unexpected), ("other shape", wrong)) if keys)
        if wrong:
            k = wrong[0]
            example += f" ({k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in {spec.name})"
        raise EngineError(f"checkpoint {path.name} does not match backbone {spec.name}: {same} of {len(own)} "
                          f"tensors match, {len(missing)} missing, {len(wrong)} with another shape, "
                          f"{len(unexpected)} unexpected ({example}). The file holds {described}",
                          hint=f"pass the weights of {spec.name} ({spec.hub_file or 'see python -m engine models'}), "
                               "or pick the --backbone the file was made for")
    encoder.load_state_dict(state, strict=False)  # every key checked above
    if matched:
        reporter.info("pretrained bands matched by name or wavelength: " +
                      ", ".join(f"{u}→{spec.bands[i]}" for u, i in matched.items()))
    if fresh:
        reporter.warning(f"bands without a pretrained counterpart start from fresh weights: {', '.join(fresh)} "
                         f"(the model was pretrained on {', '.join(spec.bands)}; name your bands with "
                         "--band-names to match them)")
    return LoadedWeights("file", str(Path(path).resolve()), sha256_file(path), matched, fresh)
