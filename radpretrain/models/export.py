"""A run's encoder in the formats the ecosystem loads: a Hugging Face / timm folder, ONNX, or radpretrain's own."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radpretrain import __version__, intensity
from radpretrain.errors import ConfigError
from radpretrain.files import atomic_path, temp_path, write_bytes, write_text
from radpretrain.models.weights import HUB_CONFIG, HUB_WEIGHTS

#: Output formats of `radpretrain export`: radpretrain's folder, a Hugging Face / timm folder, ONNX.
FORMATS: tuple[str, ...] = ("radpretrain", "hf", "onnx")

#: Files of a Hugging Face / timm folder (the names timm's hub loader looks for; weights.py reads them back).
HF_CONFIG = HUB_CONFIG
HF_WEIGHTS = HUB_WEIGHTS[0]
ONNX_FILE = "encoder.onnx"
README = "README.md"
#: How to install what the hf / onnx formats and --push-to-hub need.
EXTRA = "pip install 'radpretrain[export]'"
#: The opset of the ONNX graph: supported by every onnxruntime of the last years.
ONNX_OPSET = 17
#: The largest |torch - onnxruntime| difference of a feature that the export accepts.
ONNX_TOLERANCE = 1e-3

#: Hub metadata of the model card (YAML front matter the hub reads).
HUB_TAGS: tuple[str, ...] = (
    "timm",
    "image-feature-extraction",
    "radiology",
    "radiograph",
    "medical-imaging",
    "self-supervised",
    "radpretrain",
)


@dataclass
class ExportResult:
    """What `export` wrote: the folder, its format, the files, and for ONNX the measured torch/ORT gap."""

    out: Path
    format: str
    files: list[str] = field(default_factory=list)
    onnx_max_diff: float | None = None
    pushed_to: str | None = None


def export(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    format: str = "radpretrain",
    push_to_hub: str | None = None,
    private: bool = False,
    license: str = "other",
) -> ExportResult:
    """Export the encoder of the pretraining run `run_dir` into `out_dir` in `format`.

    Every format is a superset of radpretrain's own folder, so `radpretrain.load_encoder(out_dir)` loads each:
    - "radpretrain": encoder.safetensors + encoder.json + README.md (`pretrain.checkpoint.export_encoder`).
    - "hf": model.safetensors + config.json (timm's hub format: architecture, num_features, model_args,
      pretrained_cfg with input size, mean/std and the intensity convention) + encoder.json + a README.md model
      card with hub metadata; loads with `timm.create_model("local-dir:OUT", pretrained=True)`.
    - "onnx": the radpretrain folder plus encoder.onnx (input "image" (B, 1, S, S), output "features" (B, F),
      dynamic batch; the convention in its metadata), checked against torch with onnxruntime.

    Args:
        run_dir: The `out` folder of a `radpretrain pretrain` run.
        out_dir: Folder to write (outside the run); files of an earlier export there are replaced.
        format: One of FORMATS.
        push_to_hub: A hub repo id ("team/chest-encoder") to upload the hf folder to (huggingface_hub).
        private: Create the hub repo as private.
        license: The hub `license` of the model card ("other" unless the archive's owner says otherwise).
    """
    from radpretrain.pretrain.checkpoint import export_encoder

    if format not in FORMATS:
        from radpretrain.registry import did_you_mean

        hint = did_you_mean(format, FORMATS)
        raise ConfigError(f"Unknown export format '{format}'.{hint} Known: {', '.join(FORMATS)}")
    if push_to_hub is not None and format != "hf":
        raise ConfigError("--push-to-hub uploads a Hugging Face folder; add --format hf")
    if format != "radpretrain":
        _require("safetensors" if format == "hf" else "onnx", format)
        if format == "onnx":
            _require("onnxruntime", format)
    if push_to_hub is not None:
        _require("huggingface_hub", "--push-to-hub")
    out, run = Path(out_dir), Path(run_dir)
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
        raise ConfigError("export OUT must be a folder outside the run folder (e.g. encoders/<name>)")
    if format == "radpretrain":
        export_encoder(run_dir, out)
        return ExportResult(out, format, _listing(out, ("encoder.safetensors", "encoder.json", README)))

    # The run's encoder goes through radpretrain's own export into a hidden staging folder beside OUT, then
    # each file moves into OUT by one rename (weights first), so OUT never pairs a card with other weights.
    staging = temp_path(out)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        export_encoder(run_dir, staging)
        result = (write_hf if format == "hf" else write_onnx)(staging, out, license=license)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if push_to_hub is not None:
        result.pushed_to = push_folder(out, push_to_hub, private=private)
    return result


def write_hf(encoder_dir: str | Path, out_dir: str | Path, *, license: str = "other") -> ExportResult:
    """Turn an exported radpretrain folder into a Hugging Face / timm folder at `out_dir`."""
    from radpretrain.models.encoders import CARD_FILE, WEIGHTS_FILE, load_encoder, read_card

    src, out = Path(encoder_dir), Path(out_dir)
    card = read_card(src)
    encoder = load_encoder(src)  # checks the checksum and the convention before anything is written
    out.mkdir(parents=True, exist_ok=True)
    _move(src / str(card.get("weights_file", WEIGHTS_FILE)), out / HF_WEIGHTS)
    # Same bytes under timm's name: the checksum in the card still holds.
    write_text(out / CARD_FILE, json.dumps({**card, "weights_file": HF_WEIGHTS}, indent=2, sort_keys=True) + "\n")
    write_text(out / HF_CONFIG, json.dumps(hf_config(encoder, card), indent=2) + "\n")
    write_text(out / README, hf_model_card(card, license=license))
    return ExportResult(out, "hf", [HF_WEIGHTS, HF_CONFIG, CARD_FILE, README])


def hf_config(encoder: Any, card: dict[str, Any]) -> dict[str, Any]:
    """timm's config.json for `encoder`: what `timm.create_model("local-dir:...")` / "hf-hub:..." rebuilds from.

    timm turns `pretrained_cfg` into its PretrainedCfg dataclass, which refuses unknown keys, so the
    intensity convention goes into its `description` and `notes` (and a top-level key for other readers).
    """
    import timm

    name = str(card["timm_name"])
    size = int(card.get("img_size") or card.get("input_size", [1, 224, 224])[1])
    in_chans = int(card["in_chans"])
    base = timm.models.get_pretrained_cfg(name)
    fixed = bool(base is not None and base.fixed_input_size)
    model_args: dict[str, Any] = {"in_chans": in_chans, **(card.get("build_kwargs") or {})}
    if fixed and card.get("img_size") is not None:
        model_args["img_size"] = int(card["img_size"])
    convention = _convention_text()
    pretrained_cfg: dict[str, Any] = {
        "input_size": [in_chans, size, size],
        "fixed_input_size": fixed,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": [intensity.MEAN] * in_chans,
        "std": [intensity.STD] * in_chans,
        "num_classes": 0,
        "license": "other",
        "description": f"Radiograph encoder pretrained with radpretrain {card.get('radpretrain_version', '?')}; "
        f"inputs follow {convention}",
        "notes": [f"intensity_convention={intensity.CONVENTION}", convention],
    }
    if base is not None:
        for key in ("first_conv", "classifier"):
            if getattr(base, key, None):
                pretrained_cfg[key] = getattr(base, key)
    return {
        "architecture": name,
        "num_classes": 0,
        "num_features": int(getattr(encoder, "num_features", card.get("num_features", 0))),
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
        "intensity_convention": intensity.CONVENTION,
        "radpretrain_version": __version__,
    }


def hf_model_card(card: dict[str, Any], *, license: str = "other") -> str:
    """radpretrain's model card with hub metadata (YAML front matter) and how to load the folder with timm."""
    import yaml

    from radpretrain.pretrain.checkpoint import model_card

    name = str(card["timm_name"])
    meta = {
        "library_name": "timm",
        "license": license,
        "tags": list(HUB_TAGS),
        "pipeline_tag": "image-feature-extraction",
    }
    body = model_card(card, name)
    # radpretrain's card ends with how to load its own folder; this folder loads differently.
    body = body.split("\n## How to load\n", 1)[0].rstrip("\n")
    cbr = "import radpretrain.models  # registers the CBR encoders with timm\n" if name.startswith("cbr_") else ""
    load = [
        "",
        "## How to load",
        "",
        "With timm (this folder, or the hub repo it was uploaded to):",
        "",
        "```python",
        f"import timm\n{cbr}",
        'model = timm.create_model("local-dir:path/to/this/folder", pretrained=True)  # or "hf-hub:ORG/NAME"',
        "model.eval()  # forward(x) -> (B, features); x: (B, 1, S, S) in the intensity convention below",
        "```",
        "",
        "With radpretrain (also checks the weights' checksum and the intensity convention):",
        "",
        "```python",
        "import radpretrain",
        'encoder = radpretrain.load_encoder("path/to/this/folder")',
        "```",
        "",
        f"Inputs: {_convention_text()} (`pretrained_cfg` mean/std say the same).",
        "",
    ]
    front = "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n"
    return front + body + "\n" + "\n".join(load)


def write_onnx(encoder_dir: str | Path, out_dir: str | Path, **_: Any) -> ExportResult:
    """radpretrain's folder plus encoder.onnx at `out_dir`, checked against torch with onnxruntime."""
    import io

    import numpy as np
    import onnx
    import torch

    from radpretrain.models.encoders import CARD_FILE, WEIGHTS_FILE, load_encoder, read_card

    src, out = Path(encoder_dir), Path(out_dir)
    card = read_card(src)
    encoder = load_encoder(src)
    size = int(card.get("img_size") or card["input_size"][1])
    example = torch.zeros(2, int(card["in_chans"]), size, size)
    buffer = io.BytesIO()
    # The TorchScript exporter needs only `onnx`; the torch.export one (torch's default) also needs onnxscript.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder,
            (example,),
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects too
            dynamo=False,
            input_names=["image"],
            output_names=["features"],
            dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
            opset_version=ONNX_OPSET,
        )
    graph = onnx.load_from_string(buffer.getvalue())
    meta = {
        "timm_name": str(card["timm_name"]),
        "input_size": json.dumps([int(card["in_chans"]), size, size]),
        "intensity_convention": intensity.CONVENTION,
        "mean": str(intensity.MEAN),
        "std": str(intensity.STD),
        "radpretrain_version": __version__,
    }
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    data = graph.SerializeToString()
    # A batch of another size than the traced one proves the dynamic batch axis.
    check = torch.from_numpy(np.random.default_rng(0).standard_normal((3, *example.shape[1:]), dtype=np.float32))
    gap = onnx_gap(encoder, data, check)
    if not gap <= ONNX_TOLERANCE:
        raise ConfigError(
            f"the ONNX graph of '{card['timm_name']}' differs from torch by {gap:.3g} (> {ONNX_TOLERANCE}); "
            "this architecture does not export faithfully, use --format hf"
        )
    out.mkdir(parents=True, exist_ok=True)
    _move(src / str(card.get("weights_file", WEIGHTS_FILE)), out / WEIGHTS_FILE)
    write_text(out / CARD_FILE, (src / CARD_FILE).read_text())
    write_bytes(out / ONNX_FILE, data)
    readme = (src / README).read_text().rstrip("\n") + "\n" + _onnx_section(size, int(card["in_chans"]))
    write_text(out / README, readme)
    return ExportResult(out, "onnx", [ONNX_FILE, WEIGHTS_FILE, CARD_FILE, README], onnx_max_diff=gap)


