"""Config parsing and validation against the real Hymba-1.5B config.json."""

import json

import pytest

from hymba_batch.model.config import ConfigError, HymbaConfig


@pytest.fixture
def real(shared_dir):
    return json.loads((shared_dir / "hymba-1.5b" / "config.json").read_text())


def test_real_config_derived_fields(real):
    cfg = HymbaConfig.from_dict(real)
    assert cfg.producers == (0, 1, 3, 5, 7, 9, 11, 13, 15, 16, 19, 21, 23, 25, 27, 29, 31)
    assert [i for i in range(32) if not cfg.is_producer(i)] == [2, 4, 6, 8, 10, 12, 14, 17, 18, 20, 22, 24, 26, 28, 30]
    assert cfg.kv_producer[18] == 16 and cfg.kv_producer[17] == 16
    assert (cfg.head_dim, cfg.v_head_dim, cfg.d_inner, cfg.kv_group_size) == (64, 128, 3200, 5)
    assert cfg.in_proj_rows(0) == 8960 and cfg.in_proj_rows(2) == 8000
    assert cfg.rope_base == pytest.approx(74534.8303, abs=1e-3)
    assert HymbaConfig.from_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("key,value,match", [
    ("model_type", "llama", "not a Hymba config"),
    ("num_mamba", 2, "'num_mamba'"),
    ("kq_norm", "rms", "'kq_norm'"),
    ("memory_tokens_interspersed_every", 64, "memory_tokens_interspersed_every"),
    ("mamba_proj_bias", True, "mamba_proj_bias"),
    ("layer_type", ["a"] * 32, "layer_type"),
    ("hidden_size", "1600", "'hidden_size' has value '1600' of the wrong type"),
    ("num_key_value_heads", 4, "num_key_value_heads"),
    ("global_attn_idx", [0, 15, 40], "global_attn_idx"),
    ("kv_reuse_group", [[1, 2], [2, 3]], "kv_reuse_group"),
    ("kv_reuse_group", [[14, 15]], "all global or all sliding-window"),
    ("rope_type", "yarn", "rope_type"),
    ("brand_new_field", 1, "unknown field"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings"),
])
def test_unsupported_values_name_the_field(real, key, value, match):
    real[key] = value
    with pytest.raises(ConfigError, match=match):
        HymbaConfig.from_dict(real)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        HymbaConfig.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        HymbaConfig.from_json(tmp_path / "config.json")
