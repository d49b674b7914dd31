"""personalizer_node: collects consented samples and trains speakers' adapters while the robot is idle.

Thin on purpose: the rounds, the gate, checkpoints and stores are in core (personalize, samples,
adapters). What this node adds:

- samples: every `utterance` of a consented speaker (the `consent.speakers` parameter, or an
  enrollment recorded earlier in the sample store) whose ASR confidence reaches `min_confidence`
  is stored with the ASR text as a "teacher" label; an operator correction on `correction` labels
  one of the last `recent_utterances` utterances with the corrected text ("correction" label,
  which replaces the teacher one). Corrections are std_msgs/String JSON
  `{"utterance_id": "asr-000042", "text": "bring me the red cup"}`: two fields that an operator
  types with `ros2 topic pub`, with no interface package to build or version; a malformed one is
  logged and ignored.
- enrollment: an `enroll` message (std_msgs/String JSON `{"speaker": id, "text": sentence}`,
  sent by `tinyalign enroll`) records the speaker's consent and makes the sentence the label of
  their next utterance ("enrollment" label); asr_node, on the same topic, attributes that
  utterance to the speaker and adds it to their voiceprint.
- idle detection: no utterance for `idle_s` seconds -> a round for a speaker with at least
  `train.min_samples` samples and `train.min_new_samples` new ones since their last finished
  round (or an interrupted round to resume). Any utterance preempts a running round at once
  (the round checkpoints and resumes at the next idle period).
- services: `personalize` (speaker, budget_s) answers at once, accepted or refused and why;
  `forget` stops that speaker's round and deletes samples, consent record, adapters and
  checkpoints (a parameter-granted consent is withdrawn too until the node restarts), and
  announces it on `speaker_forgotten` so asr_node deletes the voiceprint.
- topics: `personalize/progress` (std_msgs/String JSON: speaker, phase, step, loss, ETA),
  `personalize/result` (std_msgs/String JSON: each round's outcome — saved, rejected by the gate,
  preempted, failed — with the validation WERs and the new version; `tinyalign personalize --wait`
  ends on it), `personalize/loss` and `personalize/val_wer` (std_msgs/Float32, for rqt_plot: the
  training loss, and the validation WER of each finished round's candidate adapter, the figure the
  gate compares with the current adapter's), and `adapter` (std_msgs/String JSON,
  transient-local depth 1): the table of every speaker's current adapter
  `{"speaker": <changed>, "version": n, "path": p, "adapters": {speaker: {version, path, kind}}}`.
  The whole table in each message because a latched topic keeps only the last message: a
  late-joining assistant_node learns every speaker's adapter from it, and a forgotten speaker
  drops out of it (assistant falls back to the base projector).
- /diagnostics: training state, step, loss, last validation WERs, adapter version and sample
  count per speaker.
"""
from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path

import numpy as np
from rclpy.node import Node
from rclpy.parameter import Parameter
from std_msgs.msg import Float32, String

from tinyalign_ros.core.adapters import AdapterStore, InvalidSpeakerId, file_sha256, validate_speaker_id
from tinyalign_ros.core.align import DEFAULT_MAX_CHANGE
from tinyalign_ros.core.asr_adapt import ASR_KIND, AUDIO_KINDS
from tinyalign_ros.core.models import data_home, resolve_llm, shipped_model
from tinyalign_ros.core.personalize import PersonalizeConfig, PersonalizeResult, Personalizer, Progress
from tinyalign_ros.core.projector import (FeatureMismatch, LayerMismatch, ProjectorLoadError, check_features,
                                         read_projector_config)
from tinyalign_ros.core.samples import ConsentError, SampleStore
from tinyalign_ros.msg import Utterance
from tinyalign_ros.srv import Forget, Personalize

from .common import EVENT_QOS, LATCHED_QOS, remember, run_node
from .diagnostics import OK, WARN, Status, Updater


