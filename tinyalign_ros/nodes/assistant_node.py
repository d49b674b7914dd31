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
Features of another width than the projector's, of an impossible shape or with NaN/Inf values
(core.projector.check_features) are refused with a logged error (the utterance gets an empty
response), never a crash. Features of another encoder *layer* are asr_node's early exit at work
(the input was easy, or the robot busy): that utterance is answered from its transcript, as in
cascade mode, and its Response says `mode: cascade`.

For people watching: a latched rviz text Marker of the last answer (`response_marker`) and the
latencies of each answer as Float32 topics for rqt_plot (`metrics/latency_first_token_s`,
`metrics/latency_last_token_s`).

Per-speaker adapters (personalizer_node): the latched `adapter` topic carries the table of every
speaker's current adapter. Each new or changed one is loaded and merged into a copy of the base
projector *in the subscription callback*, and the finished {speaker: projector} dict replaces the
old one in a single reference assignment; the worker picks the utterance speaker's projector (the
base one for unknown speakers) before it starts on an utterance, so a swap happens between
utterances and never drops or splits one. An adapter made for another base projector, or one that
fails its checksum, is refused with a logged error and the speaker keeps what it had.
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from rclpy.node import Node
from std_msgs.msg import Float32, String
from visualization_msgs.msg import Marker

from tinyalign_ros.core.align import DEFAULT_MAX_CHANGE
from tinyalign_ros.core.llm import (DEFAULT_NO_REPEAT_NGRAM, DEFAULT_REPETITION_PENALTY, DEFAULT_SYSTEM_PROMPT, ChatLLM,
                                   PromptTooLong)
from tinyalign_ros.core.models import resolve_llm, shipped_model
from tinyalign_ros.core.projector import FeatureMismatch, LayerMismatch, check_features
from tinyalign_ros.msg import Command, Response, ResponseToken, Utterance

from .common import (DROPPED_TOPIC, EVENT_QOS, LATCHED_QOS, Worker, adapter_table, drop_record, from_time_msg,
                     plausible_latency, run_node, text_marker)
