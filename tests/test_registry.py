from __future__ import annotations

import pytest

from radpretrain.errors import ConfigError
from radpretrain.registry import Registry


def test_registry_finds_and_suggests() -> None:
    tasks: Registry[type] = Registry("task")
    for name in ("simclr", "byol", "mae"):
        tasks.register(name)(type(name, (), {}))
    assert tasks.names() == ["byol", "mae", "simclr"]
    assert tasks.get("mae").__name__ == "mae"
    with pytest.raises(ConfigError, match=r"Unknown task 'simclar'. Did you mean 'simclr'\? Known: byol, mae, simclr"):
        tasks.get("simclar")
    with pytest.raises(ValueError, match="twice"):
        tasks.register("mae")(type("mae2", (), {}))