class PersonalizerNode(Node):
    def __init__(self, **kwargs) -> None:
        super().__init__("personalizer_node", **kwargs)
        p = self.declare_parameter
        self.idle_s = float(p("idle_s", 30.0).value)
        self.min_confidence = float(p("min_confidence", 0.9).value)
        # typed without a default value: rclpy would infer an empty list as a byte array
        consent = p("consent.speakers", Parameter.Type.STRING_ARRAY).value or []
        self.recent_max = int(p("recent_utterances", 64).value)
        # as asr_node's speaker_id.enroll_timeout_s: a prompt nobody answered in time labels nothing
        self.enroll_timeout_s = float(p("enroll_timeout_s", 60.0).value)
        home = data_home()
        self.samples = SampleStore(p("samples.dir", "").value or home / "samples",
                                   max_samples=int(p("samples.max_per_speaker", 500).value),
                                   max_age_s=float(p("samples.max_age_days", 90.0).value) * 86400.0,
                                   teacher_min_confidence=self.min_confidence)
        self.adapters = AdapterStore(p("adapters.dir", "").value or home / "adapters")
        checkpoints = Path(p("checkpoint_dir", "").value or home / "personalize")
        self.min_new_samples = int(p("train.min_new_samples", 10).value)
        config = PersonalizeConfig(
            kind=p("train.kind", ASR_KIND).value, lr=float(p("train.lr", 0.0).value),
            batch=int(p("train.batch", 4).value), max_steps=int(p("train.max_steps", 40).value),
            budget_s=float(p("train.budget_s", 300.0).value), min_samples=int(p("train.min_samples", 20).value),
            held_out_fraction=float(p("train.held_out_fraction", 0.2).value),
            min_held_out=int(p("train.min_held_out", 2).value),
            ckpt_every_s=float(p("train.checkpoint_every_s", 30.0).value),
            threads=int(p("train.threads", 1).value), nice=int(p("train.nice", 10).value),
            asr_rank=int(p("train.asr.rank", 16).value),
            asr_encoder_layers=int(p("train.asr.encoder_layers", 2).value),
            asr_decoder=bool(p("train.asr.decoder", False).value),
            asr_batch=int(p("train.asr.batch", 8).value),
            asr_time_mask=float(p("train.asr.time_mask", 0.1).value),
            asr_epochs=float(p("train.asr.epochs", 6.0).value),
            gate_min_words=int(p("train.asr.gate_min_words", 20).value),
            e2e_llm_weight=float(p("train.e2e.llm_weight", 1.0).value),
            e2e_llm_chunk=int(p("train.e2e.llm_chunk", 4).value),
            gate_confidence=float(p("train.gate_confidence", 0.75).value))
        projector_file = p("projector.file", "").value or str(shipped_model("projector.safetensors"))
        inject = bool(p("aligned.inject_instruction", True).value)
        max_change = float(p("aligned.max_change", DEFAULT_MAX_CHANGE).value)
        llm_dir = resolve_llm(p("llm.model", "").value)
        base_sha = file_sha256(projector_file)  # also checks that the file is there, at startup
        self.projector_cfg = read_projector_config(projector_file)  # samples must fit it (the LLM loads later)

        def load():  # the frozen LLM is loaded by the first round only
            return self._load_aligned(llm_dir, projector_file, inject, max_change)

        self.personalizer = Personalizer(load, self.samples, self.adapters, checkpoints, base_sha, config)

        for speaker in consent:
            self.samples.grant_consent(validate_speaker_id(speaker), how="parameter")
        self.consented = set(self.samples.speakers())
        # samples a round can use (kind asr: those with audio), per speaker
        self.sample_counts = {s: self.personalizer.trainable_count(s) for s in self.consented}
        # sample count when the speaker's last round finished (in memory: after a restart every
        # speaker gets one round, which the gate makes harmless)
        self.trained_at: dict[str, int] = {}
        self.recent: OrderedDict[str, Utterance] = OrderedDict()
        # speaker -> the sentences they were asked to read, oldest first, with when they were asked.
        # A queue, not the latest prompt: `enroll` and `utterance` are separate topics, so the next
        # prompt can be taken before the utterance that answered the previous one.
        self.enrolling: dict[str, deque[tuple[str, float]]] = {}
        self.lock = threading.Lock()
        self.last_speech = time.monotonic()
        self.last_progress: Progress | None = None
        self.last_result: PersonalizeResult | None = None
        self.table = self._adapter_table()

        self.progress_pub = self.create_publisher(String, "personalize/progress", EVENT_QOS)
        self.loss_pub = self.create_publisher(Float32, "personalize/loss", EVENT_QOS)
        self.result_pub = self.create_publisher(String, "personalize/result", EVENT_QOS)
        self.val_wer_pub = self.create_publisher(Float32, "personalize/val_wer", EVENT_QOS)
        self.adapter_pub = self.create_publisher(String, "adapter", LATCHED_QOS)
        self.create_subscription(Utterance, "utterance", self._on_utterance, EVENT_QOS)
        self.create_subscription(String, "correction", self._on_correction, EVENT_QOS)
        self.create_subscription(String, "enroll", self._on_enroll, EVENT_QOS)
        self.forgotten_pub = self.create_publisher(String, "speaker_forgotten", EVENT_QOS)
        self.create_service(Personalize, "personalize", self._on_personalize)
        self.create_service(Forget, "forget", self._on_forget)
        self.create_timer(1.0, self._on_timer)
        Updater(self).add("personalization", self._diagnose)
        self._announce("", None)
        self.get_logger().info(f"ready ({config.kind} adapters, consented speakers: "
                               f"{', '.join(sorted(self.consented)) or 'none'}, idle after {self.idle_s:.0f} s)")

    @staticmethod
    def _load_aligned(llm_dir: Path, projector_file: str, inject: bool, max_change: float):
        """The frozen LLM + base projector with the prompt assistant_node uses for this projector
        (called by the first training round: a node without consented speakers stays small)."""
        from tinyalign_ros.core.align import AlignedLLM, AlignPrompt
        from tinyalign_ros.core.llm import ChatLLM
        from tinyalign_ros.core.projector import load_projector, read_projector_metadata

        chat = ChatLLM(llm_dir)
        projector = load_projector(projector_file, out_dim=chat.model.get_input_embeddings().embedding_dim)
        hybrid = read_projector_metadata(projector_file).get("prompt") == "hybrid"
        return AlignedLLM.from_chat(chat, projector, AlignPrompt(inject=inject, transcript=hybrid),
                                    max_change=max_change)

    # -- adapters --------------------------------------------------------------------------------
    def _adapter_table(self) -> dict[str, dict]:
        """Every speaker's newest good adapter made for our base projector (or, ASR adapters, our Whisper)."""
        table = {}
        for speaker in self.adapters.speakers():
            adapter = self.adapters.load_latest(speaker)
            if adapter is None:
                continue
            if self.personalizer.fits(adapter.info):
                table[speaker] = {"version": adapter.info.version, "path": str(adapter.info.path),
                                  "kind": adapter.info.extra.get("kind", "")}
        return table

    def _announce(self, speaker: str, entry: dict | None) -> None:
        with self.lock:
            if entry is None:
                self.table.pop(speaker, None)
            else:
                self.table[speaker] = entry
            body = {"speaker": speaker, "version": entry["version"] if entry else 0,
                    "path": entry["path"] if entry else "", "adapters": dict(self.table)}
        self.adapter_pub.publish(String(data=json.dumps(body)))

    # -- samples ---------------------------------------------------------------------------------
    def _features(self, utt: Utterance) -> np.ndarray | None:
        """Features the base projector can be trained on, else None (logged): one bad sample would
        otherwise fail every later round of its speaker."""
        try:
            return check_features(self.projector_cfg, utt.features, utt.feature_frames, utt.feature_dim,
                                  utt.feature_layer)
        except LayerMismatch as exc:  # an early exit: normal, not trainable (enrollment runs full depth)
            self.get_logger().info(f"{utt.id} {exc}: not stored", throttle_duration_sec=30.0)
            return None
        except FeatureMismatch as exc:
            self.get_logger().warning(f"{utt.id} {exc}: not stored")
            return None

    def _store(self, utt: Utterance, text: str, source: str, confidence: float) -> str | None:
        feats = self._features(utt)
        if feats is None:
            return None
        try:
            audio = np.asarray(utt.audio, dtype=np.int16).astype(np.float32) / 32767.0 if len(utt.audio) else None
            sample_id = self.samples.add(utt.speaker, feats, text, source, confidence, utterance_id=utt.id,
                                         layer=utt.feature_layer, asr_transcript=utt.transcript, audio=audio)
        except (ConsentError, InvalidSpeakerId, ValueError) as exc:
            self.get_logger().warning(f"{utt.id}: sample refused: {exc}")
            return None
        if sample_id is not None and (audio is not None or self.personalizer.config.kind not in AUDIO_KINDS):
            self.sample_counts[utt.speaker] = self.sample_counts.get(utt.speaker, 0) + 1
        return sample_id

    def _on_utterance(self, utt: Utterance) -> None:
        self.last_speech = time.monotonic()
        if self.personalizer.busy:
            self.personalizer.stop(timeout=0)  # the round checkpoints by itself within a second
            self.get_logger().info(f"speech ({utt.id}): pausing the training of {self.personalizer.speaker}")
        remember(self.recent, utt.id, utt, self.recent_max)
        prompt = self._next_prompt(utt.speaker)
        if prompt:  # asr_node attributed this utterance to the speaker asked to read `prompt`
            if self._store(utt, prompt, "enrollment", 1.0):
                self.get_logger().info(f"{utt.id}: enrollment sample of {utt.speaker} ('{prompt}')")
        elif utt.speaker in self.consented and utt.transcript.strip() and utt.confidence >= self.min_confidence:
            self._store(utt, utt.transcript, "teacher", float(utt.confidence))

    def _on_enroll(self, msg: String) -> None:
        """`{"speaker": id, "text": sentence}` (tinyalign enroll): enrolling is consenting, and the
        sentence the speaker reads is the label of their next utterance (no text: consent only)."""
        try:
            body = json.loads(msg.data)
            speaker, text = body["speaker"], body.get("text", "")
            if not isinstance(speaker, str) or not isinstance(text, str):
                raise TypeError("speaker and text must be strings")
            validate_speaker_id(speaker)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # InvalidSpeakerId is a ValueError
            self.get_logger().warning(f"ignoring a malformed enrollment {msg.data[:200]!r}: {exc!r}")
            return
        if speaker not in self.consented:
            self.samples.grant_consent(speaker, how="enrollment")
            self.consented.add(speaker)
            self.sample_counts.setdefault(speaker, self.personalizer.trainable_count(speaker))
            self.get_logger().info(f"{speaker} enrolled: consent recorded")
        if text.strip():
            self.enrolling.setdefault(speaker, deque(maxlen=16)).append((text.strip(), time.monotonic()))

    def _next_prompt(self, speaker: str) -> str | None:
        """The oldest prompt of `speaker` still within enroll_timeout_s (older ones were missed)."""
        queue = self.enrolling.get(speaker, deque())
        now = time.monotonic()
        while queue and now - queue[0][1] > self.enroll_timeout_s:
            queue.popleft()
        text = queue.popleft()[0] if queue else None
        if not queue:
            self.enrolling.pop(speaker, None)
        return text

    def _on_correction(self, msg: String) -> None:
        try:
            body = json.loads(msg.data)
            utterance_id, text = body["utterance_id"], body["text"]
            if not isinstance(utterance_id, str) or not isinstance(text, str):  # str(None) would be an id
                raise TypeError("utterance_id and text must be strings")
        except (ValueError, KeyError, TypeError) as exc:
            self.get_logger().warning(f"ignoring a malformed correction {msg.data[:200]!r}: {exc!r} "
                                      '(expected {"utterance_id": ..., "text": ...})')
            return
        utt = self.recent.get(utterance_id)
        if utt is None:
            self.get_logger().warning(f"correction for unknown or too old utterance {utterance_id!r}: ignored")
        elif utt.speaker not in self.consented:
            self.get_logger().info(f"correction for {utterance_id}: speaker {utt.speaker!r} has not consented, not stored")
        elif self._store(utt, text, "correction", 1.0):
            self.get_logger().info(f"{utterance_id} labelled by the operator: '{text}'")

    # -- training --------------------------------------------------------------------------------
    def _start(self, speaker: str, budget_s: float = 0.0) -> None:
        count = self.sample_counts.get(speaker, 0)
        self.personalizer.start(speaker, budget_s or None, self._on_progress,
                                lambda result: self._on_done(result, count))
        self.get_logger().info(f"training the {self.personalizer.config.kind} adapter of {speaker} "
                               f"({count} samples)")

    def _on_timer(self) -> None:
        if self.personalizer.busy or time.monotonic() - self.last_speech < self.idle_s:
            return
        need = self.personalizer.config.min_samples
        for speaker in sorted(self.consented):
            count, last = self.sample_counts.get(speaker, 0), self.trained_at.get(speaker)
            # first round since start, an interrupted one, or enough new samples since the last one
            if count >= need and (last is None or self.personalizer.has_checkpoint(speaker)
                                  or count - last >= self.min_new_samples):
                self._start(speaker)
                return

    def _on_progress(self, progress: Progress) -> None:
        self.last_progress = progress
        body = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in vars(progress).items()}
        self.progress_pub.publish(String(data=json.dumps(body)))
        if math.isfinite(progress.loss):
            self.loss_pub.publish(Float32(data=float(progress.loss)))

    def _on_done(self, result: PersonalizeResult, count: int) -> None:
        self.last_result = result
        if result.status != "preempted":
            self.trained_at[result.speaker] = count
        if result.val_wer_after is not None:
            self.val_wer_pub.publish(Float32(data=float(result.val_wer_after)))
        if result.adapter is not None:
            a = result.adapter
            self._announce(a.speaker, {"version": a.version, "path": str(a.path), "kind": a.extra.get("kind", "")})
        self.result_pub.publish(String(data=json.dumps({
            "speaker": result.speaker, "kind": result.kind, "status": result.status, "message": result.message,
            "steps": result.steps, "train_s": round(result.train_s, 2), "n_train": result.n_train,
            "n_val": result.n_val, "val_wer_before": result.val_wer_before, "val_wer_after": result.val_wer_after,
            "p_better": result.p_better,
            "version": result.adapter.version if result.adapter is not None else 0})))
        log = self.get_logger().warning if result.status == "failed" else self.get_logger().info
        log(f"{result.kind} adapter of {result.speaker}: {result.status}: {result.message}")

    # -- services --------------------------------------------------------------------------------
    def _refusal(self, speaker: str) -> str:
        try:
            validate_speaker_id(speaker)
        except InvalidSpeakerId as exc:
            return str(exc)
        if self.personalizer.busy:
            return f"already training the adapter of {self.personalizer.speaker}"
        if speaker not in self.consented:
            return f"unknown speaker {speaker!r}: no consent recorded (consent.speakers parameter or enrollment)"
        count, need = self.sample_counts.get(speaker, 0), self.personalizer.config.min_samples
        if count < need:
            what = "samples with audio" if self.personalizer.config.kind in AUDIO_KINDS else "samples"
            return f"too few {what} for {speaker}: {count}, at least {need} needed"
        return ""

    def _on_personalize(self, request: Personalize.Request, response: Personalize.Response) -> Personalize.Response:
        refusal = self._refusal(request.speaker)
        if not refusal:
            try:
                self._start(request.speaker, float(request.budget_s))
            except RuntimeError as exc:  # a round started by the idle timer in between
                refusal = str(exc)
        response.accepted = not refusal
        response.message = refusal or f"training {request.speaker} ({self.sample_counts[request.speaker]} samples)"
        self.get_logger().info(f"personalize {request.speaker!r}: {response.message}")
        return response

    def _on_forget(self, request: Forget.Request, response: Forget.Response) -> Forget.Response:
        speaker = request.speaker
        try:
            validate_speaker_id(speaker)
        except InvalidSpeakerId as exc:
            response.success, response.message = False, str(exc)
            return response
        if self.personalizer.busy and self.personalizer.speaker == speaker and not self.personalizer.stop(timeout=5.0):
            response.success, response.message = False, f"the round of {speaker} did not stop: try again"
            return response
        count = self.samples.count(speaker)
        had_samples = self.samples.revoke(speaker)
        had_adapters = self.adapters.delete_speaker(speaker)
        self.personalizer.discard_checkpoints(speaker)
        self.consented.discard(speaker)
        self.sample_counts.pop(speaker, None)
        self.trained_at.pop(speaker, None)
        for utt_id in [k for k, u in self.recent.items() if u.speaker == speaker]:
            del self.recent[utt_id]
        self.enrolling.pop(speaker, None)
        self._announce(speaker, None)
        self.forgotten_pub.publish(String(data=speaker))  # asr_node deletes the voiceprint
        response.success = True
        response.message = (f"forgot {speaker}: {count} samples, consent and adapters deleted"
                            if had_samples or had_adapters else f"nothing was stored for {speaker}")
        self.get_logger().info(response.message)
        return response

    # -- monitoring ------------------------------------------------------------------------------
    def _diagnose(self, status: Status) -> None:
        busy = self.personalizer.busy
        status.add("state", f"training {self.personalizer.speaker}" if busy else "idle")
        status.add("seconds_since_speech", time.monotonic() - self.last_speech)
        pr = self.last_progress
        if pr is not None:
            status.add("step", pr.step)
            status.add("loss", pr.loss)
            status.add("eta_s", pr.eta_s)
        res = self.last_result
        if res is not None:
            status.add("last_round", f"{res.speaker} {res.kind}: {res.status}")
            if res.val_wer_before is not None:
                status.add("last_val_wer_before", res.val_wer_before)
            if res.val_wer_after is not None:
                status.add("last_val_wer_after", res.val_wer_after)
        with self.lock:
            table = dict(self.table)
        for speaker in sorted(self.consented | set(table)):
            status.add(f"adapter_version.{speaker}", table.get(speaker, {}).get("version", 0))
            status.add(f"samples.{speaker}", self.sample_counts.get(speaker, 0))
        if res is not None and res.status == "failed":
            status.summary(WARN, f"last round failed: {res.message}")
        else:
            status.summary(OK, f"training {self.personalizer.speaker}" if busy else "idle")

    def destroy_node(self) -> None:
        if hasattr(self, "personalizer"):
            self.personalizer.stop(timeout=5.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    # a corrupt projector.file is refused at startup (its config is read there): one fatal line, not a traceback
    run_node(PersonalizerNode, args, startup_errors=(ValueError, OSError, ProjectorLoadError))


if __name__ == "__main__":
    main()
