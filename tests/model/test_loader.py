"""Loading checkpoints: folder, full-size layout on the meta device, HF cache, s3://, and the
errors for bad checkpoints (missing / unexpected / mis-shaped / non-float tensors)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from hymba_batch.model import CheckpointError, HymbaConfig, HymbaForCausalLM, load_model
from hymba_batch.model.loader import expected_shapes


def test_full_size_model_on_meta_device_has_the_reference_names_and_shapes(shared_dir):
    ref = json.loads((shared_dir / "hymba-1.5b" / "param_shapes.json").read_text())["state_dict"]
    cfg = HymbaConfig.from_json(shared_dir / "hymba-1.5b" / "config.json")
    with torch.device("meta"):
        model = HymbaForCausalLM(cfg)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: v["shape"] for k, v in ref.items()}
    assert sum(p.numel() for p in model.parameters()) == 1_522_797_824
    assert "lm_head.weight" not in expected_shapes(cfg)  # tied: absent from the file


def test_tiny_checkpoint_round_trip_fp32_and_bf16(tiny_ckpt):
    sd = load_file(str(tiny_ckpt / "model.safetensors"))
    m32 = load_model(tiny_ckpt)
    assert torch.equal(m32.model.layers[1].mamba.in_proj.weight, sd["model.layers.1.mamba.in_proj.weight"])
    assert m32.lm_head.weight is m32.model.embed_tokens.weight
    m16 = load_model(tiny_ckpt, dtype=torch.bfloat16)
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    assert not any(p.device.type == "meta" for p in m16.parameters())
    ids = torch.tensor([1, 450, 4996, 17354])
    l32, l16 = m32.logits(ids), m16.logits(ids)
    assert l16.dtype == torch.float32 and l16.shape == (4, 32001)
    assert (l32 - l16).abs().max() < 0.1 * l32.abs().max()


def _broken(tmp_path, tiny_ckpt, mutate):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, d)
    sd = load_file(str(d / "model.safetensors"))
    mutate(sd)
    save_file(sd, str(d / "model.safetensors"))
    return d


def test_missing_tensor_names_it_and_its_shape(tmp_path, tiny_ckpt):
    d = _broken(tmp_path, tiny_ckpt, lambda sd: sd.pop("model.layers.3.mamba.D.0"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model.layers.3.mamba.D.0 \[128\]"):
        load_model(d)


def test_wrong_shape_names_tensor_and_expected_shape(tmp_path, tiny_ckpt):
    def mutate(sd):
        sd["model.layers.2.mamba.in_proj.weight"] = torch.zeros(416, 64)  # a producer's rows on a consumer
    d = _broken(tmp_path, tiny_ckpt, mutate)
    with pytest.raises(CheckpointError, match=r"'model.layers.2.mamba.in_proj.weight' has shape \[416, 64\], expected \[320, 64\]"):
        load_model(d)


def test_unexpected_and_non_float_tensors(tmp_path, tiny_ckpt):
    d = _broken(tmp_path, tiny_ckpt, lambda sd: sd.__setitem__("model.layers.0.mamba.q_proj.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.mamba.q_proj.weight'"):
        load_model(d)
    def to_int(sd):
        sd["model.final_layernorm.weight"] = sd["model.final_layernorm.weight"].to(torch.int32)
    d2 = _broken(tmp_path / "b", tiny_ckpt, to_int)
    with pytest.raises(CheckpointError, match="'model.final_layernorm.weight' has dtype torch.int32"):
        load_model(d2)


def test_not_a_hymba_config_and_missing_weights(tmp_path, tiny_ckpt):
    d = tmp_path / "llama"
    shutil.copytree(tiny_ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a Hymba config"):
        load_model(d)
    e = tmp_path / "noweights"
    shutil.copytree(tiny_ckpt, e)
    (e / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(e)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_model(tmp_path / "nowhere")


def test_hf_repo_id_from_local_cache(tmp_path, tiny_ckpt, monkeypatch):
    """A repo id resolves from the local HF cache layout, with no network."""
    hub = tmp_path / "hub"
    snap = hub / "models--acme--hymba-tiny" / "snapshots" / "0123abc"
    shutil.copytree(tiny_ckpt, snap)
    (hub / "models--acme--hymba-tiny" / "refs").mkdir()
    (hub / "models--acme--hymba-tiny" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model = load_model("acme/hymba-tiny")
    assert model.config.hidden_size == 64
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_model("acme/absent")


def test_s3_checkpoint_downloaded_once_and_reused(tmp_path, tiny_ckpt, monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
                     "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                     "HYMBA_CACHE": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="models")
        for f in tiny_ckpt.iterdir():
            s3.upload_file(str(f), "models", f"hymba/tiny/{f.name}")
        m = load_model("s3://models/hymba/tiny/")
        assert m.config.num_hidden_layers == 7
        cached = next((tmp_path / "cache" / "s3" / "models").iterdir())
        weights = cached / "model.safetensors"
        mtime = weights.stat().st_mtime_ns
        load_model("s3://models/hymba/tiny")  # second time: nothing downloaded again
        assert weights.stat().st_mtime_ns == mtime
        # an ETag record left empty (an actor read the old shared record while another wrote it)
        # means "verify again": the file is fetched anew, never an error
        (cached / ".model.safetensors.etag").write_text("")
        load_model("s3://models/hymba/tiny")
        assert weights.stat().st_mtime_ns != mtime
        names = {f.name for f in tiny_ckpt.iterdir()}
        # actors of one node mirror the same checkpoint at once
        shutil.rmtree(tmp_path / "cache")
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(4) as ex:
            assert all(m.config.num_hidden_layers == 7
                       for m in ex.map(lambda _: load_model("s3://models/hymba/tiny/"), range(4)))
        assert {p.name for p in cached.iterdir()} == names | {f".{n}.etag" for n in names}  # no .part left
        mtime = weights.stat().st_mtime_ns
        load_model("s3://models/hymba/tiny")
        assert weights.stat().st_mtime_ns == mtime  # every file recorded: nothing fetched again
        s3.put_object(Bucket="models", Key="hymba/tiny/model.safetensors", Body=b"garbage")
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            load_model("s3://models/hymba/tiny/")  # changed ETag: re-downloaded, then rejected
        with pytest.raises(CheckpointError, match="no objects"):
            load_model("s3://models/absent/")
    finally:
        server.stop()


def test_checkpoint_cli_with_overrides(tmp_path):
    out = tmp_path / "c"
    r = subprocess.run([sys.executable, "-m", "hymba_batch.model.checkpoints", "tiny", str(out),
                        "--seed", "5", "num_hidden_layers=4", "global_attn_idx=[0,3]",
                        "kv_reuse_group=[[1,2]]"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = load_model(out)
    assert m.config.num_hidden_layers == 4 and m.config.kv_producer == (0, 1, 1, 3)
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()


def test_model_package_never_imports_ray_or_pyarrow():
    code = ("import sys, hymba_batch.model, hymba_batch.model.engine, hymba_batch.model.checkpoints;"
            "bad = [m for m in ('ray', 'pyarrow', 'transformers', 'tokenizers') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_fresh_process_loads_and_generates_without_importing_dynamo(tiny_ckpt):
    """A cold start pays for what it imports: building the model on the meta device once ran an
    Embedding's normal_ init, whose meta path imports torch._dynamo (1.0 s of the first
    load_model on a CPU; loading then took 0.02 s)."""
    code = (
        "import sys, torch\n"
        "from hymba_batch.model import load_model\n"
        "from hymba_batch.model.engine import Engine, EngineConfig, SamplingParams\n"
        f"m = load_model({str(tiny_ckpt)!r})\n"
        "Engine(m, EngineConfig(memory_budget_bytes=1 << 26)).generate(\n"
        "    [[1, 5, 6, 7]] * 2, SamplingParams(max_new_tokens=3, ignore_eos=True))\n"
        "print(sorted(k for k in sys.modules if k.startswith('torch._dynamo')))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "[]"
