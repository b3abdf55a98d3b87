"""Checkpoint loading: a local folder, a Hugging Face repo id (local HF cache first), or
``s3://bucket/prefix/`` (downloaded once with boto3 into a local cache, verified by size and
ETag, reused next time; S3-compatible stores through ``AWS_ENDPOINT_URL``).

Weights are read tensor by tensor from safetensors, cast to the target dtype on the way, and
assigned into a model built on the meta device: no full fp32 copy of a bf16 checkpoint.
Every name and shape is checked against the config; errors name the tensor and the expected
shape. Knows nothing of Ray, Parquet or text (the tokenizer lives in ``pipeline/``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path

import torch
import torch.nn as nn

from .config import ConfigError, HymbaConfig
from .hymba import HymbaForCausalLM


class CheckpointError(ValueError):
    """The checkpoint folder does not hold the tensors the config asks for."""


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def cache_root() -> Path:
    return Path(os.environ.get("HYMBA_CACHE", Path.home() / ".cache" / "hymba-batch"))


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """Turn a folder path, ``s3://`` URI or HF repo id into a local checkpoint folder."""
    src = str(source)
    if src.startswith("s3://"):
        return download_s3_checkpoint(src)
    p = Path(src).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{src}: is a file; expected a checkpoint folder with config.json")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", src) and not src.startswith((".", "/")):
        return _hf_snapshot(src)
    raise CheckpointError(f"{src}: no such checkpoint folder (nor an s3:// URI or a Hugging Face repo id)")


def _hf_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.safetensors", "tokenizer.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception as cached_err:  # not in the local cache: download unless offline
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise CheckpointError(f"{repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE=1") from cached_err
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns))
        except Exception as e:
            raise CheckpointError(f"{repo_id}: not in the local Hugging Face cache and download failed: {e}") from e


def download_s3_checkpoint(uri: str) -> Path:
    """Mirror ``s3://bucket/prefix/`` into the local cache; skip files whose size and ETag match."""
    import boto3  # imported here: only S3 sources need it

    m = re.fullmatch(r"s3://([^/]+)/?(.*)", uri)
    if not m:
        raise CheckpointError(f"{uri}: not an s3://bucket/prefix URI")
    bucket, prefix = m.group(1), m.group(2)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    dest = cache_root() / "s3" / bucket / hashlib.sha256(prefix.encode()).hexdigest()[:16]
    dest.mkdir(parents=True, exist_ok=True)
    s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    objects = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            if rel and "/" not in rel:  # the checkpoint's own files, not sub-folders
                objects.append((obj["Key"], rel, obj["Size"], obj["ETag"].strip('"')))
    if not objects:
        raise CheckpointError(f"{uri}: no objects under this prefix")
    for key, rel, size, etag in objects:
        local, etag_file = dest / rel, dest / f".{rel}.etag"  # each file's ETag beside it: actors
        if local.exists() and local.stat().st_size == size and _read_etag(etag_file) == etag:  # share
            continue  # the cache, and one record per file needs no merging of their writes
        tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
        tmp = dest / f".{rel}.{tag}"
        s3.download_file(bucket, key, str(tmp))
        got = tmp.stat().st_size
        if got != size:
            tmp.unlink()
            raise CheckpointError(f"{uri}{rel}: downloaded {got} bytes, expected {size}")
        tmp.replace(local)
        tmp = dest / f".{rel}.etag.{tag}"
        tmp.write_text(etag)
        tmp.replace(etag_file)  # atomic: an actor reading it never sees a half-written ETag
    return dest


def _read_etag(path: Path) -> str | None:
    """The ETag a file was mirrored with (None when unknown: the file is fetched again)."""
    try:
        return path.read_text() or None
    except OSError:
        return None


def expected_shapes(cfg: HymbaConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor's name and shape for ``cfg`` (lm_head only when untied)."""
    with torch.device("meta"):
        model = HymbaForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{folder}: no model.safetensors (or model.safetensors.index.json)")


def load_model(source: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> HymbaForCausalLM:
    """Load a Hymba checkpoint (folder, HF repo id, or s3:// prefix) onto ``device`` in ``dtype``."""
    from safetensors import safe_open

    folder = resolve_checkpoint(source)
    try:
        cfg = HymbaConfig.from_json(folder / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    with torch.device("meta"):
        model = HymbaForCausalLM(cfg)
    want = expected_shapes(cfg)
    seen: set[str] = set()
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    read_to = str(dev) if dev.type == "cuda" else "cpu"  # tensors go straight to the GPU
    for path in _weight_files(folder):
        try:
            handle = safe_open(str(path), framework="pt", device=read_to)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        with handle as f:
            for name in f.keys():
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # tied: the embedding is the head
                if name not in want:
                    raise CheckpointError(f"{path.name}: unexpected tensor {name!r} (not part of this config's model)")
                sl = f.get_slice(name)
                shape = tuple(sl.get_shape())
                if shape != want[name]:
                    raise CheckpointError(f"{path.name}: tensor {name!r} has shape {list(shape)}, "
                                          f"expected {list(want[name])}")
                t = f.get_tensor(name)
                if not t.is_floating_point():
                    raise CheckpointError(f"{path.name}: tensor {name!r} has dtype {t.dtype}, expected a float dtype")
                _assign(model, name, t.to(device=device, dtype=dtype))
                seen.add(name)
    missing = sorted(set(want) - seen)
    if missing:
        shown = ", ".join(f"{n} {list(want[n])}" for n in missing[:5])
        raise CheckpointError(f"{folder}: missing {len(missing)} tensor(s): {shown}"
                              + (" ..." if len(missing) > 5 else ""))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, nn.Parameter(tensor, requires_grad=False))
