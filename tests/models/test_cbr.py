"""CBR encoders: the paper's layout, registered in timm, and loadable by plain timm as the model card says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from radpretrain.models.cbr import CBR_CONFIGS
from radpretrain.pretrain.checkpoint import model_card

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter importing this tree: registrations made by earlier tests do not leak in."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )


@pytest.mark.parametrize("name", sorted(CBR_CONFIGS))
def test_cbr_models_are_registered_in_timm_with_the_paper_layout(name: str) -> None:
    assert timm.is_model(name)
    model = timm.create_model(name, in_chans=1, num_classes=0)
    kernel, channels = CBR_CONFIGS[name]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == list(channels)
    assert {c.kernel_size for c in convs} == {(kernel, kernel)}
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == len(channels) and all(p.kernel_size == 3 and p.stride == 2 for p in pools)
    features = timm.create_model(name, in_chans=1, features_only=True, out_indices=(0, len(channels) - 1))
    out = features(torch.randn(1, 1, 32, 32))
    assert [o.shape[1] for o in out] == [channels[0], channels[-1]]


def test_paper_channel_table() -> None:
    # Transfusion, Raghu et al. 2019: LargeT 5 blocks, LargeW/Small/Tiny 4; Tiny uses 5x5 kernels, the others 7x7.
    assert CBR_CONFIGS["cbr_large_tall"] == (7, (32, 64, 128, 256, 512))
    assert CBR_CONFIGS["cbr_large_wide"] == (7, (64, 128, 256, 512))
    assert CBR_CONFIGS["cbr_small"] == (7, (32, 64, 128, 256))
    assert CBR_CONFIGS["cbr_tiny"] == (5, (64, 128, 256, 512))


def test_plain_timm_loads_cbr_after_the_import_the_model_card_names() -> None:
    card = {
        "input_size": [1, 32, 32],
        "pretext_tasks": {"simclr": 1.0},
        "radpretrain_version": "0",
        "steps": 1,
        "images_seen": 8,
        "seed": 0,
    }
    text = model_card(card, "cbr_small")
    (module,) = re.findall(r"plain timm \(after `import ([\w.]+)` for the CBR models\)", text)
    create = 'import timm; timm.create_model("cbr_small", in_chans=1, num_classes=0)'
    done = run_python(f"import {module}; {create}; print('built')")
    assert done.returncode == 0 and done.stdout.strip() == "built", done.stderr
    # Without that import timm does not know the name: the import is what registers it.
    assert "Unknown model" in run_python(create).stderr


def test_import_radpretrain_stays_light() -> None:
    # `import radpretrain` (and so `radpretrain --help`) must not pull in torch or timm.
    done = run_python("import sys, radpretrain; print(sorted({'torch', 'timm'} & set(sys.modules)))")
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
