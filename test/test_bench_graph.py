"""The graph-level benchmark driver (latency, soak) on a short real run."""
from __future__ import annotations

import time

from tinyalign_ros.bench._graph import p50_p95, run_graph


def test_run_graph_loops_the_file_and_samples_memory(demo_file):
    path, segments = demo_file
    # skill calls off: every answer comes from the chat LLM, so its stages are reported whatever the
    # echo gate cuts (with them on, the question is often muted while the robot confirms the first
    # request, and a fragment like "from the kitchen." can be a skill call: no chat answer at all)
    run = run_graph(path, stop_after_responses=len(segments) + 1, sample_every_s=1.0, log=lambda _: None,
                    overrides={"assistant_node": {"commands.enabled": False}})
    assert len(run.responses) >= len(segments) + 1  # the file looped at least once
    assert run.rss and all(mb > 100 for _, mb in run.rss)  # the models are resident
    # the weights are mapped from disk
    assert len(run.memory) == len(run.rss) and all(m["rss_file"] > 100 for _, m in run.memory)
    assert all(m["rss_anon"] + m["rss_file"] <= m["rss"] + 1 for _, m in run.memory)
    assert run.dropped == 0
    responses = [r for _, r in run.responses if r.text]
    assert len(run.spoken_s) >= len(responses) - 1  # every answer was spoken (the last may not have started)
    # the voice starts after the first token (and after synthesizing the first sentence), and no
    # delay is longer than the whole run (a clock mix-up would be; speed is `bench latency`'s job)
    first_tokens = sorted(r.latency_first_token_s for r in responses)
    assert min(run.spoken_s) > first_tokens[0] and max(run.spoken_s) < time.monotonic() - run.started
    # every node reported its stages of each answered utterance (metrics/stages), and the utterances'
    # padded ends lie just after the sentences' true ends (the VAD's end pad, 200 ms, give or take a window)
    from tinyalign_ros.bench.latency import breakdown, speech_end_offsets

    stages = breakdown(run, responses, set())
    assert {"endpointing_s", "asr_queue_s", "encoder_s", "asr_s", "to_assistant_s", "pre_llm_s", "llm_prefill_s",
            "tts_first_audio_s"} <= set(stages)
    assert all(v["p50"] >= 0 for k, v in stages.items() if k != "endpointing_s")
    offsets = speech_end_offsets(run, segments)
    assert offsets and all(0.0 <= v <= 0.5 for v in offsets.values())


def test_soak_growth_is_the_slope_after_the_warmup():
    from tinyalign_ros.bench.soak import growth_per_min

    warm_then_flat = [(t, 500.0 + (300.0 if t >= 60 else 5.0 * t)) for t in range(0, 600, 5)]
    assert growth_per_min(warm_then_flat) == 0.0
    creeping = [(t, 800.0 + 2.0 * t / 60) for t in range(0, 600, 5)]
    assert growth_per_min(creeping) == 2.0
    assert growth_per_min([(0.0, 1.0), (5.0, 1.0)]) is None


def test_percentiles():
    assert p50_p95([1.0, 2.0, 3.0]) == {"p50": 2.0, "p95": 2.9}
    assert p50_p95([]) == {"p50": None, "p95": None}
