"""When the robot listens: continuously, after a push-to-talk call, or after its wake phrase.

asr_node cuts every stretch of speech it hears into an utterance; in a room with people talking
to each other, most of them are not meant for the robot. `ListenGate` decides which ones are
passed on (to the assistant, the personalizer, the transcript topic):

- `continuous`: every utterance (the default; right for a robot alone with its operator).
- `push_to_talk`: only after `open()` (the `/tinyalign/listen` service): the first utterance
  whose speech *starts* inside the window is passed on and closes it; the window closes anyway
  `timeout_s` after the call if no speech started. One call, one utterance.
- `wake_word`: an utterance is passed on only if its transcript begins with the wake phrase
  (compared as words: case and punctuation do not matter, "Hey, Tiny!" is "hey tiny"); the
  phrase is stripped from the transcript. An utterance that is only the wake phrase opens the
  window for the next one, as a listen call would (people pause after "hey tiny"). The listen
  service works in this mode too.

Decisions use the utterance's speech times on the wall clock, not the time its transcription
finished, so a slow recognizer never makes an utterance miss its window. A segment's start
includes the VAD pre-roll (`speech_pad_ms` before the first speech window); `grace_s` lets that
padding reach back before the window without letting older speech in.

Thread-safe: asr_node opens windows from its service callback and checks utterances from its
transcription thread.
"""
from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass

LISTEN_MODES = ("continuous", "push_to_talk", "wake_word")
# A word: letters/digits, apostrophes inside it ("what's"); everything else separates words.
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def words(text: str) -> list[str]:
    """The words of `text` as compared with the wake phrase: case-folded, apostrophes dropped."""
    return [_fold(m.group()) for m in _WORD.finditer(text)]


def _fold(word: str) -> str:
    return word.casefold().replace("'", "").replace("’", "")


@dataclass(frozen=True)
class Verdict:
    """What to do with one utterance."""

    passed: bool
    transcript: str  # the transcript to publish (wake phrase stripped)
    reason: str      # why it was dropped, or how it got through: for the node's log


class ListenGate:
    """Decides which utterances reach the assistant (see the module docstring)."""

    def __init__(self, mode: str = "continuous", timeout_s: float = 5.0, wake_phrase: str = "",
                 grace_s: float = 0.0) -> None:
        if mode not in LISTEN_MODES:
            raise ValueError(f"listen mode must be one of {LISTEN_MODES}, got {mode!r}")
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"listen timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
        if not (isinstance(grace_s, (int, float)) and math.isfinite(grace_s) and grace_s >= 0):
            raise ValueError(f"grace_s must be a finite number of seconds >= 0, got {grace_s!r}")
        self.wake_words = words(wake_phrase)
        if mode == "wake_word" and not self.wake_words:
            raise ValueError(f"wake_word mode needs a wake phrase with at least one word, got {wake_phrase!r}")
        self.mode = mode
        self.timeout_s = float(timeout_s)
        self.grace_s = float(grace_s)
        self.wake_phrase = " ".join(self.wake_words)
        self._window: tuple[float, float] | None = None  # (earliest, latest) speech start it admits
        self._lock = threading.Lock()

    def open(self, at: float) -> str:
        """Open (or re-open) the window for one utterance whose speech starts from `at` on.

        Returns a sentence for the caller to show (the service's message). In continuous mode
        every utterance passes anyway: a ValueError says so, the window would mean nothing.
        """
        if self.mode == "continuous":
            raise ValueError("listen mode is continuous: every utterance is passed on already")
        with self._lock:
            self._window = (at - self.grace_s, at + self.timeout_s)
        return f"listening for one utterance starting within {self.timeout_s:g} s"

    def is_open(self, now: float) -> bool:
        """A window is waiting for its utterance and speech starting `now` would still be admitted."""
        with self._lock:
            return self._window is not None and now <= self._window[1]

    def check_segment(self, start: float) -> Verdict:
        """Before transcription (cheap): push-to-talk drops speech outside a window here, so the
        recognizer never spends time on it. `start` is the segment's wall-clock start."""
        if self.mode != "push_to_talk":
            return Verdict(True, "", "")
        with self._lock:
            return self._consume(start, "")

    def check_transcript(self, transcript: str, start: float, end: float) -> Verdict:
        """After transcription: the wake-word decision (other modes pass what check_segment let
        through). `start`/`end` are the utterance's wall-clock speech times."""
        if self.mode != "wake_word":
            return Verdict(True, transcript, "")
        rest = strip_phrase(transcript, self.wake_words)
        with self._lock:
            if rest is None:
                return self._consume(start, transcript)
            if not rest:
                # the phrase alone: the command follows after a pause (it starts after `end`)
                self._window = (end - self.grace_s, end + self.timeout_s)
                return Verdict(False, "", f"wake phrase alone: listening for the next utterance "
                                          f"starting within {self.timeout_s:g} s")
            self._window = None
            return Verdict(True, rest, "wake phrase")

    def _consume(self, start: float, transcript: str) -> Verdict:
        """Admit the utterance if its speech started inside the open window, closing it."""
        window = self._window
        if window is None:
            needed = "a listen call" if self.mode == "push_to_talk" else \
                f"the wake phrase '{self.wake_phrase}' or a listen call"
            return Verdict(False, "", f"not listening: waiting for {needed}")
        earliest, latest = window
        if start < earliest:
            # speech from before the call (the operator's previous words, other people): the
            # window stays open for the utterance that follows
            return Verdict(False, "", f"speech started {earliest + self.grace_s - start:.2f} s before the window opened")
        self._window = None
        if start > latest:
            return Verdict(False, "", f"listen window closed: no speech started within {self.timeout_s:g} s")
        return Verdict(True, transcript, "listen window")


def strip_phrase(transcript: str, phrase_words: list[str]) -> str | None:
    """The transcript after a leading `phrase_words` (punctuation and spaces after it removed,
    the first letter capitalized), "" if nothing follows, None if it does not begin with them."""
    matches = list(_WORD.finditer(transcript))
    if len(matches) < len(phrase_words) or any(
            _fold(m.group()) != w for m, w in zip(matches, phrase_words)):
        return None
    if len(matches) == len(phrase_words):
        return ""
    rest = transcript[matches[len(phrase_words)].start():].strip()
    return rest[:1].upper() + rest[1:]
