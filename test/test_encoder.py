"""The PyTorch Whisper encoder: parity with CTranslate2, early exit, and weight-loading errors."""
from __future__ import annotations

import struct
from pathlib import Path

import ctranslate2
import numpy as np
import pytest
import torch

from conftest import espeak
from tinyalign_ros.core.audio import load_audio
from tinyalign_ros.core.encoder import (
    EncoderConfig,
    WeightLoadError,
    WhisperEncoder,
    _ct2_name,
    load_whisper_encoder,
    log_mel,
    read_ctranslate2,
)
from tinyalign_ros.core.models import whisper_tiny_dir

# fp32 on both sides with the same fp16 weights: what is left is summation order (~1e-4 of
# activations that reach ~12).
PARITY_TOL = 5e-4
CT2_DTYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}


@pytest.fixture(scope="module")
def encoder() -> WhisperEncoder:
    return load_whisper_encoder()


@pytest.fixture(scope="module")
def sentence(tmp_path_factory) -> np.ndarray:
    """~3.4 s of real synthesized speech (a whole sentence, so every layer sees structure)."""
    path = tmp_path_factory.mktemp("encoder") / "sentence.wav"
    return load_audio(espeak("Please bring me the red cup from the kitchen table.", path))


@pytest.fixture(scope="module")
def encoder_tensors() -> dict[str, torch.Tensor]:
    """The encoder's variables of tiny.en as stored (fp16), for writing modified model.bin files."""
    _, tensors = read_ctranslate2(whisper_tiny_dir() / "model.bin", lambda name: name.startswith("encoder/"))
    return tensors


def ct2_encode(model_dir: Path, mel: torch.Tensor) -> np.ndarray:
    model = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32", intra_threads=1)
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.numpy()[None]))
    return np.array(model.encode(features, to_cpu=True))


def write_ct2(path: Path, tensors: dict[str, torch.Tensor], spec: str = "WhisperSpec", trailing: bytes = b"") -> Path:
    """A model.bin in CTranslate2's layout (independent of the reader under test)."""

    def string(s: str) -> bytes:
        raw = s.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = [struct.pack("<I", 6), string(spec), struct.pack("<II", 3, len(tensors))]
    for name, t in tensors.items():
        data = t.contiguous().numpy().tobytes()
        out += [string(name), struct.pack(f"<B{t.dim()}I", t.dim(), *t.shape),
                struct.pack("<BI", CT2_DTYPE_IDS[t.dtype], len(data)), data]
    out.append(struct.pack("<I", 0))  # no aliases
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.bin").write_bytes(b"".join(out) + trailing)
    return path


