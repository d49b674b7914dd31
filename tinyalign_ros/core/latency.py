"""Where the time between the operator's end of speech and the robot's answer goes, per utterance.

Each node adds the stages it sees to a `StageTimer` while it works on one utterance and publishes
them as one JSON record (`stage_record`) on `metrics/stages`; `tinyalign bench latency` merges
the records of all nodes by utterance id (`merge_stages`) into its `breakdown`. The stages, in the
order an utterance meets them (seconds; all but the first and last are measured in the nodes):

- `endpointing_s`  asr_node: the Utterance's end (`Utterance.end`, the VAD segment's end) → the VAD
  emitted the segment (it waits `vad.min_silence_ms` of silence, less the end pad, plus one chunk)
- `asr_queue_s`    asr_node: emitted → its worker took it (an earlier utterance still being transcribed)
- `encoder_s`      asr_node: our PyTorch Whisper encoder with early exits (and hint fusion)
- `asr_s`          asr_node: the transcript (faster-whisper, or a speaker's ASR adapter)
- `asr_other_s`    asr_node: the rest of the worker's time (speaker ID, the message)
- `to_assistant_s` assistant_node: Utterance published → its worker took it (DDS, queue)
- `pre_llm_s`      assistant_node: worker start → the chat LLM starts (skill-call parsing, aligned
  transcript; when no LLM answer is generated: → the first text piece)
- `llm_prefill_s`  assistant_node: the LLM's prompt pass (until the first token's logits)
- `llm_first_text_s` assistant_node: first logits → the first text piece out of the streamer
- `tts_first_audio_s` tts_node: the answer's first token → its first audio sample (waiting for the
  first sentence or clause to be complete, synthesis, the player)

No rclpy here: the nodes wire it to topics.
"""
from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

STAGES_TOPIC = "metrics/stages"  # std_msgs/String, one `stage_record` per utterance and node
STAGES = ("endpointing_s", "asr_queue_s", "encoder_s", "asr_s", "asr_other_s", "to_assistant_s", "pre_llm_s",
          "llm_prefill_s", "llm_first_text_s", "tts_first_audio_s")


class StageTimer:
    """Seconds per stage of the item the *calling thread* is working on.

    `begin()` starts a record for this thread, `wrap(stage, fn)` returns `fn` timed into the
    stage of whichever thread calls it (nothing is recorded in a thread that has not begun),
    `take()` ends the record and returns it. Threads never see each other's records, so one timer
    can wrap objects that several threads use.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def begin(self) -> None:
        self._local.stages = {}
        self._local.marks = {}

    def mark(self, name: str) -> None:
        """Remember when `name` first happened in this thread's item (perf_counter seconds)."""
        marks = getattr(self._local, "marks", None)
        if marks is not None and name not in marks:
            marks[name] = time.perf_counter()

    def marked(self, name: str) -> float | None:
        return (getattr(self._local, "marks", None) or {}).get(name)

    def add(self, stage: str, seconds: float) -> None:
        stages = getattr(self._local, "stages", None)
        if stages is not None:
            stages[stage] = stages.get(stage, 0.0) + float(seconds)

    def get(self, stage: str, default: float = 0.0) -> float:
        return (getattr(self._local, "stages", None) or {}).get(stage, default)

    def wrap(self, stage: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(stage, time.perf_counter() - started)
        return timed

    def take(self) -> dict[str, float]:
        stages = getattr(self._local, "stages", None) or {}
        self._local.stages = self._local.marks = None
        return stages


def stage_record(utterance_id: str, node: str, stages: dict[str, float]) -> str:
    """The JSON a node publishes on `metrics/stages` for one utterance (seconds rounded to 0.1 ms)."""
    return json.dumps({"utterance_id": utterance_id, "node": node,
                       "stages": {k: round(float(v), 4) for k, v in stages.items()}})


def merge_stages(records: Iterable[str | dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{utterance_id: {stage: seconds}} from the records of every node (malformed ones skipped)."""
    merged: dict[str, dict[str, float]] = {}
    for record in records:
        try:
            data = json.loads(record) if isinstance(record, str) else record
            stages = {str(k): float(v) for k, v in data["stages"].items()}
            merged.setdefault(str(data["utterance_id"]), {}).update(stages)
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return merged
