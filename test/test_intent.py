"""Command-intent scorer: same decision for the same words, labels from the nearest centroid."""
import pytest

from tinyalign_ros.core.intent import NO_INTENT, IntentMatcher

EXAMPLES = [("turn left", "turn_left"), ("please turn to the left", "turn_left"), ("turn right", "turn_right"),
            ("switch the lights on", "lights_on"), ("turn the lights off", "lights_off"),
            ("what is the capital of France?", NO_INTENT), ("how do I bake bread?", NO_INTENT)]


@pytest.fixture
def matcher():
    return IntentMatcher(EXAMPLES)


def test_paraphrases_and_asr_noise_map_to_the_command(matcher):
    assert matcher("could you turn left a bit") == "turn_left"
    assert matcher("Lights on, please!") == "lights_on"
    assert matcher("how do I bake a cake") == NO_INTENT
    assert matcher("") == NO_INTENT


def test_accuracy_and_agreement_count_only_commands(matcher):
    hyps = ["turn right", "lights on", "blah"]
    refs = ["turn left", "switch the lights on", "what is the capital of Spain"]
    intents = ["turn_left", "lights_on", NO_INTENT]
    assert matcher.accuracy(hyps, intents) == 0.5
    assert matcher.agreement(hyps, refs, intents) == 0.5
    assert matcher.accuracy(["x"], [NO_INTENT]) is None


def test_no_examples_is_an_error():
    with pytest.raises(ValueError, match="at least one example"):
        IntentMatcher([("", "x")])