def patch_header(model_dir: Path, name: str, field: str, value: int) -> None:
    """Overwrite the dtype id ("dtype", u8) or byte count ("bytes", u32) of tensor `name`."""
    path = model_dir / "model.bin"
    data = bytearray(path.read_bytes())
    at = data.index(name.encode() + b"\0") + len(name) + 1
    at += 1 + 4 * data[at]  # rank, dims
    if field == "dtype":
        data[at] = value
    else:
        data[at + 1 : at + 5] = struct.pack("<I", value)
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("pad_to_30s", [True, False], ids=["padded", "unpadded"])
def test_matches_ctranslate2(encoder, sentence, pad_to_30s):
    mel = log_mel(sentence, pad_to_30s)
    with torch.inference_mode():
        ours = encoder(mel).output.numpy()
    ref = ct2_encode(whisper_tiny_dir(), mel)
    assert ours.shape == ref.shape == (1, (mel.shape[1] + 1) // 2, 384)
    diff = float(np.abs(ours - ref).max())
    assert diff < PARITY_TOL, f"max abs difference to CTranslate2 {diff:.2e}"


@pytest.mark.parametrize("quantization", ["int8", "int16"])
def test_quantized_weights_match_ctranslate2(tmp_path, sentence, quantization):
    """A model.bin quantized by CTranslate2's own converter code dequantizes as CTranslate2 does."""
    from ctranslate2.specs import model_spec, whisper_spec

    src = whisper_tiny_dir()
    _, tensors = read_ctranslate2(src / "model.bin")
    spec = whisper_spec.WhisperSpec(4, 6, 4, 6)
    for name, value in tensors.items():
        scope, attr = name.rsplit("/", 1)
        array = value.numpy()
        setattr(model_spec.index_spec(spec, scope), attr, array.dtype.type(array) if array.ndim == 0 else array)
    spec.register_vocabulary((src / "vocabulary.txt").read_text(encoding="utf-8").splitlines())
    spec.validate()  # also wraps the arrays the way optimize() expects
    spec.optimize(quantization)
    spec.save(str(tmp_path))
    _, stored = read_ctranslate2(tmp_path / "model.bin", lambda n: n == "encoder/layer_0/ffn/linear_0/weight")
    assert stored["encoder/layer_0/ffn/linear_0/weight"].dtype == getattr(torch, quantization)

    mel = log_mel(sentence, pad_to_30s=False)
    with torch.inference_mode():
        ours = load_whisper_encoder(tmp_path)(mel).output.numpy()
    assert np.abs(ours - ct2_encode(tmp_path, mel)).max() < 2 * PARITY_TOL


# --------------------------------------------------------------------------- layers and early exit


def test_hidden_states_of_every_layer(encoder, sentence):
    mel = log_mel(sentence, pad_to_30s=False)
    with torch.inference_mode():
        out = encoder(mel)
    assert (encoder.n_layers, encoder.d_model) == (4, 384)
    assert len(out.hidden_states) == encoder.n_layers + 1
    frames = (mel.shape[1] + 1) // 2
    assert all(h.shape == (1, frames, 384) for h in out.hidden_states)
    torch.testing.assert_close(out.output, encoder.ln_post(out.hidden_states[-1]))
    # every block changes the representation (no layer is skipped or duplicated)
    for before, after in zip(out.hidden_states, out.hidden_states[1:]):
        assert not torch.allclose(before, after)


def test_max_layer_stops_computing(encoder, sentence):
    calls = [0] * encoder.n_layers
    hooks = [
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(encoder.blocks)
    ]
    mel = log_mel(sentence, pad_to_30s=False)
    try:
        with torch.inference_mode():
            early = encoder(mel, max_layer=2)
            assert calls == [1, 1, 0, 0]
            full = encoder(mel)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(early.hidden_states) == 3
    for a, b in zip(early.hidden_states, full.hidden_states):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(early.output, encoder.ln_post(full.hidden_states[2]))


@pytest.mark.parametrize("max_layer", [0, 5])
def test_max_layer_out_of_range(encoder, max_layer):
    with pytest.raises(ValueError, match="max_layer must be in 1..4"):
        encoder(torch.zeros(80, 100), max_layer=max_layer)


@pytest.mark.parametrize("shape", [(40, 100), (80, 3002), (1, 1, 80, 100)])
def test_rejects_bad_mel(encoder, shape):
    with pytest.raises(ValueError, match="mel"):
        encoder(torch.zeros(shape))


def test_log_mel_shapes(sentence):
    unpadded = log_mel(sentence, pad_to_30s=False)
    padded = log_mel(sentence, pad_to_30s=True)
    assert unpadded.shape == (80, sentence.size // 160)
    assert padded.shape == (80, 3000)
    torch.testing.assert_close(padded[:, : unpadded.shape[1]], unpadded)
    assert not padded[:, unpadded.shape[1] :].any()  # faster-whisper pads the features with zeros
    with pytest.raises(ValueError, match="30 s window"):
        log_mel(np.zeros(31 * 16000, dtype=np.float32), pad_to_30s=True)


def test_other_sizes_read_dims_from_the_file(tmp_path):
    """Nothing about tiny is hard-coded: a random 128-mel, 2-layer, 4-head encoder round-trips."""
    torch.manual_seed(0)
    config = EncoderConfig(n_mels=128, n_ctx=50, d_model=128, n_heads=4, n_layers=2)
    reference = WhisperEncoder(config).eval()
    tensors = {_ct2_name(k): v.half() for k, v in reference.state_dict().items()}
    tensors["encoder/num_heads"] = torch.tensor(4, dtype=torch.int16)  # d_model / 64 would say 2
    loaded = load_whisper_encoder(write_ct2(tmp_path, tensors))
    assert loaded.config == config
    reference.load_state_dict({k: v.half().float() for k, v in reference.state_dict().items()})
    mel = torch.randn(128, 100)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(mel).output, reference(mel).output)


# --------------------------------------------------------------------------- clear errors


def test_encoder_only_file_loads(tmp_path, encoder_tensors, encoder, sentence):
    """The writer the error tests rely on is faithful: an unmodified copy gives the same encoder."""
    copy = load_whisper_encoder(write_ct2(tmp_path, encoder_tensors))
    mel = log_mel(sentence, pad_to_30s=False)
    with torch.inference_mode():
        torch.testing.assert_close(copy(mel).output, encoder(mel).output, rtol=0, atol=0)


def test_missing_file(tmp_path):
    with pytest.raises(WeightLoadError, match="not found"):
        load_whisper_encoder(tmp_path)


@pytest.mark.parametrize("keep", [3, 20, 40_000_000, -1], ids=["version", "header", "in-tensor", "aliases"])
def test_truncated_file(tmp_path, keep):
    data = (whisper_tiny_dir() / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[:keep])
    with pytest.raises(WeightLoadError, match="truncated"):
        load_whisper_encoder(tmp_path)


def test_unknown_dtype(tmp_path, encoder_tensors):
    patch_header(write_ct2(tmp_path, encoder_tensors), "encoder/conv2/weight", "dtype", 9)
    with pytest.raises(WeightLoadError, match="encoder/conv2/weight has unknown dtype id 9"):
        load_whisper_encoder(tmp_path)


def test_byte_count_disagrees_with_shape(tmp_path, encoder_tensors):
    patch_header(write_ct2(tmp_path, encoder_tensors), "encoder/conv1/bias", "bytes", 10)
    with pytest.raises(WeightLoadError, match=r"corrupt: tensor encoder/conv1/bias .* 768 bytes, the file says 10"):
        load_whisper_encoder(tmp_path)


def test_trailing_garbage(tmp_path, encoder_tensors):
    write_ct2(tmp_path, encoder_tensors, trailing=b"junk")
    with pytest.raises(WeightLoadError, match="4 unexpected bytes"):
        load_whisper_encoder(tmp_path)


def test_shape_mismatch_names_the_tensor(tmp_path, encoder_tensors):
    name = "encoder/layer_2/ffn/linear_0/weight"
    write_ct2(tmp_path, {**encoder_tensors, name: encoder_tensors[name][:1000]})
    with pytest.raises(WeightLoadError, match=rf"{name} has shape \[1000, 384\], expected \[1536, 384\]"):
        load_whisper_encoder(tmp_path)


def test_missing_tensor(tmp_path, encoder_tensors):
    name = "encoder/layer_1/self_attention/linear_1/bias"
    write_ct2(tmp_path, {k: v for k, v in encoder_tensors.items() if k != name})
    with pytest.raises(WeightLoadError, match=f"lacks tensor {name}"):
        load_whisper_encoder(tmp_path)


def test_not_a_whisper_model(tmp_path, encoder_tensors):
    write_ct2(tmp_path, encoder_tensors, spec="TransformerSpec")
    with pytest.raises(WeightLoadError, match="not a Whisper model"):
        load_whisper_encoder(tmp_path)


def test_not_a_ctranslate2_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(WeightLoadError, match="binary version .* not supported"):
        load_whisper_encoder(tmp_path)


def test_no_encoder_layers(tmp_path, encoder_tensors):
    write_ct2(tmp_path, {k: v for k, v in encoder_tensors.items() if not k.startswith("encoder/layer_")})
    with pytest.raises(WeightLoadError, match="no encoder layers"):
        load_whisper_encoder(tmp_path)
