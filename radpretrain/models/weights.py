"""Existing weights into an encoder: exported radpretrain folders, timm / Hugging Face model folders, bare files.

`init_encoder_from` is the one loader that finetuning (an encoder arm given by path) and pretraining
(`encoder.init`) share. What it accepts, by `describe_weights`:

- an exported radpretrain encoder folder (`encoder.json` + `encoder.safetensors`; checksum and intensity
  convention checked as in `encoders.load_encoder`);
- a timm or Hugging Face model folder: `config.json` naming the timm `architecture` (what timm's
  `save_for_hf` / `push_to_hf_hub` write, e.g. a downloaded `timm/resnet50.a1_in1k`) with
  `model.safetensors` or a `pytorch_model.bin` (read with `torch.load(weights_only=True)`);
- a bare `.safetensors` file (its architecture from the `timm_name`/`architecture` metadata when present)
  or a `.bin`/`.pt`/`.pth` state dict (read with `weights_only=True`).

The state dict goes through the architecture's own timm `checkpoint_filter_fn` where it has one (ViT position
embeddings resized to the encoder's input size, other timm key layouts), three-channel input convolutions are
folded into the encoder's channels as timm's `adapt_input_conv` does (summed for one channel), classifier heads
are dropped, and anything else that does not fit is refused in one line.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from radpretrain.errors import ConfigError

#: Weight files of a timm / Hugging Face model folder, in the order they are preferred.
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HUB_CONFIG = "config.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
#: Buffers older checkpoints lack (torchvision before 0.4 saved no batch counts); missing them changes nothing.
OPTIONAL_KEYS = ("num_batches_tracked",)


@dataclass(frozen=True)
class Weights:
    """What lies at a weights path: the file to read, its format and the architecture it names (if any)."""

    path: Path
    file: Path
    #: "radpretrain" (exported encoder folder), "timm" (model folder with config.json), "safetensors", "torch".
    kind: str
    #: The timm architecture the weights are for (None: the file does not say).
    architecture: str | None = None
    #: timm constructor arguments the folder records (`model_args` in config.json; build_kwargs of an export).
    model_args: dict[str, Any] = field(default_factory=dict)
    #: The exported encoder's card (kind "radpretrain" only).
    card: dict[str, Any] | None = None


def describe_weights(path: str | Path) -> Weights:
    """Find the weights file at `path` and the architecture it names, without reading the tensors."""
    from radpretrain.models.encoders import CARD_FILE, WEIGHTS_FILE, read_card

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"weights {path} do not exist; give an encoder folder, a timm model folder or a file")
    folder = path if path.is_dir() else path.parent
    if (path.is_dir() and (path / CARD_FILE).is_file()) or (
        path.is_file() and path.name in (CARD_FILE, WEIGHTS_FILE) and (folder / CARD_FILE).is_file()
    ):
        card = read_card(folder)
        return Weights(
            folder,
            folder / str(card.get("weights_file", WEIGHTS_FILE)),
            "radpretrain",
            str(card["timm_name"]),
            dict(card.get("build_kwargs") or {}),
            card,
        )
    if path.is_dir() or path.name == HUB_CONFIG:
        return _hub_folder(folder)
    if path.suffix == ".safetensors":
        return Weights(path, path, "safetensors", _safetensors_architecture(path))
    if path.suffix in TORCH_SUFFIXES:
        return Weights(path, path, "torch")
    raise ConfigError(
        f"{path} is not a weights file radpretrain reads; give a .safetensors, .bin, .pt or .pth file, an exported "
        f"encoder folder ({CARD_FILE}) or a timm model folder ({HUB_CONFIG} + {HUB_WEIGHTS[0]})"
    )


def _hub_folder(folder: Path) -> Weights:
    config_path = folder / HUB_CONFIG
    if not config_path.is_file():
        raise ConfigError(
            f"{folder} holds neither encoder.json (a `radpretrain export` folder) nor {HUB_CONFIG} (a timm or Hugging "
            "Face model folder); give one of those, or the weights file itself"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_path} is not valid JSON ({exc}); download the model folder again") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path} must hold a JSON object; download the model folder again")
    architecture = config.get("architecture")
    if not isinstance(architecture, str):
        found = config.get("model_type") or config.get("architectures") or "no architecture"
        raise ConfigError(
            f"{config_path} names no timm 'architecture' (it says {found!r}: a transformers checkpoint, whose keys "
            "timm does not use); give the timm version of these weights, or ARCH@FILE with a timm-keyed file"
        )
    for name in HUB_WEIGHTS:
        if (folder / name).is_file():
            args = config.get("model_args")
            return Weights(folder, folder / name, "timm", architecture, dict(args) if isinstance(args, dict) else {})
    raise ConfigError(f"{folder} has {HUB_CONFIG} but no weights; expected {' or '.join(HUB_WEIGHTS)} beside it")


def _safetensors_architecture(path: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path} is not a readable safetensors file ({exc}); copy or export it again") from None
    name = meta.get("timm_name") or meta.get("architecture")
    return str(name) if name else None


def base_architecture(name: str) -> str:
    """`resnet50.a1_in1k` -> `resnet50` (timm's pretrained tag does not change the architecture)."""
    from timm.models import split_model_name_tag

    return str(split_model_name_tag(name)[0])


def encoder_architecture(encoder: nn.Module) -> str:
    """The timm architecture name of an encoder built by `encoders.build_encoder` (or any timm model)."""
    build = getattr(encoder, "radpretrain_build", None)
    if isinstance(build, dict) and build.get("name"):
        return base_architecture(str(build["name"]))
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    return base_architecture(str(cfg.get("architecture") or type(encoder).__name__))


# --------------------------------------------------------------------------------------------------------------
# Reading and fitting the tensors.
# --------------------------------------------------------------------------------------------------------------


def read_state(weights: Weights) -> dict[str, torch.Tensor]:
    """The state dict of `weights` on the CPU; nothing is unpickled beyond tensors (weights_only)."""
    if weights.kind == "radpretrain":
        from radpretrain.models.encoders import load_encoder

        # load_encoder checks the checksum and the intensity convention and loads strictly into its own build.
        return load_encoder(weights.path).state_dict()
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(weights.file), use_ema=True, device="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"{weights.file} cannot be read as weights ({first}); it must be a safetensors file or a plain state "
            "dict that torch.load(weights_only=True) accepts"
        ) from None
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConfigError(f"{weights.file} holds no tensors; give a model's state dict")
    return tensors


