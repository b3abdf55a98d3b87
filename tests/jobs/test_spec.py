"""The job spec: descriptions, strictness, field paths in errors, overrides, ${ENV}, safe YAML,
the example specs, and the CLI's validate / schema commands."""

from pathlib import Path

import pytest

from hymba_batch.jobs.cli import main
from hymba_batch.jobs.spec import JobSpec, SpecError, load_spec, parse_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "jobs" / "examples").glob("*.yaml"))
BASE = {"model": {"path": "m"}, "input": {"uri": "s3://b/in/"}, "output": {"uri": "s3://b/out/"}}


def _fields(model):
    for name, f in model.model_fields.items():
        yield model.__name__, name, f
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, JobSpec.__mro__[1]) and ann is not model:
            yield from _fields(ann)


def test_every_field_is_described() -> None:
    seen = list(_fields(JobSpec))
    assert len(seen) > 30
    assert [f"{m}.{n}" for m, n, f in seen if not f.description] == []


def test_required_names_exist() -> None:
    s = parse_spec(BASE)
    for path in ["model.path", "model.dtype", "input.uri", "input.text_column", "input.id_column", "task.kind",
                 "task.prompt", "task.template", "task.chat", "task.max_new_tokens", "task.temperature",
                 "task.top_p", "task.seed", "task.max_input_tokens", "task.truncation", "output.uri",
                 "output.format", "output.mode", "resources.num_gpus", "resources.num_actors",
                 "resources.actors_per_gpu"]:
        obj = s
        for part in path.split("."):
            obj = getattr(obj, part)
    assert s.task.truncation == "middle" and s.output.format == "parquet" and s.output.mode == "enrich"


def test_unknown_and_bad_fields_name_their_path() -> None:
    with pytest.raises(SpecError) as e:
        parse_spec({**BASE, "task": {"max_new_tokns": 5, "temperature": -1}}, source="job.yaml")
    msg = str(e.value)
    assert "job.yaml" in msg and "task.max_new_tokns: unknown field" in msg and "task.temperature" in msg
    with pytest.raises(SpecError, match="output.format"):
        parse_spec({**BASE, "output": {"uri": "x", "format": "csv"}})
    with pytest.raises(SpecError, match="input.uri: Field required"):
        parse_spec({"model": {"path": "m"}, "input": {}, "output": {"uri": "x"}})
    with pytest.raises(SpecError, match="task.template is required"):
        parse_spec({**BASE, "task": {"kind": "template"}})
    with pytest.raises(SpecError, match="task.template: line 1"):
        parse_spec({**BASE, "task": {"kind": "template", "template": "{{ x "}})


def test_overrides_and_env_interpolation(monkeypatch) -> None:
    monkeypatch.setenv("OUT_BUCKET", "results")
    s = parse_spec({**BASE, "output": {"uri": "s3://${OUT_BUCKET}/run/"}},
                   ["task.max_new_tokens=7", "task.chat=false", "resources.actors_per_gpu=3",
                    "input.uri=s3://${OUT_BUCKET}/in/", "task.prompt=Say: hi"])
    assert s.output.uri == "s3://results/run/" and s.input.uri == "s3://results/in/"
    assert s.task.max_new_tokens == 7 and s.task.chat is False and s.resources.actors_per_gpu == 3
    assert s.task.prompt == "Say: hi"
    assert parse_spec({**BASE, "name": "${NOPE_UNSET:-fallback}"}).name == "fallback"
    with pytest.raises(SpecError, match="model.path: environment variable NOPE_UNSET is not set"):
        parse_spec({**BASE, "model": {"path": "${NOPE_UNSET}"}})
    with pytest.raises(SpecError, match="resources.bogus: unknown field"):
        parse_spec(BASE, ["resources.bogus=1"])
    with pytest.raises(SpecError, match="expected dotted.key=value"):
        parse_spec(BASE, ["novalue"])


def test_yaml_is_loaded_safely(tmp_path) -> None:
    p = tmp_path / "evil.yaml"
    p.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path) -> None:
    assert isinstance(load_spec(path), JobSpec)


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {"summarize.yaml"}


def test_cli_validate_and_schema(tmp_path, capsys) -> None:
    # the example's defaults (a hub model, s3://my-bucket) are for a real setup: spec checks only
    assert main(["validate", str(EXAMPLES[0]), "--no-check"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: m}\ninput: {uri: x}\noutput: {uri: y}\ntask: {kind: translate}\n")
    assert main(["validate", str(bad)]) == 2
    assert "task.kind" in capsys.readouterr().err
    assert main(["schema"]) == 0
    assert '"max_new_tokens"' in capsys.readouterr().out


def test_cli_validate_plan_lists_units(tmp_path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), tmp_path / "in" / "x.parquet", row_group_size=1)
    spec = tmp_path / "job.yaml"
    spec.write_text(f"model: {{path: m}}\ninput: {{uri: {tmp_path / 'in'}, rows_per_unit: 2}}\n"
                    f"output: {{uri: {tmp_path / 'out'}}}\n")
    assert main(["validate", str(spec), "--plan", "--no-check"]) == 0  # model m: no pre-flight of the model
    assert "1 input file(s), 3 rows, 2 unit(s)" in capsys.readouterr().out
    assert main(["validate", str(spec), "--plan", "--no-check", "--set", "input.text_column=body"]) == 2
    assert "no column 'body'" in capsys.readouterr().err