def onnx_gap(encoder: Any, graph: bytes, batch: Any) -> float:
    """The largest |feature| difference between torch and onnxruntime (CPU) on `batch`."""
    import numpy as np
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = encoder(batch).numpy()
    got = session.run(["features"], {"image": batch.numpy()})[0]
    if got.shape != expected.shape:
        return float("inf")
    return float(np.max(np.abs(got - expected)))


def push_folder(folder: str | Path, repo: str, *, private: bool = False) -> str:
    """Upload an exported folder to the hub repo `repo` (created if missing); returns the repo's URL.

    The token comes from huggingface_hub's usual places (HF_TOKEN, `hf auth login`).
    """
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ConfigError(f"--push-to-hub needs huggingface_hub: {EXTRA}") from None
    api = HfApi()
    try:
        url = api.create_repo(repo_id=repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo,
            repo_type="model",
            commit_message=f"radpretrain {__version__} export",
        )
    except Exception as exc:  # the hub client's HTTP, auth and network errors: the folder itself is complete
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"upload to hub repo '{repo}' failed ({first}); {folder} is complete: log in (`hf auth login` or HF_TOKEN) "
            "and run the export again with --push-to-hub, or upload the folder yourself"
        ) from None
    return str(url)


def _onnx_section(size: int, in_chans: int) -> str:
    return "\n".join(
        [
            "",
            "## ONNX",
            "",
            f"`{ONNX_FILE}` takes `image` (batch, {in_chans}, {size}, {size}) float32 and gives `features` "
            "(batch, features); any batch size. Inputs follow the intensity convention above.",
            "",
            "```python",
            "import onnxruntime",
            f'session = onnxruntime.InferenceSession("{ONNX_FILE}")',
            'features = session.run(["features"], {"image": images})[0]',
            "```",
            "",
        ]
    )


def _convention_text() -> str:
    return (
        f"`{intensity.CONVENTION}` (one channel, MONOCHROME2: higher = more attenuation; windowed to [0, 1], "
        f"then (x - {intensity.MEAN}) / {intensity.STD})"
    )


def _require(module: str, what: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs the Python package '{module}': {EXTRA}") from None


def _move(src: Path, dst: Path) -> None:
    """Move a finished file into place by one rename (a copy first when OUT is on another file system)."""
    with atomic_path(dst) as tmp:
        shutil.move(str(src), str(tmp))


def _listing(out: Path, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if (out / name).is_file()]