def _filter(state: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The architecture's own timm checkpoint filter (key layouts, position-embedding resize), where it has one."""
    module = sys.modules.get(type(encoder).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None or not str(getattr(module, "__name__", "")).startswith("timm."):
        return state
    try:
        return dict(fn(state, encoder))
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError):
        # A filter written for another layout of these keys: compare the keys as they are below.
        return state


def _classifier_prefixes(encoder: nn.Module) -> tuple[str, ...]:
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return (*(str(n) for n in names), "fc", "head", "classifier", "head_dist")


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(str(s) for s in tensor.shape)


def _listed(keys: list[str], limit: int = 3) -> str:
    more = f", ... {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def init_encoder_from(encoder: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load existing weights into `encoder` in place and say what was loaded.

    Args:
        encoder: A timm encoder without classifier (`encoders.build_encoder`), usually with one input channel.
        path: An exported radpretrain encoder folder, a timm / Hugging Face model folder, or a bare
            `.safetensors` / `.bin` / `.pt` / `.pth` file (see the module docstring).

    Returns:
        `{"path", "file", "format", "architecture", "tensors", "folded", "dropped", "missing"}`: the weights
        file, its kind, the architecture it names (None: unnamed), the number of tensors loaded, the input
        convolutions folded to the encoder's channels, the classifier keys dropped, and the optional buffers
        the file lacked (left as they were).

    Raises:
        ConfigError: in one line, when the weights name another architecture than the encoder's, or when keys or
            shapes do not fit (missing, unexpected and mismatched keys counted, the first few named).
    """
    from timm.models import adapt_input_conv

    weights = describe_weights(path)
    target = encoder_architecture(encoder)
    source = base_architecture(weights.architecture) if weights.architecture else None
    if source is not None and source != target:
        raise ConfigError(
            f"weights in {weights.path} are for '{source}', the encoder is '{target}'; build a '{source}' encoder "
            f"or give weights for '{target}'"
        )
    state = _filter(read_state(weights), encoder)
    own = encoder.state_dict()
    heads = _classifier_prefixes(encoder)
    dropped = sorted(k for k in state if k not in own and _under(k, heads))
    folded: list[str] = []
    fitted: dict[str, torch.Tensor] = {}
    wrong: list[str] = []
    for key, value in state.items():
        if key in dropped or key not in own:
            continue
        want = own[key]
        stem = value.dim() == want.dim() == 4 and value.shape[1] != want.shape[1]
        if stem and value.shape[0] == want.shape[0] and value.shape[2:] == want.shape[2:]:
            # timm's rule for pretrained stems: sum the RGB filters for one channel, tile and rescale for more.
            value = adapt_input_conv(int(want.shape[1]), value.float()).to(value.dtype)
            folded.append(key)
        if value.shape != want.shape:
            wrong.append(f"{key} {_shape(value)} vs {_shape(want)}")
            continue
        fitted[key] = value
    unexpected = sorted(k for k in state if k not in own and k not in dropped)
    missing = sorted(k for k in own if k not in state)
    optional = [k for k in missing if k.rsplit(".", 1)[-1] in OPTIONAL_KEYS]
    missing = [k for k in missing if k not in optional]
    if missing or unexpected or wrong:
        named = f" (they are for '{source}')" if source else ""
        parts = [
            f"{len(items)} {label} ({_listed(items)})"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong))
            if items
        ]
        raise ConfigError(
            f"weights in {weights.path} do not fit the '{target}' encoder{named}: {'; '.join(parts)}; give weights "
            f"made for a '{target}' encoder"
        )
    encoder.load_state_dict(fitted, strict=False)
    return {
        "path": str(weights.path),
        "file": str(weights.file),
        "format": weights.kind,
        "architecture": source,
        "tensors": len(fitted),
        "folded": folded,
        "dropped": dropped,
        "missing": optional,
    }
