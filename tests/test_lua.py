"""The Lua scripts: one file per atomic operation in shared/lua/, every one of them named by the loader and
shipped as package data (so an installed tokenspool, and the container image, has them)."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

from tokenspool.shared import lua

ROOT = Path(__file__).resolve().parent.parent
LUA_DIR = ROOT / "shared" / "lua"


def test_every_script_file_is_named_by_the_loader_and_readable_through_it() -> None:
    files = sorted(path.stem for path in LUA_DIR.glob("*.lua"))
    assert files == sorted(lua.SCRIPT_NAMES)
    for name in lua.SCRIPT_NAMES:
        text = lua.source(name)
        assert "redis.call" in text and text.startswith("--"), f"{name}.lua: a script that says what it does"


def test_the_scripts_are_package_data() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data.get("tokenspool.shared.lua", [])
    for path in LUA_DIR.glob("*.lua"):
        assert any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns), f"{path.name} is not shipped"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY shared ./shared" in dockerfile, "the image builds from the whole shared package"
