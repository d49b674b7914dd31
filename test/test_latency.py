"""core/latency.py: per-thread stage timers and the records nodes publish on metrics/stages."""
from __future__ import annotations

import json
import threading

from tinyalign_ros.core.latency import STAGES, StageTimer, merge_stages, stage_record


def test_wrapped_calls_add_up_in_the_calling_threads_record_only():
    timer = StageTimer()
    work = timer.wrap("asr_s", lambda x: x * 2)
    assert work(3) == 6  # no record begun: the call still works, nothing is kept
    timer.begin()
    work(1)
    work(2)
    other: dict = {}

    def elsewhere():
        timer.begin()
        work(5)
        other.update(timer.take())

    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()
    mine = timer.take()
    assert set(mine) == {"asr_s"} and mine["asr_s"] >= 0
    assert set(other) == {"asr_s"}
    assert timer.take() == {}  # taken: the next item starts empty


def test_a_wrapped_call_that_raises_is_timed_and_still_raises():
    timer = StageTimer()
    timer.begin()

    def boom():
        raise RuntimeError("no")

    try:
        timer.wrap("encoder_s", boom)()
    except RuntimeError:
        pass
    assert "encoder_s" in timer.take()


def test_marks_keep_the_first_time_only():
    timer = StageTimer()
    timer.mark("x")  # not begun: ignored
    timer.begin()
    assert timer.marked("x") is None
    timer.mark("x")
    first = timer.marked("x")
    timer.mark("x")
    assert timer.marked("x") == first
    timer.take()
    assert timer.marked("x") is None


def test_records_of_several_nodes_merge_by_utterance():
    records = [stage_record("u1", "asr_node", {"endpointing_s": 0.31234567, "asr_s": 0.2}),
               stage_record("u1", "assistant_node", {"llm_prefill_s": 0.1}),
               stage_record("u2", "asr_node", {"asr_s": 0.3}),
               "not json", json.dumps({"utterance_id": "u3"})]
    merged = merge_stages(records)
    assert merged == {"u1": {"endpointing_s": 0.3123, "asr_s": 0.2, "llm_prefill_s": 0.1}, "u2": {"asr_s": 0.3}}
    assert len(set(STAGES)) == len(STAGES)
