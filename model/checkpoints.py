"""Tiny random-weight Hymba checkpoints in exactly the Hugging Face layout, for tests and demos.

    python -m hymba_batch.model.checkpoints tiny OUT_DIR [--seed N] [key=value ...]
    python -m hymba_batch.model.checkpoints tiny OUT_DIR --real --dtype bfloat16   # full-size shape

Writes ``config.json``, ``model.safetensors`` (tied ``lm_head`` omitted, as HF does),
``generation_config.json`` and the real Hymba tokenizer files (shipped in ``model/assets``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import HymbaConfig, real_config_dict

ASSETS = Path(__file__).parent / "assets" / "tokenizer"

TINY: dict[str, Any] = dict(
    hidden_size=64, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, mamba_dt_rank=8, num_memory_tokens=8, sliding_window=16,
    global_attn_idx=(0, 3, 6), kv_reuse_group=((1, 2), (4, 5)),
)


def tiny_config(**overrides: Any) -> HymbaConfig:
    kw = dict(TINY)
    kw.update(overrides)
    return HymbaConfig(**kw)


def random_state_dict(cfg: HymbaConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights with Mamba-style initialisation (so the SSM is neither dead nor exploding)."""
    from .loader import expected_shapes

    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("A_log.0"):
            t = torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float32)).repeat(shape[0], 1)
            t = t + 0.1 * torch.rand(shape, generator=g)
        elif name.endswith("D.0"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("dt_proj.0.bias"):
            dt = torch.exp(torch.rand(shape, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            t = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        elif "layernorm" in name:
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("conv1d.weight"):
            t = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        elif name.endswith("conv1d.bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("memory_tokens") or name.endswith("embed_tokens.weight"):
            t = torch.randn(shape, generator=g)
        else:  # projections
            t = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        out[name] = t.to(dtype).contiguous()
    return out


def random_model(cfg: HymbaConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0):
    """A random-weight model built directly on ``device`` (benchmarks at full size: no file,
    no fp32 copy on the host). Same initialisation rules as ``random_state_dict``."""
    from .hymba import HymbaForCausalLM

    with torch.device("meta"):
        model = HymbaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            _init_(name, p, g)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _init_(name: str, p: torch.Tensor, g: torch.Generator) -> None:
    shape = p.shape
    if name.endswith("A_log.0"):
        p.copy_(torch.log(torch.arange(1, shape[1] + 1, device=p.device, dtype=torch.float32)).repeat(shape[0], 1))
    elif name.endswith("D.0") or "layernorm" in name:
        p.normal_(1.0, 0.1, generator=g)
    elif name.endswith("dt_proj.0.bias"):
        dt = torch.exp(torch.rand(shape, generator=g, device=p.device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        p.copy_(dt + torch.log(-torch.expm1(-dt)))
    elif name.endswith("conv1d.bias"):
        p.normal_(0.0, 0.1, generator=g)
    elif name.endswith("memory_tokens") or name.endswith("embed_tokens.weight"):
        p.normal_(0.0, 1.0, generator=g)
    else:
        p.normal_(0.0, 1.0 / math.sqrt(shape[-1]), generator=g)


def write_checkpoint(out_dir: str | Path, cfg: HymbaConfig, seed: int = 0,
                     dtype: torch.dtype = torch.float32, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a random-weight checkpoint folder for ``cfg``; returns the folder."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
         "pad_token_id": cfg.pad_token_id, "use_cache": False}, indent=2))
    save_file(random_state_dict(cfg, seed, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    src = Path(tokenizer_dir) if tokenizer_dir else ASSETS
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, out / f.name)
    return out


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, val = item.partition("=")
    if not sep:
        raise SystemExit(f"config override {item!r}: expected key=value")
    try:
        return key, json.loads(val)
    except json.JSONDecodeError:
        return key, val


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m hymba_batch.model.checkpoints", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    t = ap
    t.add_argument("cmd", choices=["tiny"], help="write a random-weight checkpoint")
    t.add_argument("out_dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    t.add_argument("--real", action="store_true", help="start from the real Hymba-1.5B config, not the tiny one")
    t.add_argument("overrides", nargs="*", help="config overrides as key=value (JSON values)")
    a = ap.parse_intermixed_args(argv)
    base = real_config_dict() if a.real else tiny_config().to_hf_dict()
    for derived in ("layer_type", "conv_dim", "v_head_dim"):
        base.pop(derived)  # recomputed from the (possibly overridden) shape
    base.update(dict(_parse_override(o) for o in a.overrides))
    cfg = HymbaConfig.from_dict(base, source="overrides")
    out = write_checkpoint(a.out_dir, cfg, a.seed, getattr(torch, a.dtype))
    print(out)


if __name__ == "__main__":
    main()