from .diagnostics import OK, WARN, Status, Updater

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
            no_repeat_ngram=int(p("llm.no_repeat_ngram", DEFAULT_NO_REPEAT_NGRAM).value),
            repetition_penalty=float(p("llm.repetition_penalty", DEFAULT_REPETITION_PENALTY).value),
            cache_system_prompt=bool(p("llm.cache_system_prompt", True).value),
            dtype=p("llm.dtype", "float32").value,
        )
        # declared in every mode, so the YAML documents one fixed set of parameters
        self.task = p("aligned.task", "answer").value
        self.inject = bool(p("aligned.inject_instruction", True).value)
        self.max_change = float(p("aligned.max_change", DEFAULT_MAX_CHANGE).value)
        self.projector_file = p("projector.file", "").value or str(shipped_model("projector.safetensors"))
        self.aligned = None
        if self.mode == "aligned":
            self._setup_aligned()
        self.response_pub = self.create_publisher(Response, "response", EVENT_QOS)
        self.token_pub = self.create_publisher(ResponseToken, "response_tokens", EVENT_QOS)
        # rviz and rqt_plot views of the same answers (Response carries them too, but rqt_plot
        # draws plain Float32 topics most readily and rviz needs a Marker)
        self.marker_frame = p("marker_frame", "base_link").value
        self.marker_pub = self.create_publisher(Marker, "response_marker", LATCHED_QOS)
        self.first_token_pub = self.create_publisher(Float32, "metrics/latency_first_token_s", EVENT_QOS)
        self.last_token_pub = self.create_publisher(Float32, "metrics/latency_last_token_s", EVENT_QOS)
        # every utterance that gets no Response (queue full, failure) is announced (common.drop_record)
        self.dropped_pub = self.create_publisher(String, DROPPED_TOPIC, EVENT_QOS)
        self.worker: Worker[Utterance] = Worker("assistant-llm", self._timed_answer, max_pending,
                                                self._on_drop, self._on_error)
        self._setup_stages()
        self._setup_commands()
        self.create_subscription(Utterance, "utterance", self._on_utterance, EVENT_QOS)
        self.answered = 0
        self.handled = 0  # answered + dropped + failed: lets a runner know every utterance is done
        self.dropped = 0
        self.early_exits = 0  # aligned mode: utterances answered from the transcript (features of an early exit)
        self.last_latency_s = float("nan")  # end of speech -> last token of the last answer
        self._setup_adapters()
        Updater(self).add("assistant", self._diagnose)
        self.get_logger().info(f"ready ({self.mode} mode, LLM {model_dir}"
                               + (f", projector {self.projector_file})" if self.aligned else ")"))

    def _setup_commands(self) -> None:
        """Skill calls (core/commands.py): every answered utterance -> at most one Command on `command`."""
        from collections import OrderedDict

        from tinyalign_ros.core.commands import SkillSet, default_skills_file

        p = self.declare_parameter
        self.skills_file = p("commands.skills_file", "").value or str(default_skills_file())
        self.command_min_confidence = float(p("commands.min_confidence", 0.5).value)
        method = p("commands.method", "choice").value
        require_cue = bool(p("commands.require_cue", True).value)
        probe_file = p("commands.probe_file", "").value
        self.command_text = p("commands.text", "transcript").value
        if self.command_text not in ("transcript", "aligned"):
            raise ValueError(f"commands.text must be 'transcript' or 'aligned', got '{self.command_text}'")
        self.skills = SkillSet.load(self.skills_file)  # SkillsError (a ValueError) says what is wrong, at start-up
        self.command_parser, self.probe_file = None, ""
        if bool(p("commands.enabled", True).value):
            self.command_parser = self._command_parser(probe_file, method=method, require_cue=require_cue)
        self.command_pub = self.create_publisher(Command, "command", EVENT_QOS)
        self.commands_published = 0
        self._fast_calls: OrderedDict = OrderedDict()  # utterance id -> call already published by the callback

    def _command_parser(self, probe_file: str, **options):
        """The command parser with the skill probe (core/skill_probe.py), or without it: with
        `commands.probe_file` "off", or when the parser refuses a probe fit for other skills or
        another LLM (logged: it then runs on its cue rules alone; retrain with `tinyalign train
        skills`). A probe file that cannot be read is an error at start-up."""
        from tinyalign_ros.core.commands import CommandParser
        from tinyalign_ros.core.skill_probe import SkillProbe, SkillProbeError, probe_path

        make = partial(CommandParser, self.skills, self.llm.model, self.llm.tokenizer, **options)
        path = probe_path(probe_file)
        if path == "off":
            return make()
        probe = SkillProbe.load(path)  # SkillProbeError (a ValueError) at start-up
        try:
            parser = make(probe=probe)
        except SkillProbeError as e:
            self.get_logger().warning(f"skill probe not used: {e}")
            return make()
        self.probe_file = path
        return parser

    def _on_utterance(self, utt: Utterance) -> None:
        """The subscription callback: a stop (a skill's `phrases`) is published here, before the bounded
        queue, so it never waits for the LLM and is never dropped; the spoken answer follows via the worker."""
        from .common import remember

        if self.command_parser is not None:
            call = self.skills.fast_call(utt.transcript)  # stop: never behind the queue
            if call is not None:
                self._publish_command(utt, call, self.mode)
                remember(self._fast_calls, utt.id, call, 64)
        self.worker.put(utt)

    def _publish_command(self, utt: Utterance, call, mode: str) -> bool:
        """Publish `call` as a Command; True when it is sure enough to act on."""
        sure = call.confidence >= self.command_min_confidence
        cmd = Command(utterance_id=utt.id, speaker=utt.speaker, skill=call.skill, arguments=call.arguments_json(),
                      confidence=float(call.confidence), sure=sure, text=call.text, via=call.via, mode=mode)
        cmd.header.stamp = self.get_clock().now().to_msg()
        latency = self._now() - from_time_msg(utt.end)
        cmd.latency_s = float(latency) if plausible_latency(latency) else float("nan")
        self.command_pub.publish(cmd)
        self.commands_published += 1
        self.get_logger().info(f"{utt.id}: command {call.skill} {call.arguments_json()} (confidence "
                               f"{call.confidence:.2f}, {call.via}, {call.seconds * 1000:.0f} ms)")
        return sure

    def _command_stream(self, utt: Utterance, response: Response, stream: Iterator[str] | None,
                        text: str | None = None) -> Iterator[str] | None:
        """The spoken answer once the text (default: the response's transcript) is mapped to a skill
        call: the skill's confirmation when sure, a question back when not, the chat answer
        (`stream`) when it asks for no skill."""
        fast = self._fast_calls.pop(utt.id, None)
        if fast is not None:  # published by the callback already
            return iter([self.skills.confirmation(fast)])
        if self.command_parser is None or stream is None:
            return stream
        if response.mode == "aligned" and self.task == "repeat":  # a transcription view: the transcript is the answer
            return stream
        call = self.command_parser.parse(response.transcript if text is None else text)
        sure = self._publish_command(utt, call, response.mode)
        if call.is_none:
            return stream
        return iter([self.skills.confirmation(call) if sure else self.skills.ask_back(call)])

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
                                            max_new_tokens=self.llm.max_new_tokens, max_change=self.max_change)
        # `direct`: the audio stands where the operator's words would be, under the robot's prompt
        self.direct_prompt = AlignPrompt(system=self.llm.system_prompt, instruction="The operator says:",
                                         prompt="Answer the operator.", inject=inject, transcript=hybrid)

    def _setup_adapters(self) -> None:
        """Per-speaker projectors announced by personalizer_node (loaded only in aligned mode)."""
        self.adapter_versions: dict[str, int] = {}
        self._speaker_projectors: dict = {}  # replaced whole, never mutated: readers need no lock
        self._base_projector = self.aligned.projector if self.aligned is not None else None
        self._base_sha = ""
        if self.aligned is not None:
            from tinyalign_ros.core.adapters import file_sha256

            self._base_sha = file_sha256(self.projector_file)
        self.create_subscription(String, "adapter", self._on_adapter, LATCHED_QOS)

    def _load_adapter(self, speaker: str, entry: dict):
        """The merged projector of one table entry (raises on a bad, foreign or corrupt adapter)."""
        from tinyalign_ros.core.adapters import AdapterStore
        from tinyalign_ros.core.personalize import apply_adapter

        path = Path(entry["path"])
        adapter = AdapterStore(path.parents[1]).load(speaker, int(entry["version"]))  # checksum verified
        if adapter.info.base_hashes.get("projector") != self._base_sha:
            raise ValueError("it was trained on another base projector than projector.file")
        return apply_adapter(self._base_projector, adapter)

    def _on_adapter(self, msg: String) -> None:
        from tinyalign_ros.core.adapters import AdapterStoreError

        try:
            table = adapter_table(msg.data)
        except ValueError as exc:
            self.get_logger().error(f"{exc}: ignored")
            return
        current, projectors, versions = self._speaker_projectors, {}, {}
        for speaker, entry in table.items():
            if entry.get("kind") == "asr":  # adapts asr_node's Whisper: this speaker keeps the base projector
                continue
            version = int(entry.get("version", 0))
            versions[speaker] = version
            if self.aligned is None:  # cascade: nothing to load, the versions go to diagnostics
                continue
            if self.adapter_versions.get(speaker) == version and speaker in current:
                projectors[speaker] = current[speaker]
                continue
            try:
                projectors[speaker] = self._load_adapter(speaker, entry)
                self.get_logger().info(f"adapter v{version} of {speaker} loaded ({entry.get('kind', '?')})")
            except (AdapterStoreError, ValueError, OSError, IndexError, KeyError) as exc:
                self.get_logger().error(f"adapter v{version} of {speaker} refused: {exc}")
                if speaker in current:
                    projectors[speaker] = current[speaker]
                versions[speaker] = self.adapter_versions.get(speaker, 0)
        for gone in set(self.adapter_versions) - set(table):
            self.get_logger().info(f"{gone} has no adapter any more: base projector")
        self._speaker_projectors = projectors  # the hand-over: one reference assignment
        self.adapter_versions = {s: v for s, v in versions.items() if v}

    def _use_projector_of(self, speaker: str) -> None:
        """Called by the worker before an utterance: that speaker's projector, else the base one."""
        self.aligned.projector = self._speaker_projectors.get(speaker, self._base_projector)

    def _diagnose(self, status: Status) -> None:
        status.add("mode", self.mode)
        status.add("queue_depth", self.worker.depth)
        status.add("answered", self.answered)
        status.add("dropped", self.dropped)
        if self.mode == "aligned":
            status.add("answered_from_transcript_after_early_exit", self.early_exits)
        status.add("last_latency_s", self.last_latency_s)
        status.add("skill_probe", self.probe_file or "off")
        for speaker, version in sorted(self.adapter_versions.items()):
            status.add(f"adapter_version.{speaker}", version)
        if self.dropped:
            status.summary(WARN, f"{self.dropped} utterances dropped (LLM too slow)")
        else:
            status.summary(OK, f"{self.mode} mode")

    def _cascade_stream(self, utt: Utterance) -> Iterator[str] | None:
        """The chat LLM's answer to the transcript, or None for an empty or unsure one."""
        if utt.transcript.strip() and utt.confidence >= self.min_confidence:
            return self.llm.stream(utt.transcript)
        return None

    def _aligned_stream(self, utt: Utterance, response: Response) -> Iterator[str] | None:
        """Text pieces of the aligned answer (an empty iterator when the features are refused; the
        cascade's answer for features of an early exit)."""
        try:
            feats = torch.from_numpy(check_features(self.aligned.projector.cfg, utt.features, utt.feature_frames,
                                                    utt.feature_dim, utt.feature_layer))
        except LayerMismatch:
            self.early_exits += 1
            self.get_logger().info(f"{utt.id}: encoder exited at layer {utt.feature_layer}, the projector reads "
                                   f"layer {self.aligned.projector.cfg.encoder_layer}: answered from the transcript")
            response.mode = "cascade"
            return self._cascade_stream(utt)
        except FeatureMismatch as exc:
            self.get_logger().error(f"{utt.id} {exc}: not answered")
            return iter(())
        if self.task == "direct":
            return self.aligned.stream(feats, self.direct_prompt, utt.transcript)
        heard = "".join(self.aligned.stream(feats, transcript=utt.transcript)).strip()
        raw = heard
        heard, kept = self.aligned.anchor(raw, utt.transcript)
        note = "" if kept else f", anchored: '{raw}' changed too much of it"
        response.transcript = heard
        self.get_logger().info(f"{utt.id}: aligned transcript '{heard}' (ASR: '{utt.transcript}'{note})")
        if self.task == "repeat" or not heard:
            return iter([heard] if heard else [])
        return self.llm.stream(heard)

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _publish_token(self, utt: Utterance, index: int, text: str, final: bool) -> None:
        if not final:
            self.stages.mark("first_piece")
        tok = ResponseToken(utterance_id=utt.id, index=index, text=text, final=final)
        tok.header.stamp = self.get_clock().now().to_msg()
        self.token_pub.publish(tok)

    def _stream_of(self, utt: Utterance, response: Response) -> Iterator[str] | None:
        """The answer's text pieces, or None when there is nothing to answer."""
        if self.mode == "aligned":
            self._use_projector_of(utt.speaker)
            return self._aligned_stream(utt, response)
        return self._cascade_stream(utt)

    def _answer_stream(self, utt: Utterance, response: Response) -> Iterator[str] | None:
        """The answer's pieces, skill call first. Aligned mode with `commands.text: transcript` maps
        asr_node's transcript before the aligned LLM runs, which then runs only for an utterance that
        asks for no skill (the Command does not wait for the aligned LLM to write its transcript)."""
        early = (self.mode == "aligned" and self.command_text == "transcript" and self.task != "repeat"
                 and utt.transcript.strip() and utt.confidence >= self.min_confidence)
        if not early:
            return self._command_stream(utt, response, self._stream_of(utt, response))

        def later() -> Iterator[str]:
            yield from self._stream_of(utt, response) or ()

        return self._command_stream(utt, response, later(), text=utt.transcript)

    def _answer(self, utt: Utterance) -> None:
        end_of_speech = from_time_msg(utt.end)
        response = Response(utterance_id=utt.id, speaker=utt.speaker, transcript=utt.transcript, mode=self.mode)
        pieces: list[str] = []
        stream, first = None, None
        try:
            stream = self._answer_stream(utt, response)
            for piece in stream if stream is not None else ():
                if first is None:
                    first = self._now()
                self._publish_token(utt, len(pieces), piece, final=False)
                pieces.append(piece)
        except PromptTooLong as exc:  # refused like bad features: an empty answer, not a failure
            self.get_logger().error(f"{utt.id}: {exc}: not answered")
            stream = stream or iter(())
        if stream is not None:
            last = self._now()
            response.latency_first_token_s = float((first or last) - end_of_speech)
            response.latency_last_token_s = float(last - end_of_speech)
            if not plausible_latency(response.latency_last_token_s):
                self.get_logger().warning(f"{utt.id}: its end of speech is {end_of_speech:.1f} s, not this machine's "
                                          "recent time (unset stamp?): latency unknown", throttle_duration_sec=5.0)
                response.latency_first_token_s = response.latency_last_token_s = float("nan")
            self.last_latency_s = response.latency_last_token_s
            if pieces and plausible_latency(response.latency_last_token_s):  # none for a refused or unstamped one
                self.first_token_pub.publish(Float32(data=response.latency_first_token_s))
                self.last_token_pub.publish(Float32(data=response.latency_last_token_s))
        else:
            self.get_logger().info(f"{utt.id}: nothing to answer (transcript {utt.transcript[:80]!r}, "
                                   f"confidence {utt.confidence:.2f})")
        self._publish_token(utt, len(pieces), "", final=True)
        response.text = "".join(pieces).strip()
        response.header.stamp = self.get_clock().now().to_msg()
        self.response_pub.publish(response)
        self.marker_pub.publish(text_marker(f"robot: {response.text or '(no answer)'}", response.header.stamp,
                                            self.marker_frame, "response", 1.4))
        self.answered += 1
        self.handled += 1
        self.get_logger().info(f"{utt.id}: '{response.text}' (first token after "
                               f"{response.latency_first_token_s:.2f} s)")

    # -- where the time goes (core/latency.py): one record per answered utterance on metrics/stages --
    def _setup_stages(self) -> None:
        from tinyalign_ros.core.latency import STAGES_TOPIC

        self.stages = self.llm.stages  # the chat LLM adds its prompt pass and first piece to the worker's record
        self.stages_pub = self.create_publisher(String, STAGES_TOPIC, EVENT_QOS)

    def _timed_answer(self, utt: Utterance) -> None:
        """`_answer`, timed: delivery, what comes before the chat LLM, its prompt pass, its first piece."""
        import time

        from tinyalign_ros.core.latency import stage_record

        started, t0 = time.time(), time.perf_counter()
        self.stages.begin()
        try:
            self._answer(utt)
        finally:
            first, llm_start = self.stages.marked("first_piece"), self.stages.marked("llm_start")
            stages = self.stages.take()
        if first is None:  # nothing was said
            return
        record = {"to_assistant_s": started - from_time_msg(utt.header.stamp)}
        if llm_start is not None and llm_start <= first and "llm_prefill_s" in stages:
            record["pre_llm_s"] = llm_start - t0  # skill-call parsing, the aligned transcript
            record.update(stages)
        else:  # a skill's confirmation, an aligned `repeat`: no chat LLM before the first piece
            record["pre_llm_s"] = first - t0
        self.stages_pub.publish(String(data=stage_record(utt.id, self.get_name(), record)))

    def _on_drop(self, utt: Utterance) -> None:
        self.handled += 1
        self.dropped += 1
        self.get_logger().warning(f"LLM busy: dropped utterance {utt.id} {utt.transcript[:80]!r}")
        self._report_drop(utt, "LLM queue full")

    def _report_drop(self, utt: Utterance, reason: str) -> None:
        self.dropped_pub.publish(String(data=drop_record(self.get_name(), reason, utt.id, utt.stream_start_s,
                                                         utt.stream_end_s, utt.transcript)))

    def _on_error(self, utt: Utterance, exc: BaseException) -> None:
        self.handled += 1
        self.get_logger().error(f"answering {utt.id} failed: {exc!r}")
        self._report_drop(utt, f"answer failed: {exc!r}"[:200])

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
