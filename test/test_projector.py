"""Projectors: pooling, shapes, no positional encoding in the BridgeFormer, safetensors files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tinyalign_ros.core.projector import (
    KINDS, MAX_FEATURE_FRAMES, FeatureMismatch, ProjectorConfig, ProjectorLoadError, build_projector, check_features,
    load_projector, pool_frames, pooled_lengths, read_projector_config, save_projector)


@pytest.fixture(params=KINDS)
def projector(request):
    torch.manual_seed(0)
    return build_projector(request.param, in_dim=16, out_dim=24, stack=4, hidden=32, layers=2, heads=4).eval()


def test_stack_pooling_concatenates_k_frames_and_zero_fills_the_tail():
    x = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    out = pool_frames(x, 4, "stack")
    assert out.shape == (2, 3, 12)
    assert torch.equal(out[0, 0], x[0, :4].reshape(-1))
    assert torch.equal(out[0, 2, 6:], torch.zeros(6))  # frames 10, 11 do not exist
    assert pooled_lengths(torch.tensor([10, 1, 8]), 4).tolist() == [3, 1, 2]


def test_mean_pooling_averages_only_real_frames():
    x = torch.ones(1, 6, 2)
    out = pool_frames(x, 4, "mean", torch.tensor([5]))
    assert out.shape == (1, 2, 2)
    assert torch.allclose(out, torch.ones(1, 2, 2))  # the partial group is a mean of 1 frame, not 1/4


def test_padding_frames_never_leak_into_pooled_tokens():
    x = torch.randn(1, 7, 3)
    padded = torch.cat([x, torch.full((1, 5, 3), 99.0)], 1)
    assert torch.equal(pool_frames(padded, 4, "stack", torch.tensor([7]))[:, :2], pool_frames(x, 4, "stack"))


def test_projector_maps_frames_to_llm_tokens(projector):
    feats = torch.randn(3, 50, 16)  # 1 s of encoder frames at 50 Hz
    emb, n = projector(feats, torch.tensor([50, 30, 5]))
    assert emb.shape == (3, 13, 24)  # ~12.5 tokens per second
    assert n.tolist() == [13, 8, 2]
    with pytest.raises(ValueError, match="expects 16-dim"):
        projector(torch.randn(1, 8, 15))


def test_batched_padded_output_matches_single_utterance(projector):
    a, b = torch.randn(1, 20, 16), torch.randn(1, 9, 16)
    batch = torch.zeros(2, 20, 16)
    batch[0], batch[1, :9] = a[0], b[0]
    emb, n = projector(batch, torch.tensor([20, 9]))
    alone, _ = projector(b)
    assert torch.allclose(emb[1, :n[1]], alone[0], atol=1e-5)


def test_bridgeformer_has_no_positional_encoding():
    torch.manual_seed(0)
    p = build_projector("bridgeformer", in_dim=8, out_dim=12, stack=1, hidden=16, layers=2, heads=2).eval()
    x = torch.randn(1, 10, 8)
    perm = torch.randperm(10)
    out, _ = p(x)
    out_perm, _ = p(x[:, perm])
    assert torch.allclose(out[:, perm], out_perm, atol=1e-5)  # permutation-equivariant
    assert not any("pos" in name for name, _ in p.named_parameters())


def test_safetensors_round_trip_keeps_weights_and_config(projector, tmp_path):
    path = save_projector(projector, tmp_path / "p.safetensors", {"val_wer": "0.2"})
    loaded = load_projector(path, in_dim=16, out_dim=24, encoder_layer=4)
    assert loaded.cfg == projector.cfg
    x = torch.randn(2, 17, 16)
    assert torch.equal(loaded(x)[0], projector(x)[0])
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary file and renamed


def test_float16_file_is_half_the_size_and_close(tmp_path):
    p = build_projector("mlp", in_dim=16, out_dim=24, hidden=64)
    full = save_projector(p, tmp_path / "a.safetensors").stat().st_size
    half = save_projector(p, tmp_path / "b.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full
    x = torch.randn(1, 8, 16)
    assert torch.allclose(load_projector(half)(x)[0], p(x)[0], atol=1e-2)


def test_corrupt_truncated_or_mismatched_files_are_refused(tmp_path):
    p = build_projector("mlp", in_dim=16, out_dim=24, hidden=32)
    path = save_projector(p, tmp_path / "p.safetensors")
    data = bytearray(path.read_bytes())
    with pytest.raises(ProjectorLoadError, match="not found"):
        load_projector(tmp_path / "missing.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ProjectorLoadError, match="not a valid safetensors"):
        load_projector(tmp_path / "trunc.safetensors")
    data[-5] ^= 0xFF  # flip bits inside the last tensor
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    with pytest.raises(ProjectorLoadError, match="corrupt"):
        load_projector(tmp_path / "flip.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a model at all")
    with pytest.raises(ProjectorLoadError):
        load_projector(tmp_path / "junk.safetensors")
    with pytest.raises(ProjectorLoadError, match="encoder width 16, but 384"):
        load_projector(path, in_dim=384)
    with pytest.raises(ProjectorLoadError, match="encoder layer 4, but 2"):
        load_projector(path, encoder_layer=2)


CFG = ProjectorConfig(in_dim=16, out_dim=24, hidden=32, encoder_layer=4)


def test_check_features_returns_the_frames_x_dim_array():
    values = np.arange(8 * 16, dtype=np.float32)
    out = check_features(CFG, values, 8, 16, 4)
    assert out.shape == (8, 16) and out.dtype == np.float32 and np.array_equal(out.reshape(-1), values)


@pytest.mark.parametrize("values, frames, dim, layer, reason", [
    (np.zeros(128), 8, 16, -1, "no encoder features"),
    (np.zeros(0), 0, 16, 4, "no encoder features"),
    (np.zeros(64), 8, 8, 4, "8-dim features, the projector takes 16"),
    (np.zeros(0), 8, 0, 4, "0-dim"),  # 8 x 0 = 0 values is "consistent", and still no features
    (np.zeros(128), 8, 16, 2, "encoder layer 2"),
    (np.zeros(16), 2**32 - 1, 16, 4, f"more than the encoder's {MAX_FEATURE_FRAMES}"),  # before touching values
    (np.zeros(127), 8, 16, 4, "127 feature values, not 8 x 16"),
    (np.full(128, np.nan), 8, 16, 4, "NaN or infinite"),
    (np.r_[np.zeros(127), -np.inf], 8, 16, 4, "NaN or infinite"),
])
def test_check_features_says_why_it_refuses(values, frames, dim, layer, reason):
    with pytest.raises(FeatureMismatch, match=reason):
        check_features(CFG, values, frames, dim, layer)


def test_read_projector_config_reads_metadata_only(projector, tmp_path):
    path = save_projector(projector, tmp_path / "p.safetensors")
    assert read_projector_config(path) == projector.cfg
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ProjectorLoadError):
        read_projector_config(tmp_path / "junk.safetensors")
