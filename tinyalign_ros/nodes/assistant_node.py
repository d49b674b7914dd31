"""assistant_node: /tinyalign/utterance → frozen LLM → /tinyalign/response (+ token stream).

Mode `cascade` (the baseline): the ASR transcript is the user message.
Mode `aligned` (Tiny-Align): the utterance's encoder features go through the projector into the
same frozen LLM as input embeddings. A projector trained with the *hybrid* prompt (its metadata
says `prompt: hybrid`) is also given the ASR transcript next to the audio tokens; an audio-only
projector never sees text. `aligned.task` says what it does:
- `answer`: the aligned LLM writes down what was said (the "repeat" task the projector is
  trained on), and the chat LLM answers that; Response.transcript is the aligned transcript;
- `repeat`: the aligned transcript itself is the response (to watch the ASR-LLM at work);
- `direct`: the audio tokens go straight into the robot's chat prompt and the answer streams
  from them (the projector was not trained for this task: expect weaker answers).
Features of another width or encoder layer than the projector's are refused with a logged
error (the utterance gets an empty response), never a crash.
"""
from __future__ import annotations


import torch
from rclpy.node import Node

from tinyalign_ros.core.llm import DEFAULT_SYSTEM_PROMPT, ChatLLM
from tinyalign_ros.core.models import resolve_llm, shipped_model
from tinyalign_ros.msg import Response, ResponseToken, Utterance

from .common import EVENT_QOS, Worker, from_time_msg, run_node

MODES = ("cascade", "aligned")
ALIGNED_TASKS = ("answer", "repeat", "direct")


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
        # declared in every mode, so the YAML documents one fixed set of parameters
        self.task = p("aligned.task", "answer").value
        self.inject = bool(p("aligned.inject_instruction", True).value)
        self.projector_file = p("projector.file", "").value or str(shipped_model("projector.safetensors"))
        self.aligned = None
        if self.mode == "aligned":
            self._setup_aligned()
        self.response_pub = self.create_publisher(Response, "response", EVENT_QOS)
        self.token_pub = self.create_publisher(ResponseToken, "response_tokens", EVENT_QOS)
        self.worker: Worker[Utterance] = Worker("assistant-llm", self._answer, max_pending,
                                                self._on_drop, self._on_error)
        self.create_subscription(Utterance, "utterance", self.worker.put, EVENT_QOS)
        self.answered = 0
        self.handled = 0  # answered + dropped + failed: lets a runner know every utterance is done
        self.get_logger().info(f"ready ({self.mode} mode, LLM {model_dir}"
                               + (f", projector {self.projector_file})" if self.aligned else ")"))

    def _setup_aligned(self) -> None:
        from tinyalign_ros.core.align import AlignedLLM, AlignPrompt
        from tinyalign_ros.core.projector import load_projector, read_projector_metadata

        if self.task not in ALIGNED_TASKS:
            raise ValueError(f"aligned.task must be one of {ALIGNED_TASKS}, got '{self.task}'")
        inject = self.inject
        hidden = self.llm.model.get_input_embeddings().embedding_dim
        projector = load_projector(self.projector_file, out_dim=hidden)  # ProjectorLoadError says why
        hybrid = read_projector_metadata(self.projector_file).get("prompt") == "hybrid"
        self.aligned = AlignedLLM.from_chat(self.llm, projector, AlignPrompt(inject=inject, transcript=hybrid),
                                            max_new_tokens=self.llm.max_new_tokens)
        # `direct`: the audio stands where the operator's words would be, under the robot's prompt
        self.direct_prompt = AlignPrompt(system=self.llm.system_prompt, instruction="The operator says:",
                                         prompt="Answer the operator.", inject=inject, transcript=hybrid)

    def _features(self, utt: Utterance) -> torch.Tensor | None:
        """The utterance's features as (frames, dim), or None (logged) when they do not fit the projector."""
        cfg = self.aligned.projector.cfg
        problem = None
        if utt.feature_layer < 0 or utt.feature_frames == 0:
            problem = "carries no encoder features (is asr_node's encoder enabled?)"
        elif utt.feature_dim != cfg.in_dim:
            problem = f"has {utt.feature_dim}-dim features, the projector takes {cfg.in_dim}"
        elif utt.feature_layer != cfg.encoder_layer:
            problem = (f"has features of encoder layer {utt.feature_layer}, the projector was trained on layer "
                       f"{cfg.encoder_layer} (set asr_node's exit policy so it runs to that layer)")
        elif len(utt.features) != utt.feature_frames * utt.feature_dim:
            problem = f"has {len(utt.features)} feature values, not {utt.feature_frames} x {utt.feature_dim}"
        if problem:
            self.get_logger().error(f"{utt.id} {problem}: not answered")
            return None
        return torch.as_tensor(utt.features, dtype=torch.float32).reshape(utt.feature_frames, utt.feature_dim)

    def _aligned_stream(self, utt: Utterance, response: Response):
        """Text pieces of the aligned answer (an empty iterator when the features are refused)."""
        feats = self._features(utt)
        if feats is None:
            return iter(())
        if self.task == "direct":
            return self.aligned.stream(feats, self.direct_prompt, utt.transcript)
        heard = "".join(self.aligned.stream(feats, transcript=utt.transcript)).strip()
        response.transcript = heard
        self.get_logger().info(f"{utt.id}: aligned transcript '{heard}' (ASR: '{utt.transcript}')")
        if self.task == "repeat" or not heard:
            return iter([heard] if heard else [])
        return self.llm.stream(heard)

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
        if self.mode == "aligned":
            stream = self._aligned_stream(utt, response)
        elif utt.transcript.strip() and utt.confidence >= self.min_confidence:
            stream = self.llm.stream(utt.transcript)
        else:
            stream = None
        if stream is not None:
            first = None
            for piece in stream:
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
    run_node(AssistantNode, args)


if __name__ == "__main__":
    main()
