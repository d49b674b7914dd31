"""The graph-level benchmark driver (latency, soak) on a short real run."""
from __future__ import annotations

from tinyalign_ros.bench._graph import p50_p95, run_graph
from tinyalign_ros.bench.latency import first_audio_latencies
from tinyalign_ros.msg import Response
from tinyalign_ros.nodes.common import to_time_msg


def test_run_graph_loops_the_file_and_samples_memory(demo_file):
    path, segments = demo_file
    run = run_graph(path, stop_after_responses=len(segments) + 1, sample_every_s=1.0, log=lambda _: None)
    assert len(run.responses) >= len(segments) + 1  # the file looped at least once
    assert run.rss and all(mb > 100 for _, mb in run.rss)  # the models are resident
    assert run.dropped == 0
    responses = [r for _, r in run.responses if r.text]
    spoken = first_audio_latencies(responses, run.speech_audio)
    assert None not in spoken[:-1]  # every answer was spoken (the last one may not have started yet)
    # the voice starts after the first token (and after synthesizing the first sentence)
    assert all(a > r.latency_first_token_s and a < 10.0 for a, r in zip(spoken, responses) if a is not None)


def response(stamp: float, first: float, last: float) -> Response:
    msg = Response(latency_first_token_s=first, latency_last_token_s=last)
    msg.header.stamp = to_time_msg(stamp)
    return msg


def test_first_audio_is_the_first_played_block_after_the_first_token():
    # end of speech at 100 s and 110 s; first tokens at 100.8 and 110.9; audio blocks of 50 ms
    responses = [response(102.0, 0.8, 2.0), response(112.5, 0.9, 2.5), response(130.0, 0.5, 1.0)]
    blocks = [101.3 + 0.05 * i for i in range(40)] + [111.6 + 0.05 * i for i in range(20)]
    latencies = first_audio_latencies(responses, blocks[::-1])
    assert [round(x, 3) for x in latencies[:2]] == [1.3, 1.6] and latencies[2] is None  # the third: not spoken
    # an answer that was never spoken does not borrow the next answer's audio
    assert first_audio_latencies(responses[:2], [111.6])[0] is None


def test_percentiles():
    assert p50_p95([1.0, 2.0, 3.0]) == {"p50": 2.0, "p95": 2.9}
    assert p50_p95([]) == {"p50": None, "p95": None}
