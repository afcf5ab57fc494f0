"""Reading a model: config.json as vLLM reads it, finding it locally or in the Hugging Face
cache without downloading, and the weight bytes per tensor-parallel rank
(gateway/plan/architecture.py, locate.py, weights.py)."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest

from gateway.plan.architecture import ArchitectureError, read_architecture
from gateway.plan.locate import LocateError, locate
from gateway.plan.weights import WeightsError, computed, read

DATA = Path(__file__).parent / "data" / "plan"


def config(name: str) -> dict[str, object]:
    return dict(json.loads((DATA / name / "config.json").read_text()))


def test_max_model_len_follows_vllm_rope_rules() -> None:
    # llama3 and yarn RoPE already include their factor; a linear factor multiplies.
    assert read_architecture(config("llama-3.1-8b")).max_model_len == 131072
    assert read_architecture(config("deepseek-v2-lite")).max_model_len == 163840
    linear = config("mistral-7b-v0.3") | {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    assert read_architecture(linear).max_model_len == 65536


def test_float32_checkpoints_run_in_bfloat16_and_dtype_can_be_forced() -> None:
    gemma = config("gemma-2-9b-it") | {"torch_dtype": "float32"}
    assert read_architecture(gemma).dtype == "bfloat16"
    assert read_architecture(gemma, dtype="float16").dtype == "float16"
    assert read_architecture(config("llama-3.1-8b") | {"dtype": "float16"}).dtype == "float16"


def test_sliding_windows_per_layer_as_vllm_reads_them() -> None:
    gemma = read_architecture(config("gemma-2-9b-it")).windows
    assert gemma[:4] == (4096, None, 4096, None) and len(gemma) == 42
    assert set(read_architecture(config("mistral-7b-v0.1")).windows) == {4096}
    assert set(read_architecture(config("mistral-7b-v0.3")).windows) == {None}
    # Qwen2.5 carries a sliding_window but use_sliding_window is false.
    assert set(read_architecture(config("qwen2.5-7b")).windows) == {None}


def test_mla_head_size_is_latent_plus_rope() -> None:
    deepseek = read_architecture(config("deepseek-v2-lite"))
    assert deepseek.mla is not None and deepseek.head_dim == 512 + 64


def test_a_config_without_layers_is_refused_by_name() -> None:
    broken = config("llama-3.1-8b")
    del broken["num_hidden_layers"]
    with pytest.raises(ArchitectureError, match="num_hidden_layers"):
        read_architecture(broken)


def test_locate_finds_a_local_directory_and_its_config(tmp_path: Path) -> None:
    found = locate(str(DATA / "llama-3.1-8b"), environ={})
    assert found.config["model_type"] == "llama" and found.safetensors == ()
    assert (
        locate(str(DATA / "llama-3.1-8b" / "config.json"), environ={}).directory == found.directory
    )


def test_locate_finds_an_id_in_the_hugging_face_cache_offline(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((DATA / "qwen2.5-7b" / "config.json").read_text())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    found = locate("acme/tiny", environ={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert found.directory == snapshot
    assert locate("acme/tiny", environ={"HF_HOME": str(tmp_path)}).directory == snapshot


def test_an_id_not_in_the_cache_says_where_it_looked_and_downloads_nothing(tmp_path: Path) -> None:
    with pytest.raises(LocateError) as raised:
        locate("acme/absent", environ={"HF_HUB_CACHE": str(tmp_path)})
    message = str(raised.value)
    assert "models--acme--absent" in message and "nothing is downloaded" in message
    assert list(tmp_path.iterdir()) == []


def test_computed_weights_of_llama_8b_match_vllm_log() -> None:
    # vLLM PR 10511's H100 log for Meta-Llama-3-8B: "model weights take 14.96GiB" at TP 1,
    # "7.48GiB" at TP 2.
    llama = read_architecture(config("llama-3.1-8b"))
    weights = computed(llama)
    assert f"{weights.bytes_per_rank(llama, 1) / (1 << 30):.2f}" == "14.96"
    assert f"{weights.bytes_per_rank(llama, 2) / (1 << 30):.2f}" == "7.48"
    assert not weights.read and "8.03B parameters" in weights.source


def test_kv_projections_replicate_once_tp_passes_the_kv_heads() -> None:
    qwen = read_architecture(config("qwen2.5-7b"))  # 4 KV heads
    weights = computed(qwen)
    kv_bytes = sum(t.nbytes for t in weights.tensors if t.rule == "kv")
    others = dataclasses.replace(
        weights, tensors=tuple(t for t in weights.tensors if t.rule != "kv")
    )
    per_rank = {
        tp: weights.bytes_per_rank(qwen, tp) - others.bytes_per_rank(qwen, tp) for tp in (4, 8)
    }
    # At TP 4 each rank holds one KV head; at TP 8 it still holds one, not half.
    assert per_rank == {4: kv_bytes // 4, 8: kv_bytes // 4}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], int]]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # sparse: the data is never read


def test_safetensors_headers_give_the_real_bytes_split_by_vllm_rules(tmp_path: Path) -> None:
    llama = read_architecture(config("llama-3.1-8b"))
    write_safetensors(
        tmp_path / "model-00001-of-00001.safetensors",
        {
            "model.embed_tokens.weight": ("BF16", [128256, 4096], 128256 * 4096 * 2),
            "model.layers.0.self_attn.q_proj.weight": ("F8_E4M3", [4096, 4096], 4096 * 4096),
            "model.layers.0.self_attn.k_proj.weight": ("F8_E4M3", [1024, 4096], 1024 * 4096),
            "model.layers.0.input_layernorm.weight": ("BF16", [4096], 4096 * 2),
            "model.layers.99.mlp.down_proj.weight": ("BF16", [8], 16),  # past num_hidden_layers
        },
    )
    weights = read(sorted(tmp_path.glob("*.safetensors")), llama)
    assert weights.read and len(weights.tensors) == 4
    assert weights.bytes_per_rank(llama, 1) == 128256 * 4096 * 2 + 4096 * 4096 + 1024 * 4096 + 8192
    assert weights.bytes_per_rank(llama, 2) == (
        128256 // 2 * 4096 * 2 + 4096 * 4096 // 2 + 1024 * 4096 // 2 + 8192
    )


def test_a_truncated_safetensors_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(struct.pack("<Q", 1 << 40))
    with pytest.raises(WeightsError, match="not plausible"):
        read([bad], read_architecture(config("llama-3.1-8b")))
