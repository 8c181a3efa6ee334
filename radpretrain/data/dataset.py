"""The torch Dataset over a cohort's cases: decoded once, cached on the cohort, with training augmentation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from radpretrain import intensity
from radpretrain.data.cohorts import Case, Cohort
from radpretrain.data.readers import read_case
from radpretrain.errors import CohortError


class CohortDataset(Dataset):
    """Cases of a cohort as encoder inputs and targets, decoded once and kept in memory.

    Items: {"image": (1, H, W) or (1, D, H, W) float32 in the intensity convention, "target": the mask as
    (1, ...) float32 in {0, 1} (segmentation), a long class index or a float (classification), "valid":
    (1, ...) bool, True where the image is rather than letterbox padding (metrics score only there), "id",
    "patient"}. Every case is decoded, checked, windowed and letterboxed as pretraining views are
    (`readers.read_case`) when the dataset is made (errors come before any training); the arrays are
    cached on the cohort, so datasets over the same cohort share them.

    Augmentation (training only; MONAI, same for 2D and 3D, no flips since laterality matters): a random
    affine (rotation up to 10 degrees, scale 0.9-1.1, shift up to 5%) on image and mask, gamma 0.8-1.25,
    window/level jitter (intensity scale and shift 10%), light Gaussian noise. Random streams follow
    `torch.initial_seed()`, so DataLoader workers differ and a seeded run repeats.

    Args:
        cohort: The cohort.
        cases: The cases to serve (default: all), e.g. one patient-level split.
        size: Output side (int) or shape per spatial axis, e.g. 256 or (32, 128, 128).
        augment: Apply the training augmentation.
    """

    def __init__(
        self,
        cohort: Cohort,
        cases: Sequence[Case] | None = None,
        size: int | Sequence[int] = 224,
        augment: bool = False,
    ) -> None:
        self.cohort = cohort
        self.cases = list(cohort.cases if cases is None else cases)
        if not self.cases:
            raise CohortError("no cases to serve; give at least one case")
        self.size = _size(size, cohort.spatial_dims)
        for case in self.cases:
            if case.target is None:
                raise CohortError(f"case {case.id} has no label; label it or leave it out")
            if cohort.task == "seg" and not isinstance(case.target, Path):
                raise CohortError(f"case {case.id} has no mask file in a segmentation cohort")
        self._load()
        self.augment = augment
        self._transform = _augmentation(self.size, cohort.task == "seg") if augment else None
        self._seed: int | None = None

    def _load(self) -> None:
        from tqdm.auto import tqdm

        todo = [c for c in self.cases if (c, self.size) not in self.cohort._arrays]
        for case in tqdm(todo, desc="loading cohort", unit="case", leave=False, disable=len(todo) < 2):
            self.cohort._arrays[(case, self.size)] = read_case(case, self.cohort.spatial_dims, self.size)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        image01, mask, valid = self.cohort._arrays[(case, self.size)]
        if self._transform is not None:
            image01, mask, valid = self._augment(image01, mask, valid)
        image = torch.from_numpy(intensity.normalize(image01)[None].copy())
        target: torch.Tensor
        if mask is not None:
            target = torch.from_numpy(mask[None].astype(np.float32))
        elif isinstance(case.target, float):
            target = torch.tensor(case.target, dtype=torch.float32)
        else:
            target = torch.tensor(case.target, dtype=torch.long)
        valid_t = torch.from_numpy(valid[None].copy())
        return {"image": image, "target": target, "valid": valid_t, "id": case.id, "patient": case.patient}

    def _augment(
        self, image01: np.ndarray, mask: np.ndarray | None, valid: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        from monai.utils import convert_to_numpy

        assert self._transform is not None
        seed = torch.initial_seed() % 2**32
        if seed != self._seed:  # a new DataLoader worker or a reseeded process
            self._transform.set_random_state(seed=seed)
            self._seed = seed
        # The padding moves with the image, so "valid" goes through the affine as the mask does.
        data = {"image": image01[None], "valid": valid[None].astype(np.float32)}
        if mask is not None:
            data["mask"] = mask[None].astype(np.float32)
        out = self._transform(data)
        image = np.clip(convert_to_numpy(out["image"])[0], 0.0, 1.0).astype(np.float32)
        new_mask = None if mask is None else (convert_to_numpy(out["mask"])[0] >= 0.5).astype(np.uint8)
        return image, new_mask, convert_to_numpy(out["valid"])[0] >= 0.5


def _size(size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    sides = (size,) * spatial_dims if isinstance(size, int) else tuple(size)
    if len(sides) != spatial_dims or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sides):
        raise CohortError(f"size must be a positive integer or {spatial_dims} of them for this cohort, got {size!r}")
    return sides


def _augmentation(size: tuple[int, ...], with_mask: bool) -> Any:
    from monai import transforms as T

    keys = ["image", "valid", "mask"] if with_mask else ["image", "valid"]
    spatial_dims = len(size)
    angles = (np.deg2rad(10.0),) * (1 if spatial_dims == 2 else 3)
    return T.Compose(
        [
            T.RandAffined(
                keys,
                prob=0.8,
                rotate_range=angles,
                scale_range=(0.1,) * spatial_dims,
                translate_range=tuple(0.05 * side for side in size),  # in pixels
                mode="bilinear",  # masks and valid too: thresholded at 0.5 afterwards, smoother than nearest
                padding_mode="zeros",
            ),
            T.RandAdjustContrastd("image", prob=0.3, gamma=(0.8, 1.25)),
            T.RandScaleIntensityd("image", factors=0.1, prob=0.5),
            T.RandShiftIntensityd("image", offsets=0.1, prob=0.5),
            T.RandGaussianNoised("image", prob=0.2, std=0.02),
        ]
    )
