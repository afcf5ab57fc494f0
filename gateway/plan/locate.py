"""Find a model's files: a local directory, or a Hugging Face id already in the local cache.

Nothing is ever downloaded. The cache is where huggingface_hub puts it: $HF_HUB_CACHE,
else $HF_HOME/hub, else ~/.cache/huggingface/hub, with one
`models--ORG--NAME/snapshots/REVISION/` directory per revision (refs/main names the
current one).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MAX_CONFIG_BYTES = 4 << 20  # a config.json is kilobytes


class LocateError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    directory: Path
    config: dict[str, Any]
    safetensors: tuple[Path, ...]


def hub_cache(environ: Mapping[str, str]) -> Path:
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"])
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]) / "hub"
    return Path(environ.get("HOME", "~")).expanduser() / ".cache" / "huggingface" / "hub"


def _snapshot(repo: Path) -> Path | None:
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if candidate.is_dir():
            return candidate
    if not snapshots.is_dir():
        return None
    found = [p for p in snapshots.iterdir() if (p / "config.json").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def locate(model: str, environ: Mapping[str, str]) -> ModelFiles:
    path = Path(model).expanduser()
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        directory = path
    else:
        looked = [str(path)]
        directory_or_none = None
        if model.count("/") == 1 and not model.startswith((".", "/", "~")):
            repo = hub_cache(environ) / ("models--" + model.replace("/", "--"))
            looked.append(str(repo))
            directory_or_none = _snapshot(repo)
        if directory_or_none is None:
            raise LocateError(
                f"model {model!r}: no such directory, and not in the Hugging Face cache "
                f"(looked in {', '.join(looked)}); nothing is downloaded"
            )
        directory = directory_or_none
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise LocateError(f"model {model!r}: no config.json in {directory}")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise LocateError(f"{config_path}: too large for a config.json")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise LocateError(f"{config_path}: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise LocateError(f"{config_path}: not a JSON object")
    files = tuple(sorted(directory.glob("*.safetensors")))
    return ModelFiles(directory, config, files)
