"""Early-exit heads, CTC decoding, the exit policy and the heads file, on tiny random models."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tinyalign_ros.core.early_exit import (
    BLANK,
    CharVocab,
    ExitHeads,
    ExitPolicy,
    ctc_confidence,
    encode_with_exit,
    greedy_ctc,
    load_heads,
    save_heads,
)
from tinyalign_ros.core.encoder import EncoderConfig, WeightLoadError, WhisperEncoder

VOCAB = CharVocab()
CONFIG = EncoderConfig(n_mels=8, n_ctx=32, d_model=16, n_heads=2, n_layers=4)


@pytest.fixture
def encoder() -> WhisperEncoder:
    torch.manual_seed(0)
    return WhisperEncoder(CONFIG).eval()


@pytest.fixture
def mel() -> torch.Tensor:
    return torch.randn(8, 40, generator=torch.Generator().manual_seed(1))


def make_heads(confident_layers: set[int], layers=(1, 2, 4)) -> ExitHeads:
    """Heads whose confidence is known: certain of the letter 'a' on `confident_layers`,
    uniform (confidence 0) elsewhere."""
    heads = ExitHeads(layers, CONFIG.d_model)
    with torch.no_grad():
        for layer in layers:
            linear = heads.heads[str(layer)][1]
            linear.weight.zero_()
            linear.bias.zero_()
            if layer in confident_layers:
                linear.bias[VOCAB.encode("a")[0]] = 50.0
    return heads.eval()


def count_blocks(encoder: WhisperEncoder) -> list[int]:
    calls = [0] * encoder.n_layers
    for i, block in enumerate(encoder.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def one_hot_logits(ids: list[int]) -> torch.Tensor:
    """Logits (T, vocabulary) that pick `ids`, one per frame, with near certainty."""
    return torch.nn.functional.one_hot(torch.tensor(ids), len(VOCAB)).float() * 20.0


# --------------------------------------------------------------------------- vocabulary and CTC


def test_vocab_normalizes_and_round_trips():
    assert VOCAB.normalize("  Don’t STOP,  now!! 42 ") == "don't stop now"
    assert VOCAB.decode(VOCAB.encode("Turn left, please.")) == "turn left please"
    assert BLANK not in VOCAB.encode("a b")


@pytest.mark.parametrize("symbols", [("a", "<blank>"), ("<blank>", "a", "a"), ()])
def test_vocab_rejects_bad_symbols(symbols):
    with pytest.raises(ValueError, match="blank"):
        CharVocab(symbols)


def test_greedy_ctc_merges_repeats_then_drops_blanks():
    a, space, b = VOCAB.encode("a b")
    path = [BLANK, a, a, BLANK, a, b, b, space, space, BLANK, b]
    assert greedy_ctc(one_hot_logits(path), VOCAB) == "aab b"


def test_greedy_ctc_tidies_spaces():
    a, space, b = VOCAB.encode("a b")
    path = [space, a, space, BLANK, space, b, space]
    assert greedy_ctc(one_hot_logits(path), VOCAB) == "a b"


def test_confidence():
    a = VOCAB.encode("a")[0]
    assert ctc_confidence(one_hot_logits([BLANK] * 5)) == 0.0  # nothing recognized
    assert ctc_confidence(one_hot_logits([BLANK, a, BLANK])) > 0.99
    undecided = torch.zeros(7, len(VOCAB))
    undecided[:, BLANK] = -100.0  # not blank, but uniform over the 28 characters
    assert ctc_confidence(undecided) == pytest.approx(1 - math.log(28) / math.log(29))
    # blank frames do not dilute the confidence of the recognized ones
    assert ctc_confidence(one_hot_logits([a] + [BLANK] * 50)) == pytest.approx(ctc_confidence(one_hot_logits([a])))


# --------------------------------------------------------------------------- policy


@pytest.mark.parametrize(
    ("field", "value"), [("mode", "fastest"), ("threshold", 1.5), ("threshold", -0.1), ("max_layer", 0),
                         ("full_depth_for_known_speakers", "yes")]
)
def test_policy_rejects_bad_values_at_run_time(field, value):
    policy = ExitPolicy()
    with pytest.raises(ValueError, match=field.replace("_", ".")):
        setattr(policy, field, value)
    assert policy == ExitPolicy()  # unchanged


def test_policy_validates_at_construction():
    with pytest.raises(ValueError, match="mode"):
        ExitPolicy(mode="nope")


def test_confidence_mode_exits_at_first_confident_head(encoder, mel):
    calls = count_blocks(encoder)
    with torch.inference_mode():
        result = encode_with_exit(encoder, make_heads({2, 4}), ExitPolicy("confidence", 0.9), mel)
        assert result.layer == 2
        assert calls == [1, 1, 0, 0]  # layers 3 and 4 never ran
        assert result.confidence > 0.9
        assert result.text == "a"  # every frame says 'a': one character after merging
        torch.testing.assert_close(result.features, encoder(mel, max_layer=2).output)


def test_confidence_mode_falls_back_to_the_deepest_head(encoder, mel):
    with torch.inference_mode():
        result = encode_with_exit(encoder, make_heads(set()), ExitPolicy("confidence", 0.5), mel)
    assert result.layer == 4
    assert result.confidence == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("max_layer", "expected"), [(None, 4), (4, 4), (3, 2), (2, 2), (1, 1)])
def test_budget_mode_exits_at_deepest_head_within_budget(encoder, mel, max_layer, expected):
    calls = count_blocks(encoder)
    with torch.inference_mode():
        result = encode_with_exit(encoder, make_heads({1, 2, 4}), ExitPolicy("budget", max_layer=max_layer), mel)
    assert result.layer == expected
    assert calls == [1] * expected + [0] * (4 - expected)


def test_switching_mode_at_run_time(encoder, mel):
    heads, policy = make_heads({1, 2, 4}), ExitPolicy("confidence", 0.9, max_layer=2)
    with torch.inference_mode():
        assert encode_with_exit(encoder, heads, policy, mel).layer == 1
        policy.mode = "budget"
        assert encode_with_exit(encoder, heads, policy, mel).layer == 2
        policy.max_layer = None
        assert encode_with_exit(encoder, heads, policy, mel).layer == 4


def test_known_speakers_run_the_full_depth_unless_a_budget_caps_it(encoder, mel):
    heads, policy = make_heads({1, 2, 4}), ExitPolicy("confidence", 0.9)
    with torch.inference_mode():
        def layer(known: bool) -> int:
            return encode_with_exit(encoder, heads, policy.for_utterance(known_speaker=known), mel).layer

        assert (layer(False), layer(True)) == (1, 4)  # a possible personalization sample: full depth
        policy.full_depth_for_known_speakers = False
        assert layer(True) == 1
        policy.full_depth_for_known_speakers, policy.mode, policy.max_layer = True, "budget", 2
        assert layer(True) == 2


def test_budget_below_every_head(encoder, mel):
    with pytest.raises(ValueError, match="below every exit head"):
        encode_with_exit(encoder, make_heads(set(), layers=(2, 4)), ExitPolicy("budget", max_layer=1), mel)


@pytest.mark.parametrize(
    ("heads", "message"),
    [
        (ExitHeads((1, 5), CONFIG.d_model), "layer 5, the encoder has 4"),
        (ExitHeads((1,), 32), "d_model=32"),
    ],
)
def test_heads_must_fit_the_encoder(encoder, mel, heads, message):
    with pytest.raises(ValueError, match=message):
        encode_with_exit(encoder, heads, ExitPolicy(), mel)


def test_one_utterance_at_a_time(encoder):
    with pytest.raises(ValueError, match="per utterance"):
        encode_with_exit(encoder, make_heads(set()), ExitPolicy(), torch.zeros(2, 8, 40))


@pytest.mark.parametrize("layers", [(), (2, 1), (0, 1), (1, 1)])
def test_heads_reject_bad_layers(layers):
    with pytest.raises(ValueError, match="exit layers"):
        ExitHeads(layers, 16)


# --------------------------------------------------------------------------- heads file


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(3)
    heads = ExitHeads((1, 3), 16)
    save_heads(heads, tmp_path / "heads.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["heads.safetensors"]  # no temporary left behind
    loaded = load_heads(tmp_path / "heads.safetensors")
    assert loaded.layers == (1, 3) and loaded.d_model == 16 and loaded.vocab.symbols == VOCAB.symbols
    hidden = torch.randn(1, 5, 16)
    with torch.inference_mode():
        for layer in (1, 3):
            torch.testing.assert_close(loaded(layer, hidden), heads(layer, hidden))


def test_conv_heads_round_trip_and_count_their_cost(tmp_path):
    torch.manual_seed(4)
    heads = ExitHeads((2, 4), 16, hidden=8, kernel=3)
    save_heads(heads, tmp_path / "conv.safetensors")
    loaded = load_heads(tmp_path / "conv.safetensors")
    assert (loaded.hidden, loaded.kernel) == (8, 3)
    hidden = torch.randn(1, 7, 16)
    with torch.inference_mode():
        out = loaded(4, hidden)
        assert out.shape == (1, 7, len(VOCAB))  # same frames in as out: the conv pads
        torch.testing.assert_close(out, heads(4, hidden))
    assert heads.macs_per_frame() == 16 * 8 * 3 + 8 * len(VOCAB)
    assert ExitHeads((1,), 16).macs_per_frame() == 16 * len(VOCAB)


def test_conv_head_mixes_neighbouring_frames_only():
    torch.manual_seed(5)
    heads = ExitHeads((1,), 16, hidden=8, kernel=3).eval()
    hidden = torch.randn(1, 9, 16)
    changed = hidden.clone()
    changed[0, 4] = torch.randn(16)
    with torch.inference_mode():
        moved = (heads(1, changed) - heads(1, hidden)).abs().sum(-1)[0] > 1e-6
    assert moved.tolist() == [False, False, False, True, True, True, False, False, False]


@pytest.mark.parametrize(("hidden", "kernel"), [(0, 3), (8, 2), (-1, 1)])
def test_heads_reject_bad_conv_shapes(hidden, kernel):
    with pytest.raises(ValueError, match="kernel"):
        ExitHeads((1,), 16, hidden=hidden, kernel=kernel)


def test_load_heads_without_head_metadata_is_linear(tmp_path):
    """Files written before conv heads existed have no "head" metadata: they are linear heads."""
    path = tmp_path / "old.safetensors"
    save_heads(ExitHeads((1,), 16), path)
    with safe_open(str(path), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "head"}
    save_file(load_file(str(path)), str(path), metadata=metadata)
    assert load_heads(path).hidden == 0


def test_load_missing_file(tmp_path):
    with pytest.raises(WeightLoadError, match="not found"):
        load_heads(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_load_corrupt_file(tmp_path, damage):
    path = tmp_path / "heads.safetensors"
    save_heads(ExitHeads((1,), 16), path)
    data = path.read_bytes()
    path.write_bytes(data[:-10] if damage == "truncate" else b"\xff" * 8 + data[8:])
    with pytest.raises(WeightLoadError, match="not a valid safetensors file"):
        load_heads(path)


def test_load_other_safetensors_file(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightLoadError, match="not an exit-heads file"):
        load_heads(tmp_path / "other.safetensors")


def test_load_shape_mismatch_names_the_tensor(tmp_path):
    path = tmp_path / "heads.safetensors"
    save_heads(ExitHeads((1,), 16), path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["heads.1.1.weight"] = torch.zeros(len(VOCAB), 8)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(WeightLoadError, match=r"heads\.1\.1\.weight has shape \[29, 8\], expected \[29, 16\]"):
        load_heads(path)


def test_ctc_batch_helpers_pad_concatenate_and_score():
    from tinyalign_ros.core.early_exit import ctc_loss, ctc_targets, pad_frames

    vocab = CharVocab()
    padded, lengths = pad_frames([torch.ones(3, 2), torch.ones(5, 2)])
    assert padded.shape == (2, 5, 2) and lengths.tolist() == [3, 5] and padded[0, 3:].abs().sum() == 0
    targets, target_lengths = ctc_targets(vocab, ["Ab", "c!"])
    assert targets.tolist() == vocab.encode("ab") + vocab.encode("c") and target_lengths.tolist() == [2, 1]
    # logits that put all mass on the right characters score near 0; uniform ones do not
    logits = torch.full((2, 5, len(vocab)), -20.0)
    for b, ids in enumerate([vocab.encode("ab"), vocab.encode("c")]):
        for t, i in enumerate(ids):
            logits[b, t, i] = 20.0
        logits[b, len(ids):, BLANK] = 20.0
    good = ctc_loss(logits, lengths, targets, target_lengths)
    uniform = ctc_loss(torch.zeros_like(logits), lengths, targets, target_lengths)
    assert good.item() < 1e-3 < uniform.item()
