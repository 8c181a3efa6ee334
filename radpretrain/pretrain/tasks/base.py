"""The contract every pretext task keeps: declare views, return {"loss": ..., scalars} from forward."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from radpretrain.errors import ConfigError
from radpretrain.registry import Registry, did_you_mean

#: A task asks for the views (format.VIEW_NAMES) it needs and the loader makes the union once per sample
#: (so SimCLR + metadata share the two strong views); every batch carries the format.LABEL_NAMES labels.


class Task(nn.Module, metaclass=abc.ABCMeta):
    """A pretext objective on a shared encoder.

    Subclasses set `views` (a class default; an instance may choose its own from its options), list their
    options with defaults in `defaults`, build their heads in `__init__` and return a dict from `forward`
    with a scalar tensor under "loss" plus any detached scalars to log. `encoder` is shared by all tasks of
    a run and is not owned (not registered as a submodule) by the task; momentum copies are.

    `self.options` holds the defaults updated with the run's `task_options.<name>`; unknown keys and
    values of the wrong type are refused with a ConfigError.
    """

    #: Registry name, set by `register_task`.
    name: ClassVar[str] = ""
    #: Views read from the batch, each (B, 1, S, S) float.
    views: tuple[str, ...] = ()
    #: Options and their defaults (their types are the types accepted).
    defaults: ClassVar[dict[str, Any]] = {}
    #: Encoder families the task works with: "cnn" (any timm CNN or CBR model) and/or "vit".
    encoder_kinds: ClassVar[tuple[str, ...]] = ("cnn", "vit")

    def __init__(
        self, encoder: nn.Module, num_features: int, options: Mapping[str, Any], vocab: Mapping[str, list[str]]
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.options = resolve_options(self.name or type(self).__name__, self.defaults, options)
        self.vocab = {key: list(value) for key, value in vocab.items()}

    @abc.abstractmethod
    def forward(self, encoder: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Compute the task's loss on a batch of its views; returns {"loss": scalar, name: scalar ...}."""

    def after_step(self, encoder: nn.Module, step: int, total_steps: int) -> None:
        """Called after each optimiser step (momentum updates); most tasks do nothing."""

    def trained_labels(self) -> tuple[str, ...]:
        """The header labels (format.LABEL_NAMES) this task learns to predict; probes of them are not transfer."""
        return ()


TASKS: Registry[type[Task]] = Registry("task")

T = TypeVar("T", bound=type[Task])


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator: register a Task subclass under `name` (its `name` attribute is set too)."""

    def add(cls: T) -> T:
        cls.name = name
        TASKS.register(name)(cls)
        return cls

    return add


def resolve_options(task: str, defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """`defaults` updated with `given`, refusing unknown keys and values whose type does not fit the default."""
    options = dict(defaults)
    for key, value in given.items():
        if key not in defaults:
            known = sorted(defaults)
            raise ConfigError(
                f"unknown option 'task_options.{task}.{key}'.{did_you_mean(key, known)} "
                f"Known for {task}: {', '.join(known) or '(none)'}"
            )
        options[key] = _fit(f"task_options.{task}.{key}", defaults[key], value)
    return options


def _fit(key: str, default: Any, value: Any) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if isinstance(default, int) and not isinstance(value, bool) and isinstance(value, int):
        return value
    if isinstance(default, float) and not isinstance(value, bool) and isinstance(value, (int, float)):
        return float(value)
    if isinstance(default, str) and isinstance(value, str):
        return value
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(default, dict) and isinstance(value, Mapping):
        return dict(value)
    raise ConfigError(f"{key} must be like {default!r} ({type(default).__name__}), got {value!r}")


def is_vit(encoder: nn.Module) -> bool:
    """Whether the encoder is a timm VisionTransformer (patch tokens, class token, pos_embed)."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(encoder, VisionTransformer)


def last_feature_map(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The encoder's last (B, C, h, w) map via timm's forward_intermediates (final norm applied for ViTs)."""
    timm_model: Any = encoder
    maps = timm_model.forward_intermediates(images, indices=1, norm=True, intermediates_only=True)
    return maps[-1]


def check_positive(task: str, options: Mapping[str, Any], *names: str) -> None:
    for name in names:
        if not options[name] > 0:
            raise ConfigError(f"task_options.{task}.{name} must be > 0, got {options[name]}")


def check_fraction(task: str, options: Mapping[str, Any], *names: str) -> None:
    for name in names:
        if not 0.0 < options[name] < 1.0:
            raise ConfigError(f"task_options.{task}.{name} must be between 0 and 1 (exclusive), got {options[name]}")
