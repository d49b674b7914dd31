"""assistant_node: /tinyalign/utterance → frozen LLM → /tinyalign/response (+ token stream).

Mode `cascade` (the baseline): the transcript is the user message. The Tiny-Align `aligned`
mode (projected encoder features instead of text) plugs in here.
"""
from __future__ import annotations

import time

import rclpy
from rclpy.node import Node

from tinyalign_ros.core.llm import DEFAULT_SYSTEM_PROMPT, ChatLLM
from tinyalign_ros.core.models import resolve_llm
from tinyalign_ros.msg import Response, ResponseToken, Utterance

from .common import EVENT_QOS, Worker, from_time_msg

MODES = ("cascade",)


class AssistantNode(Node):
    """Answers each utterance in a worker thread, streaming tokens as they are generated.

    Latency is measured from the wall-clock end of speech carried by the Utterance, so it
    includes VAD end-pointing, transcription and queueing: what the operator experiences.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__("assistant_node", **kwargs)
        p = self.declare_parameter
        self.mode = p("mode", "cascade").value
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got '{self.mode}'")
        self.min_confidence = float(p("min_confidence", 0.0).value)
        max_pending = int(p("max_pending_utterances", 4).value)
        model_dir = resolve_llm(p("llm.model", "").value)
        self.llm = ChatLLM(
            model_dir,
            system_prompt=p("llm.system_prompt", DEFAULT_SYSTEM_PROMPT).value,
            max_new_tokens=int(p("llm.max_new_tokens", 48).value),
            threads=int(p("llm.threads", 2).value),
        )
        self.response_pub = self.create_publisher(Response, "response", EVENT_QOS)
        self.token_pub = self.create_publisher(ResponseToken, "response_tokens", EVENT_QOS)
        self.worker: Worker[Utterance] = Worker("assistant-llm", self._answer, max_pending,
                                                self._on_drop, self._on_error)
        self.create_subscription(Utterance, "utterance", self.worker.put, EVENT_QOS)
        self.answered = 0
        self.handled = 0  # answered + dropped + failed: lets a runner know every utterance is done
        self.get_logger().info(f"ready ({self.mode} mode, LLM {model_dir})")

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _publish_token(self, utt: Utterance, index: int, text: str, final: bool) -> None:
        tok = ResponseToken(utterance_id=utt.id, index=index, text=text, final=final)
        tok.header.stamp = self.get_clock().now().to_msg()
        self.token_pub.publish(tok)

    def _answer(self, utt: Utterance) -> None:
        end_of_speech = from_time_msg(utt.end)
        response = Response(utterance_id=utt.id, speaker=utt.speaker, transcript=utt.transcript, mode=self.mode)
        pieces: list[str] = []
        if utt.transcript.strip() and utt.confidence >= self.min_confidence:
            first = None
            for piece in self.llm.stream(utt.transcript):
                if first is None:
                    first = self._now()
                self._publish_token(utt, len(pieces), piece, final=False)
                pieces.append(piece)
            last = self._now()
            response.latency_first_token_s = float((first or last) - end_of_speech)
            response.latency_last_token_s = float(last - end_of_speech)
        else:
            self.get_logger().info(f"{utt.id}: nothing to answer (transcript '{utt.transcript}', "
                                   f"confidence {utt.confidence:.2f})")
        self._publish_token(utt, len(pieces), "", final=True)
        response.text = "".join(pieces).strip()
        response.header.stamp = self.get_clock().now().to_msg()
        self.response_pub.publish(response)
        self.answered += 1
        self.handled += 1
        self.get_logger().info(f"{utt.id}: '{response.text}' (first token after "
                               f"{response.latency_first_token_s:.2f} s)")

    def _on_drop(self, utt: Utterance) -> None:
        self.handled += 1
        self.get_logger().warning(f"LLM busy: dropped utterance {utt.id} '{utt.transcript}'")

    def _on_error(self, utt: Utterance, exc: BaseException) -> None:
        self.handled += 1
        self.get_logger().error(f"answering {utt.id} failed: {exc!r}")

    @property
    def idle(self) -> bool:
        return self.worker.idle

    def destroy_node(self) -> None:
        if hasattr(self, "worker"):  # absent when the constructor failed
            self.worker.stop()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    rclpy.init(args=args)
    node = AssistantNode()
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
