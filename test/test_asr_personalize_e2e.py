"""[8] as a user meets it: the robot mishears a voice, learns it, and then hears it better.

asr_node + personalizer_node over real rclpy with the real models. A voice the base Whisper
transcribes badly (slow, low, shaking speech in a noisy room: faster-whisper's WER 0.51 on the
enrollment sentences, 0.51 on the test ones) enrolls with `tinyalign enroll`'s client (one prompt,
one utterance), `tinyalign personalize --wait`'s client trains that speaker's ASR adapter (the
default recipe: LoRA in the top 2 encoder blocks, 6 passes over the 24 training utterances), the gate
(its defaults, on 8 held-out utterances) keeps it only if the held-out WER drops,
personalizer_node announces it, asr_node swaps it in, and the same test sentences spoken again
come out with a lower WER than before the round, judged against what the base model heard on the
same audio (never a fixed string).

History (2026-12-05): without the room noise the voice was too easy on these short sentences
(held-out WER 0.15 before the round), and with 24 enrollment sentences (5-6 held out) the gate
could not tell a gain from luck: it refused 3 of 4 rounds. With the noise, 24 sentences passed 3
of 4 runs (the fourth: held-out WER 0.226 -> 0.097 on 5 utterances, P(better) 0.68 < 0.75); with
32 sentences, 8 held out, 4 of 4 runs passed (a fifth lost a test utterance when all 6 were
published at once; `hear` now says them one at a time).

The robot has one operator (asr_node `speaker: gruff`): speaker recognition is not what this test
checks. With recognition on (the default GE2E voiceprint, enrolled by the same prompts) one run
named 4 of the 6 test utterances of this distorted voice `gruff` and left 2 to the unknown speaker,
who gets the base model (the safe side).
"""
from __future__ import annotations

import threading

import pytest

from conftest import enrollment_graph, wait_for
from tinyalign_ros.core.corpus import Voice, synthesize
from tinyalign_ros.core.metrics import wer
from tinyalign_ros.msg import Utterance

VOICE = Voice("gruff", "espeak", "en-gb+m4", pitch=-5.0, rate=0.8, degradations=("slow", "tremolo", "noise"))
ENROLL = ["Go to the kitchen and wait there.", "Bring me a glass of water, please.",
          "Turn on the lights in the living room.", "Follow me to the garage.", "Stop right now.",
          "What can you do for me today?", "Fetch the red cup from the table.", "Go back to the charging dock.",
          "Switch off the lamp in the bedroom.", "Open the door to the garden.", "Bring the blue towel to the bathroom.",
          "Turn left and move forward slowly.", "Come here and wait for me.", "Take this plate to the kitchen.",
          "Find my keys in the hallway.", "Close the window in the office.", "Go to the front door and wait.",
          "Bring the green bottle to the office.", "Turn on the fan in the bedroom.", "Put the book on the shelf.",
          "Move forward two meters.", "Turn right at the end of the hallway.", "Switch on the lights in the garage.",
          "Pick up the toy from the floor.", "Bring my phone to the bedroom.", "Go to the kitchen and turn on the light.",
          "Stop and wait for me here.", "Take the cup back to the table.", "Turn off the radio in the office.",
          "Follow me into the garden.", "Bring the yellow box to the garage.", "Go to the hallway and close the door."]
TEST = ["Bring me the red cup from the kitchen.", "Turn off the lights in the bedroom.",
        "Go to the garden and wait for me.", "Fetch a glass of water from the table.",
        "Follow me to the living room.", "Open the window in the hallway."]


@pytest.fixture
def graph(ros, tmp_path):
    return enrollment_graph(
        ros, tmp_path, {"max_pending_utterances": 64, "speaker": "gruff"},
        {"train.kind": "asr", "train.min_samples": 8, "train.budget_s": 240.0, "train.min_held_out": 8,
         "train.threads": 2})


def test_an_enrolled_voice_is_heard_better_after_a_personalization_round(graph):
    from tinyalign_ros.nodes.client import enroll, personalize

    asr, pers, say, utterances = graph
    lines: list[str] = []

    def state() -> dict:
        return {"client": lines[-3:], "pending": asr.speaker_id.pending, "published": asr.published,
                "queue": asr.worker.depth, "samples": pers.samples.count("gruff") if pers.consented else 0,
                "last": [(u.transcript, u.speaker) for u in utterances[-3:]]}

    def hear(texts: list[str], voice: Voice) -> list[Utterance]:
        # one at a time, as a person speaks: a burst of 6 slow sentences (~30 s of audio) published at
        # once can overflow the audio subscription's queue of 100 chunks when asr_node is busy
        n = len(utterances)
        for i, text in enumerate(texts, 1):
            say(synthesize(text, voice))
            wait_for(lambda: len(utterances) >= n + i, 60, f"test utterance {i}", state)
        return utterances[n:n + len(texts)]

    # enrollment: one prompt, one utterance; the voice and the prompts' sentences become samples
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(enroll("gruff", ENROLL, utterance_timeout=90,
                                                                  emit=lines.append)))
    worker.start()
    for i, text in enumerate(ENROLL, 1):
        wait_for(lambda: sum("please say:" in line for line in lines) == i and asr.speaker_id.pending == "gruff",
                 60, f"enrollment prompt {i}", state)
        say(synthesize(text, VOICE))
        wait_for(lambda: sum("heard:" in line for line in lines) == i, 90, f"enrollment utterance {i}", state)
    worker.join(timeout=60)
    assert result == [0], lines
    wait_for(lambda: pers.samples.count("gruff") == len(ENROLL), 20, "the enrollment samples", state)
    assert all(info.audio_s > 0.5 for info in pers.samples.list("gruff"))

    before = hear(TEST, VOICE)
    assert all(u.speaker == "gruff" for u in before), [(u.transcript, u.speaker) for u in before]
    wer_before = wer(TEST, [u.transcript for u in before])
    assert wer_before > 0.15, f"the base model already hears this voice well ({wer_before:.2f}): no test"

    progress: list[str] = []
    assert personalize("gruff", 240.0, wait=True, timeout=30, wait_timeout=600, emit=progress.append) == 0, progress[-3:]
    assert any("saved" in line for line in progress), progress[-3:]
    wait_for(lambda: "gruff" in asr.recognizer.adapted_speakers, 60, "asr_node to load the adapter", state)

    after = hear(TEST, VOICE)
    assert all(u.speaker == "gruff" for u in after)
    wer_after = wer(TEST, [u.transcript for u in after])
    assert wer_after < wer_before, (wer_before, wer_after, [u.transcript for u in after])
    assert asr.last_source.startswith("adapter v")
