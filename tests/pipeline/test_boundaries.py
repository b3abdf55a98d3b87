"""The layering rules of design.md §2, checked in fresh interpreters."""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imported_after(modules: list[str]) -> set[str]:
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(k.split('.')[0] for k in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _modules(folder: str, package: str) -> list[str]:
    names = [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / folder)])]
    assert len(names) > 1, f"no modules found in {folder}"
    return names


def test_pipeline_never_imports_torch_or_ray() -> None:
    mods = _modules("pipeline", "hymba_batch.pipeline")
    assert "hymba_batch.pipeline.prompts" in mods and "hymba_batch.pipeline.tokenizer" in mods
    loaded = _imported_after(mods)
    assert "pyarrow" in loaded and "transformers" in loaded  # the modules really were imported
    assert "torch" not in loaded
    assert "ray" not in loaded


def test_model_never_imports_ray_or_pyarrow() -> None:
    mods = _modules("model", "hymba_batch.model") + ["hymba_batch.model.engine"]
    loaded = _imported_after(mods)
    assert "torch" in loaded
    assert "ray" not in loaded
    assert "pyarrow" not in loaded


def test_driver_side_of_jobs_does_not_import_torch() -> None:
    loaded = _imported_after(["hymba_batch.jobs.spec", "hymba_batch.jobs.driver", "hymba_batch.jobs.cli",
                              "hymba_batch.jobs.preflight"])  # the pre-flight, model check included
    assert "torch" not in loaded
