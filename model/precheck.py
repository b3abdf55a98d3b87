"""Checks that a checkpoint source can be loaded, in seconds and without torch: the pre-flight
of ``hymba-batch validate | run | submit`` (before Ray starts, before any actor loads weights).

A local folder must hold a Hymba ``config.json`` (parsed and validated by ``HymbaConfig``) and
``model.safetensors`` (or its index); a Hugging Face repo id must be in the local cache, or the
hub must answer (one metadata request, short timeout) and know the repo. ``s3://`` sources are
the caller's to probe (``pipeline/preflight.py``): this module knows nothing of S3, Ray or text.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from .config import ConfigError, HymbaConfig

HUB_TIMEOUT_S = 3.0
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


class CheckpointSourceError(ValueError):
    """The checkpoint source cannot be loaded; the message says why and what to do."""


def check_folder(folder: Path, field: str = "model.path") -> HymbaConfig:
    """A checkpoint folder: a valid Hymba config.json and a weights file; its config."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointSourceError(f"{field} {folder}: no config.json here, so not a Hugging Face checkpoint "
                                    f"folder (expected config.json and model.safetensors)")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointSourceError(f"{field} {cfg_path}: not readable JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "hymba":
        mt = raw.get("model_type") if isinstance(raw, dict) else None
        raise CheckpointSourceError(f"{field} {folder}: config.json has model_type {mt!r}, not 'hymba': "
                                    f"not a Hymba checkpoint (e.g. nvidia/Hymba-1.5B-Instruct)")
    try:
        cfg = HymbaConfig.from_dict(raw, source=str(cfg_path))
    except ConfigError as e:
        raise CheckpointSourceError(f"{field} {e}") from None
    if not any((folder / w).is_file() for w in WEIGHT_FILES):
        raise CheckpointSourceError(f"{field} {folder}: no model.safetensors (or model.safetensors.index.json)")
    return cfg


def is_repo_id(source: str) -> bool:
    return bool(REPO_ID.fullmatch(source)) and not source.startswith((".", "/", "~"))


def check_source(source: str, field: str = "model.path", hub_timeout: float = HUB_TIMEOUT_S) -> str:
    """Check a local folder or a hub repo id; returns what it is (``folder``, ``hf-cache``,
    ``hub``, or ``s3`` unchecked). CheckpointSourceError with a message that says what to do."""
    if source.startswith("s3://"):
        return "s3"
    p = Path(source).expanduser()
    if p.is_dir():
        check_folder(p, field)
        return "folder"
    if p.exists():
        raise CheckpointSourceError(f"{field} {source}: is a file; expected a checkpoint folder with config.json")
    if not is_repo_id(source):
        raise CheckpointSourceError(f"{field} {source}: no such checkpoint folder (nor an s3:// URI or a Hugging "
                                    f"Face repo id like nvidia/Hymba-1.5B-Instruct)")
    return _check_hub(source, field, hub_timeout)


def _check_hub(repo_id: str, field: str, timeout: float) -> str:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        check_folder(Path(cached).parent, field)
        return "hf-cache"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise CheckpointSourceError(f"{field} {repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                                    f"set: download it first (`huggingface-cli download {repo_id}`) or set "
                                    f"model.path to a checkpoint folder")
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    box: dict[str, Any] = {}

    def probe() -> None:
        from huggingface_hub import HfApi

        try:
            HfApi(endpoint=endpoint).model_info(repo_id, timeout=timeout)
        except Exception as e:  # classified below
            box["error"] = e

    t = threading.Thread(target=probe, name="hymba-hub-check", daemon=True)
    t.start()
    t.join(timeout)
    unreachable = (f"{field} {repo_id}: not in the local Hugging Face cache and the hub ({endpoint}) is "
                   f"unreachable")
    fix = ("; download it where there is network (`huggingface-cli download REPO`, then copy ~/.cache/huggingface) "
           "or set model.path to a checkpoint folder or an s3:// prefix")
    if t.is_alive():
        raise CheckpointSourceError(f"{unreachable} (no answer within {timeout:.0f} s){fix}")
    err = box.get("error")
    if err is None:
        return "hub"
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(err, GatedRepoError):
        raise CheckpointSourceError(f"{field} {repo_id}: a gated repo on the hub: accept its terms on the hub "
                                    f"and set HF_TOKEN") from None
    if isinstance(err, RepositoryNotFoundError):
        raise CheckpointSourceError(f"{field} {repo_id}: no such model on the Hugging Face hub (private? set "
                                    f"HF_TOKEN)") from None
    if isinstance(err, HfHubHTTPError) and getattr(getattr(err, "response", None), "status_code", 0) \
            and err.response.status_code < 500:
        raise CheckpointSourceError(f"{field} {repo_id}: the hub refused it ({str(err).splitlines()[0]})") from None
    raise CheckpointSourceError(f"{unreachable} ({type(err).__name__}: {str(err).splitlines()[0][:160]}){fix}") \
        from None
