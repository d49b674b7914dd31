"""From what the operator said to one checked skill call (or none): skills declared in YAML, a
JSON schema of "one skill call or none", and the frozen LLM writing that call under a grammar.

ROS-free: assistant_node and `tinyalign bench commands` both use `CommandParser`.

The skills file (config/skills.yaml, documented there) is checked when it is loaded: an unknown
key, a wrong type, a template naming an argument that does not exist, an example or a phrase
naming a skill or value that is not declared raise `SkillsError` with the place in the file, so a
robot never starts with a skill set it cannot honour.

**Constrained decoding.** `SkillSet.schema()` is an `anyOf` of one object per skill
(`{"skill": "go_to", "arguments": {"place": <enum>}}`) plus `{"skill": "none", "arguments": {}}`.
llguidance compiles it into a token grammar; `CommandParser` runs the frozen LLM greedily and, at
every step, masks the tokens the grammar forbids. Tokens the grammar forces (the JSON syntax, the
rest of a value once its first token decides it) are not sampled: they are fed to the model in one
forward pass with the token that made them certain, so a call costs one forward pass per real
decision (skill name, each argument value) plus one for the request. The output is therefore
always a valid call of a declared skill with allowed values; it is still checked against the
skill set (`SkillSet.check`) before anyone acts on it. The confidence is the product of the
probabilities, renormalized over the allowed tokens, of the tokens that were real choices.

**Why llguidance** (SmolLM2-135M tokenizer, 49k tokens; `tinyalign bench commands` records each
library's set-up time and time per token mask under `libraries` in bench/results/commands.json):
- llguidance 1.9.1: one 3.1 MB wheel (7.6 MB installed), no dependencies (Rust); measured: 0.37 s
  to wrap the tokenizer and compile the skills' schema, 0.15 ms per token mask; it reports the
  forced tokens (`compute_ff_tokens`) that let the parser skip the model's forward pass for JSON
  syntax.
- lm-format-enforcer 0.11.3: 45 kB + interegular (pure Python, pydantic already here), but its
  transformers integration does not import under transformers 5.23 (it imports
  `transformers.tokenization_utils.PreTrainedTokenizerBase`, which moved), so it was not timed.
- xgrammar 0.2.8 pulls triton (286 MB wheel) and apache-tvm-ffi into a CPU-only venv; outlines 1.3.3
  brings outlines-core plus a dozen packages; transformers-cfg's last release (2025-03) predates
  transformers 5. Not installed.
**Constrained choice** (`method="choice"`, the default). Greedy generation alone was poor on the
dev split (data/skill_requests_dev.tsv + even lines of questions.txt, 36 requests past the stop
phrases + 25-30 chatter): 20% exact calls, the model wrote "none" for most requests. So the
parser scores instead of writing: the LLM's log-likelihood of each skill name after the few-shot
prompt (`{"skill": "NAME"`), one packed forward pass for all of them, then of each argument value
(`"place": "VALUE"`) of the chosen skill. Alone that gave 28% exact (the model copies the
few-shot examples: "go_to"/"bedroom" everywhere); calibrated against a content-free request
(Zhao et al. 2021) 42% exact but "none" for only 4% of the chatter; channel scoring and nearest
neighbours on the LLM's hidden states did no better on skills (58% / <= 67%). What reached 89%
exact and 96% "none" on dev: the calibrated scores plus evidence from the words said (a skill's
`cues` in the YAML: +CUE_BONUS; "none" starts NONE_BIAS ahead; a named argument value, or the
argument's default when none is named, is taken without a forward pass). The weights were chosen
on dev only; the held-out figures are in bench/results/commands.json. The LLM still decides when
the words do not (several cues, a value not named), and says how sure it is.

The few-shot examples come from the skills file (`examples:`), never from the benchmark's
held-out requests (data/skill_requests_heldout.tsv; test_commands_data checks).

**The cue gate** (`require_cue`, assistant_node `commands.require_cue`). With NONE_BIAS 10, a skill
none of whose cues was said needs the calibrated LLM to prefer it by 10 nats, and on the dev split
that never made a right call: of 125 chatter utterances 122 say no cue and one of them ("How do you
brew coffee with a French press?") became go_to; the 2 of 36 requests without a cue ("take yourself
to the office", "cut the motors") were "none" either way. So an utterance that says no skill's cue
is "none" at once (`via` "no_cue"), without the LLM's pass: a question's chat answer starts that
much sooner (bench/results/latency.json `pre_llm_s`). The gate is off when a skill declares no cues
(the LLM alone can find it). With the gate, the aliases below and cues added or dropped for the
dev split's misses ("take yourself", "motors"; "help me" dropped: "help me practice my French"), the
dev text gives 100% exact and 98.4% "none" (tuned on: the held-out figures are the ones to quote).

**Confidence.** The product over the decisions of the chosen option's softmax over its scores
(calibrated log-likelihood plus evidence) divided by CONFIDENCE_TEMPERATURE. It is low when the LLM
had to guess an argument nobody named, or when a cued skill was only a few nats ahead of "none"
(a cue word in a question: "I would like to learn the guitar"); below `commands.min_confidence`
the robot asks back instead of acting (Command.sure false). The benchmark records how many right
calls it asked back about and how many wrong ones it caught (`asked_back_right/wrong`).

**Aliases.** A choice value may list other words that name it (`aliases:` in the YAML: "dock" for
the charging station, "kill" for off): they count as the value being said.

**Second round: what was tuned on what.** Everything above was chosen on the dev split. The first
held-out run (then data/skill_requests_test.tsv + chatter_test.txt: 89.7% exact on the text,
77.6% pooled as Whisper tiny heard 4 voices, "none" 93.8%) had its errors read, so that set became
the second dev split (`dev2`: skill_requests_dev2.tsv, chatter_dev2.txt + the odd lines of
questions.txt), and a fresh held-out set was written before anything below changed
(skill_requests_heldout.tsv, chatter_heldout.txt; `bench commands` default). Chosen on dev + dev2
only, on the text and on Whisper tiny's transcripts of both splits spoken by the bench's 4 voices
(faster-whisper on each clip, a throwaway script):
- a cue's words match in their regular inflections (`inflections`: "keep following me",
  "switching"); a cue heard only inflected adds INFLECTED_CUE_BONUS, half of CUE_BONUS
  ("how far can a hummingbird fly without stopping?" stays none);
- `_evidence`: a skill loses MISSING_PENALTY for each choice argument without a default none of
  whose values was said (nearly said counts) and gains NAMED_BONUS for each one named as written:
  "should I take an umbrella when I go out today?" says go_to's "go" but no place, "I need you in
  the office" says fetch's "need" but no object and names go_to's office. Swept on dev: penalty
  0 / 4 / 8 / 12 gave dev2 speech "none" 89.7 / 90.8 / 98.8 / 99.3% at the same exact share;
  bonus 4 then gave dev2 text 100% exact (98.3% without), 8 cost dev 2.5 points;
- a value nearly said (`mentioned(fuzzy=True)`, FUZZY_VALUE_RATIO 0.7, not for aliases) counts
  when none is said as written, before an argument's default: +2.2 points exact on dev2 speech
  (0.8: +1.3); "you" no longer names person me;
- cues and aliases from dev misses: go_to "ride", "make your way"; fetch "get" (was "get me");
  lights "switch", "turn on", "turn off"; what_can_you_do "you can do", "how can you help";
  grandmother/granny, grandfather/grandad; "station" was tried as an alias of the charging station
  and dropped ("how do I get to the train station?").
Dev text 100% / 98.4% none -> 100% / 100%; dev2 text 89.7% / 96.0% -> 100% / 99.3%; as heard
(4 voices pooled) dev 86.3% / 96.0% -> 86.3% / 99.4%, dev2 78.0% / 95.2% -> 88.8% / 98.8% (tuned
on: the held-out figures in bench/results/commands.json are the ones to quote). The stop fast
path (`match_phrase`) did not change.

**Third round: what was tuned on what.** The fresh held-out set of the second round was run once
(bench/results/commands.json of eebc0dd: 81.2% exact pooled over 4 voices, text 92.6%, "none"
77.0%) and its errors read, so it became the third dev split (`dev3`: skill_requests_dev3.tsv,
chatter_dev3.txt), and another fresh held-out set was written before anything below changed
(skill_requests_heldout.tsv, chatter_heldout.txt). Chosen on dev + dev2 + dev3 only, on the text
and on Whisper tiny's transcripts of the three splits in the bench's 4 voices (as in the second
round). dev3's chatter says cue words in other senses ("I can't stop thinking about that movie",
"did you follow the news", "how do I turn off notifications", "I need to get a new winter coat"):
- `imperative: true` in the YAML (stop, follow_me): a cue of such a skill counts only where it is
  said as a command to the robot (`_addressed`): in its clause (split at punctuation and
  "and/then/but"), after lead-ins ("please", "robot", "can you", "I want you to", ...), at most two
  words before it, none a subject or question word ("I", "my", "how", "did", ...) and the first not
  an article ("walk behind me", "cut the motors"), or nothing after it but "now", "it", "that",
  "right there" ... ("I said stop", "you need to stop right now"). Not for what_can_you_do: its
  cues are questions ("which tasks can you do for me?");
- no cue counts in a clause that asks what the speaker should do (`SELF_QUESTION`: "should I take
  the train or drive?", "where should we go on holiday", "how do I stop my dog"); "can I / could
  I" are requests and not matched;
- `requires:` in the YAML: lights is chosen only when "light" or "lamp" is said ("turn off
  notifications" is not about lights);
- a value only nearly said (`nearly_mentioned`) no longer spares a skill MISSING_PENALTY ("winter"
  for water): the LLM has to prefer the skill by the penalty's margin; the near value is still
  taken once the skill is chosen. Cost on dev: one request of dev2 speech ("bring a blank to the
  kids"); gain: dev3 "none" +2 points;
- cues from dev3 misses: what_can_you_do drops "you do" ("what do you do for fun?") and gains "you
  to do", "how to do", "able to help"; fetch gains "take this", "I'd like", "I'd love", "can I
  have", "could I have"; a possessive 's is dropped when values are matched ("grandpa's").
  Tried and dropped: a reduced cue bonus for non-imperative skills whose cue is not addressed (x0.5
  cost 2.5 points of dev speech, x0.75 changed nothing).
Text exact / none: dev 100 / 100 -> 100 / 100, dev2 100 / 99.3 -> 100 / 99.3, dev3 92.6 / 76.0 ->
100 / 96.0; as heard (4 voices pooled): dev 86.3 / 99.4 -> 86.3 / 99.8, dev2 88.8 / 98.8 -> 88.4 /
99.0, dev3 82.1 / 76.5 -> 88.6 / 96.0 (tuned on: the held-out figures in
bench/results/commands.json are the ones to quote). Left on dev3: "Halt and Catch Fire was a
great TV show" (stop: "halt" starts a clause) and "the remote control for the TV needs new
batteries" (fetch: cue and object said). The stop fast path (`match_phrase`) did not change.

**Fourth round: the skill probe.** The third round's held-out set was run once (bench/results/
commands.json of 786cba6: 77.3% exact pooled over 4 voices, text 89.5%, "none" 88.0%) and its
errors read, so it became the fourth dev split (`dev4`), and a fresh held-out set was written
before anything below changed (b607a26).
What bounded the rules: 9 of dev4's text misses said no cue at all ("I want you in the bedroom",
"pass me my glasses"), so the gate made them "none"; cue words in another sense still fired. A
linear probe on the LLM's hidden states (core/skill_probe.py) names the skill far better than its
next-token scores: fit on three dev splits and tested on the fourth (text and Whisper tiny's
transcripts in the bench's 4 voices), it alone named dev4's skills 97.7% (text) / 90.1% (heard).
The parser now reads it from the pass that scores the skill names (no extra forward pass):
- where a cue was said, PROBE_WEIGHT x the probe's log probability is added to every option's
  score (cue rules, evidence and `requires` unchanged);
- where none was, the utterance no longer stops at the gate (`via` "probe"): the probe's likeliest
  skill among those allowed (`requires`) is taken when its probability is above PROBE_THRESHOLD,
  else "none"; the confidence is that probability. A chat answer starts one LLM pass later than
  at the gate (~0.1 s). Without a probe (`commands.probe_file: off`, or one fit for other skills)
  the gate works as before.
Chosen by leave-one-split-out over dev..dev4 (every utterance scored by a probe fit on the other
three splits; the rules were tuned on dev..dev3, so dev4 is the fairest column), exact / "none":
| rule | all 4 splits, text | heard | dev4 text | dev4 heard |
|---|---|---|---|---|
| cue rules alone (third round) | 96.6 / 97.6 | 84.9 / 97.5 | 89.5 / 88.0 | 78.5 / 88.5 |
| probe alone (arguments as the parser's) | 98.1 / 98.9 | 89.8 / 98.3 | 97.7 / 98.0 | 85.8 / 97.0 |
| weight 1, threshold 0.5 (chosen) | 100 / 98.7 | 91.7 / 98.1 | 100 / 98.0 | 88.9 / 96.5 |
| weight 2, threshold 0.7 | 99.6 / 98.7 | 90.7 / 98.4 | 98.8 / 98.0 | 87.8 / 97.5 |
| weight 4, threshold 0.7 | 98.9 / 98.7 | 90.2 / 98.5 | 98.8 / 98.0 | 87.8 / 97.5 |
| the probe's log prob added everywhere, no gate (weight 4) | 99.3 / 98.9 | 90.6 / 98.7 | 100 / 96.0 | 86.3 / 95.5 |
Probes fit on the text alone did worse on what Whisper heard (dev4 heard 86.6% with the chosen
rule), so the shipped probe (`tinyalign train skills`, models/skill_probe.md) is fit on dev..dev4
text and transcripts; layer 14 and weight decay 1e-3 were the best of layers 6-30, mean or last
token, on dev4 when fit on dev..dev3. The held-out figures in bench/results/commands.json are the
ones to quote. The rules, cues and the stop fast path did not change.

**Fifth round: what was tuned on what.** The fourth round's held-out set was run once (47b3ea7:
82.1% exact pooled over 4 voices, text 94.6%, "none" 92.0%) and its errors read, so it became the
fifth dev split (`dev5`), and a fresh held-out set was written blind before anything below changed
(365bfe0). Chosen on dev..dev5, text and Whisper tiny's transcripts in the bench's 4 voices, with
the fourth round's probe (fit on dev..dev4, so dev5 is out of its sample), exact / "none":
| change | dev .. dev4 heard | dev5 text | dev5 heard |
|---|---|---|---|
| fourth round | dev 93.8 / 100, dev2 95.7 / 99.5, dev3 94.1 / 98.0, dev4 93.0 / 97.5 (text: 100% exact on each) | 94.6 / 90.0 | 84.2 / 91.0 |
| a cue that ends its clause is no command after NOT_BARE_COMMAND ("this headache would stop", "come to a halt") | same | 94.6 / 94.0 | 84.2 / 93.5 |
| a nearly named value is never a run of words with an article in it ("kill the" was near "kitchen") | same | 95.7 / 94.0 | 85.0 / 93.5 |
| `not_self` (go_to): no cue where the speaker is the subject ("I'm going out to the garden", "I need to go to the bank") | same | 96.7 / 96.0 | 85.0 / 95.5 |
The alias "granddad" (Whisper's spelling; fuzzy matching took it for grandma) was added too.
Tried and dropped: "none" when a choice argument without a default is named nowhere (not even
nearly): right for "go to the bank", but it lost requests that the LLM completed right ("go to
bed"): dev..dev5 heard exact 91.7 -> 90.3%; go_to `imperative: true` (no "it's time for you to
go"): dev5 heard 84.2 -> 83.7%. The probe was then refit on dev..dev5 (models/skill_probe.md).
After the held-out run (README): an utterance of nothing but FILLERS ("Tiny.", "Okay.") is "none"
without the parser (`via` "empty"): the probe alone took such short ones for stop.

**Sixth round.** The fifth round's held-out set was run once (f77b2d3: 78.7% exact pooled, text
88.4%, "none" 96.6%) and its errors read, so it became `dev6`, and a fresh held-out set was
written blind before anything below changed (fb6412b). Chosen on dev..dev6 with the fifth round's
probe (fit on dev..dev5, so dev6 is out of its sample); dev..dev5 did not change with any of them,
exact / "none" on dev6:
| change | dev6 text | dev6 heard |
|---|---|---|
| fifth round (with the filler rule) | 88.4 / 96.2 | 80.8 / 97.6 |
| aliases: glasses "spectacles", "specs"; the kids "children" | 90.5 / 96.2 | 82.1 / 97.6 |
| stop cues "stay still", "keep still" | 89.5 / 96.2 | 81.8 / 97.6 |
| lights `requires` also "dark", "brighter", "lit" (cues "brighter", "lit"): "It's too dark to read in here" | 90.5 / 96.2 | 82.6 / 97.6 |
| all three (chosen) | 93.7 / 96.2 | 85.0 / 97.6 |
Tried and dropped: in the probe-only path, each skill's probability times e^(lambda x the choice
arguments it has named) ("Tiny, kitchen please." was stop): lambda 1-3 gained 1.8-2.4 points of
dev6 heard exact but cost 2.4-4.3 of its "none". The probe was then refit on dev..dev6.

**Seventh round.** The sixth round's held-out set was run once (b9d598c: 83.7% exact pooled, text
92.6%, "none" 91.3%) and its errors read, so it became `dev7`, and a fresh held-out set was
written blind before anything below changed. Chosen on dev..dev7 with the sixth round's probe (fit
on dev..dev6, so dev7 is out of its sample), exact / "none" on dev7:
| change | dev7 text | dev7 heard |
|---|---|---|
| sixth round | 92.6 / 92.3 | 84.7 / 90.4 |
| aliases: living room "lounge", office "study" (go_to and lights), grandma "nana", newspaper "paper" | 97.9 / 92.3 | 89.7 / 90.4 |
| follow_me cue "trail" ("trail after me") | 93.7 / 92.3 | 85.5 / 90.4 |
| follow_me `requires` me, us, along, behind or after ("Follow the recipe exactly ...") | 92.6 / 94.2 | 84.7 / 92.3 |
| pleasantries (since the ninth round `pleasantries:` in the skills file): nothing but thanks, praise and fillers is "none" (`via` "empty"; the probe took "Great, cheers.", "Nice, well done." for stop) | 92.6 / 98.1 | 84.7 / 93.8 |
| all four (chosen) | 99.0 / 100 | 90.5 / 95.7 |
dev..dev6 as heard moved by one request each way: dev5 93.8 (was 94.3: Whisper's "Take a long, I'm
going out" for "tag along" says none of follow_me's required words), dev6 91.6 (was 91.0); their
text and "none" did not change. Tried and dropped: waiving `requires` when the probe gives the
skill >= 0.8-0.98 and its arguments are named (Whisper's "slides", "life" for "lights"): +0.2-0.3
points of all splits heard, nothing on dev7. The probe was then refit on dev..dev7.

**Eighth round.** The seventh round's held-out set was run once (f2116ac: 74.7% exact pooled, text
84.4%, "none" 86.1%) and its errors read, so it became `dev8`, and a fresh held-out set was
written blind before anything below changed (its writer's prompt no longer gave example words;
the aliases below were chosen before the writer's report named any of its words, and none was
added after). Chosen on dev..dev8 with the seventh round's probe (fit on dev..dev7, so dev8 is out
of its sample), exact / "none" on dev8:
| change | dev8 text | dev8 heard |
|---|---|---|
| seventh round | 84.4 / 84.6 | 76.8 / 86.5 |
| common synonyms as aliases (loo, toilet, sitting room, hall, corridor, yard; remote, clicker, mobile, pills, tablets, throw, storybook; nan, gran, gramps, little ones) | 94.8 / 84.6 | 82.8 / 86.5 |
| a value said right after "not" does not count where another is said (`_among_several`) | 86.5 / 84.6 | 78.4 / 86.5 |
| and `last_named` (lights' state): the last clause's value ("left the light on, turn it off") | 87.5 / 84.6 | 78.6 / 86.5 |
| pleasantries "worries", "problem", "sure", "fine", "lovely", "mate", "okey", "dokey" ... | 84.4 / 86.5 | 76.8 / 86.5 |
| all, and "no worries", "no problem", "never mind" as pleasantries (chosen) | 97.9 / 90.4 | 84.6 / 89.9 |
dev..dev7 did not lose (dev4 heard 93.0 -> 93.3, dev6 text 97.9 -> 99.0, heard 91.6 -> 92.4).
Tried and dropped: the last clause's value for every argument: +0.8 dev8 heard, but -1 text ("Go
and wait in the corridor, I need the living room floor clear": the reason names another room).
Left on dev8: chatter addressed to someone else ("Honey, have you seen the car keys?", "Mum, can
I have a biscuit?"), "Turn left at the lights ...", "I could really do with my specs". The probe
was then refit on dev..dev8.

**Ninth round.** The eighth round's held-out set was run once (18de63c: 80.8% exact pooled, text
96.0%, "none" 87.5%) and its errors read, so it became `dev9`, and a fresh held-out set was
written blind before anything below changed (f1be112). Chosen on the text of dev..dev9 with the
eighth round's probe (fit on dev..dev8, so dev9 is out of its sample; it was not refit this round),
changes (the text of each split run once before and once after all three; every item that changed
is named, none changed for the worse):
- lights: "darken", "make it dark", "make it darker" name off and "brighten" names on (aliases of
  `state`; "darken" and "brighten" are cues and `requires` words too): fixed dev9's "Brighten up
  the office", "Make it dark in here, I want to watch a film", "Tiny, darken the office" and dev7's
  "Make it dark in here, please" ("It's dark in the kitchen, put the light on" still names on);
- what_can_you_do cues "what jobs", "which jobs", "what tasks", "which tasks", "of jobs", "of
  tasks": fixed "What kinds of jobs could I give you, Tiny?" (dev9), "What jobs can I give you?"
  (dev6); "She switched jobs last spring." says none of them;
- `other_people` (top level of the skills file): a term of address as a clause of its own ("Your
  phone is ringing, love.", "Honey, ...") is said to someone else, "none" without the parser (`via`
  "others"), unless the robot is named or a stop cue is said ("Honey, stop!" stops): fixed "Your
  phone is ringing, love." (the probe alone had made it fetch, 0.86); the VAD's fragment "Honey."
  is "none" too.
The words of thanks (seventh and eighth rounds) moved from code into the skills file
(`pleasantries:`), where a robot builder can extend them: the same verdict on every dev split's
text as before (1532 utterances).
Text exact / "none": dev9 96.0 / 88.5 -> 100 / 90.4, dev6 98.9 -> 100 exact, dev7 98.9 -> 100;
the other splits did not change (100% exact; "none" 98.0-100).
Tried and dropped: a vocabulary prompt for Whisper tiny (`initial_prompt`: "Tiny, the kitchen, the
living room, ..., grandma, grandpa, the kids."), on dev9 in two voices (piper, slt): words wrong
(difflib) 5.0% -> 5.4% ("Grandad" was heard, "Nana" became "none"), parsed exact 91.0 -> 92.0%,
"none" 90.4 both: not clearly better, and a prompt can make Whisper write its words into noise.
Left on dev9:
"Jamie, lock the front door ..." (a name: a robot builder lists the household's names in
`other_people`), "Coffee's on me next time." and "Oh no, I spilled it." (the probe alone: fetch
0.98, stop 0.52), "Stay there, I'll get the door." (stop), "what can you do when the Wi-Fi keeps
dropping?".

**Tenth round.** The ninth round's held-out set was run once (d3dd23c: 75.8% exact pooled, text
92.8%, "none" 88.9%) and its errors read, so it became `dev10`, and a fresh held-out set was
written blind before anything below changed. Chosen on the text of dev..dev10 (the probe, fit on
dev..dev8, was not refit):
- a correction takes back the values said before it (`CORRECTIONS`, `_among_several`): a clause
  that starts with "no", "sorry", "wait", "I mean", "make that" or "or rather" ("Turn the kitchen
  light on, no wait, the living room one"; dev9's "Go to the bathroom, no wait, the bedroom" and
  "Fetch my phone, sorry, I mean my glasses" were already right: the LLM chose the later value);
- `SkillSet.stop_doing`: a stop cue said as a command right before the -ing form of another
  skill's cue verb is a stop (`via` "stop_doing"), whatever that skill's words name ("Please stop
  driving toward the kitchen" was go_to: the robot would have driven on). It is decided with the
  stop phrases, in assistant_node's subscription callback, without the LLM and never behind the
  queue (`SkillSet.fast_call`). On the dev splits it fires on 9 requests, all stops, and on no
  chatter. (As first written it took any -ing word, and the tenth held-out run's text had "Stop
  worrying so much, love." -> stop; read after that run, so the tenth set is a dev split now. The
  LLM still makes it a stop: the safe mistake.);
- aliases "illuminate" (lights on; also a cue and `requires` word), "cut" (off), "recharge" (the
  charging station); what_can_you_do cue "your features".
Text exact / "none": dev10 92.8 / 92.3 -> 97.9 / 92.5 (53 chatter lines; the bench ran 52); no
other split changed. Left on dev10: "what do you do exactly", "lend me a hand" (what_can_you_do
said without a cue; the probe says none), "Stop by the bakery ..., honey." (stop: the safe
mistake), "Take it easy" (stop, the probe alone), "Bring your own bottle" (fetch water), "Oh well,
what can you do, the weather's ..." (what_can_you_do). As heard, most of dev10's misses were
Whisper's words or the VAD cutting a sentence at a comma ("Tiny, fetch my glasses. No, sorry." |
"my phone"), which no rule on one utterance's text can mend.

**Twelfth round (begun).** The eleventh held-out set was run once (f9394e8: 82.6% exact pooled,
text 94.2%, "none" 86.6%) and became `dev12`; a twelfth set was written blind (a1c2b3a). Chosen on
the text of dev..dev12 so far: for a `last_named` argument, a value said after "left", "still",
"is", "are", "was", "were" or "been" in its clause (`REPORTS`) says how things are, not what is
asked, and does not count where another value is said ("Turn off the bathroom light, somebody left
it on again": the last clause's "on" had won); a `requires` word with a possessive 's counts ("The
hallway light's still on, ..." was none). dev12 text 94.2 -> 96.5% exact, "none" unchanged; no
other split changed. Then, for "none" (every fresh set's chatter had been 88-92% on its text):
- `unless:` phrases in the YAML rule a skill out (`Skill.allowed`): what_can_you_do "oh well", "ah
  well", "oh dear", "honestly", "what can you do about" ("Oh well, it's raining again, what can you
  do." is a sigh); go_to "are you going", "are you heading" (a question about its plans);
- where no cue counts, the probe may not pick a `not_self` skill whose cue the speaker says of
  themselves (`Skill.by_speaker`: "I'll go to the kitchen myself, don't worry about it" was go_to);
- a stop cue exempts an utterance from `other_people` only as a stop phrase of a clause of its own
  ("Honey, stop!" stops; "Stop worrying so much, love." no longer does; since the thirteenth round
  `SkillSet.stop_clause` on the fast path);
- grandma, grandpa and their aliases are in `other_people` ("Grandpa, come and sit with us" was
  follow_me); praise words in `pleasantries` ("Tiny, you're doing a great job." was stop); go_to
  cues "wheel", "scoot" ("Wheel yourself into the bedroom" was none).
Text exact / "none": dev9 100 / 90.4 -> 100 / 92.3, dev10 97.9 / 92.5 -> 97.9 / 96.2, dev11 100 /
88.2 -> 100 / 96.1, dev12 96.5 / 87.8 -> 97.7 / 97.6; nothing worse on any split. Tried and
dropped: "some light", "more light" as aliases of lights' "on" (fixed one dev12 request, broke 15:
"Lights out ..." became on).

**Thirteenth round.** The twelfth held-out set was run once (b4cc2ca: 82.6% exact pooled, text
91.8%; "none" 91.0%, text 95.7%) and became `dev13`. Chosen on the text of dev..dev13:
- a value in a clause of the speaker's own ("I need ...", "I want ...", "I'm ...") or said as the
  subject of "is" / 's is a reason and does not count where another value is said (`_among_several`:
  "Take yourself off to the bathroom, I need the kitchen to myself" was kitchen; "Go to the office,
  the hallway's too cluttered ..." was hallway);
- `CORRECTIONS` "scratch that", "actually"; a dash between words ends a clause ("Bring me a coffee -
  no, scratch that, a glass of water" was coffee);
- a stop phrase that is a clause on its own stops the robot on the fast path, whatever else is said
  (`SkillSet.stop_clause`, `via` "stop_clause": "Stop, don't go to the kitchen after all." was go_to);
  clauses split at punctuation only there ("Halt and Catch Fire was a great TV show.");
- fetch cues "could murder", "could do with", "dying for" ("Tiny, I could murder a coffee." was
  none); pleasantries "that's all", "that'll be all", "for now" ("Thanks, Tiny, that's all for now."
  was stop).
Text exact / "none": dev13 91.8 / 95.7 -> 97.6 / 97.9, dev12 97.7 -> 98.8 exact; nothing worse on any
split. Left on dev13: "Get me my specs, would you, love." (love: said to someone else), "I can't see a
thing, Tiny, lights!" (none), "Stop being silly, Jake, ..." (stop, the safe mistake).

**Fourteenth round (begun).** The thirteenth held-out set was run once (44a4bc9: 86.5% exact
pooled, text 98.7%; "none" 88.6%, text 87.0%) and became `dev14`. Chosen on the text of dev..dev14
so far: lights `unless` "at the lights", "traffic light(s)" ("Turn left at the lights, then ..."
was lights, in dev8 and dev14); what_can_you_do `unless` "that's life", "such is life"; "good boy",
"good girl" in `other_people` (said to a pet: "Good boy, Rex, go fetch the ball!" was fetch). dev14
text "none" 87.0 -> 93.5%, dev8 98.1 -> 100%; nothing worse on any split. Left on dev14: statements
that name an object ("My glasses need a new prescription.", "Grandpa's medicine is on the top
shelf, just so you know." -> fetch), "I'd kill for a decent cup of tea." (fetch coffee: tea is no
object), "Come on Tiny, this way, keep up." (none).

**Fifteenth round (begun).** The fourteenth held-out set was run once (4553b6d: 85.8% exact pooled,
text 96.3%; "none" 80.6%, text 84.4%) and became `dev15`. Chosen on the text of dev..dev15 with the
eighth round's probe: a cue the speaker says with "myself" / "ourselves" does not count for any
skill (`SPEAKER_DOES_IT`, `Skill._speaker_acts`: "I'll get the coffee myself, don't worry about
it." was fetch); fetch `unless` "need(s) (a) new" ("The kids' remote control car needs new
batteries.", dev14's "My glasses need a new prescription."), fetch and go_to `unless` "if anybody",
"if anyone" ("Bathroom's free if anybody needs it." was go_to); lights `unless` "who keeps", "who
left", ... ("Who keeps leaving the kitchen light on all night?"); follow_me cue "tagalong" (Whisper
writes "Tag along" so) and `requires` "tagalong", "shadow" ("Be my shadow for a bit"). dev15 text
96.3 / 84.4 -> 97.5 / 93.3, dev14 "none" 93.5 -> 95.7%, dev6 one line fixed; nothing worse on any
split. Then the probe was refit on dev..dev15 (models/skill_probe.md: on dev9..dev15, which neither
probe's final fit saw, "none" 87.2 -> 94.0% on the text, 85.5 -> 92.8% heard). Left on dev15: "I'm
off to the office, see you all tonight." (go_to, the probe), terms of address taken as someone
else in requests ("..., sweetheart?", "..., would you, love?"), stops said to others.

**Sixteenth round.** The fifteenth held-out set was run once (845a622: 87.7% exact pooled, text
97.4%; "none" 91.1%, text 93.3%) and became `dev16`; two training splits written blind for the
probe, `extra1` and `extra2` (core/skill_data.py), were read too. Chosen on the text of dev..dev16,
extra1, extra2 with the fifteenth round's probe:
- terms of endearment ("love", "honey", "sweetheart", ...) moved from `other_people` to
  `endearments` (`SkillSet.fast_only`): people call the robot so too. 16 requests on the text were
  "none" for it ("Could you bring me a mug of coffee, love?"; dev13, dev15, extra1, extra2); the
  chatter said so to people is "none" on the parser's own evidence (the probe, no cue), except
  stops: with an endearment the stop skill comes only from the fast path ("Honey, stop!"; not
  "Stop worrying so much, love.", "Can't stop, love, I'm late"). Endearments alone ask nothing
  ("Cheers, love.": `asks_nothing`);
- an imperative cue right after a NEGATIONS word is no command ("Don't stop now, sweetie, you're
  nearly done"; `_addressed`); more subjects in NOT_ADDRESSED ("they're freezing": "freeze" was a
  stop cue, and "Take a blanket to the kids, they're freezing in the living room." went to go_to);
- where no cue counts, the probe may not pick any skill when the speaker says they do it
  themselves (`does_it_myself`: "I'll answer the front door myself." was go_to); "myself" with a
  negation does not count (`_says_myself`: "I can't reach it myself");
- stop cues and phrases "quit it", "knock it off", "pack it in", phrases "cut it out", "that's
  enough", "enough" ("Pack it in, Tiny." was go_to); fetch `unless` "who wants", "anybody want",
  "anyone want", ... (an offer to all: "Who wants coffee? I'm making a pot.").
Then the probe was refit on dev..dev16 + extra1 + extra2 (on the three new splits, which the old
probe never saw, its leave-one-split-out "none" 93.0 -> 95.7% on the text, 90.4 -> 93.1% heard),
and PROBE_WEIGHT chosen again (`train skills --loo-probes`: each split parsed with the probe fit
without it, the skill step's scores recorded, weights 0-6 and thresholds 0.3-0.8 swept): on
dev9..extra2, text / heard by piper and espeak, skill and "none" went 99.0 / 95.4% and 93.3 / 94.6%
at weight 1 to 99.3 / 97.0% and 93.9 / 95.8% at weight 3 (4 and 6 no better); the threshold stays
0.5 (0.6: "none" +0.4, skill -0.5 heard).

**Eighteenth round.** The sixteenth and seventeenth held-out sets were run once with the
sixteenth round's parser (ad1e629: 90.1% exact pooled, "none" 98.3%; 5e5a726: 89.3%, "none" 93.6%;
no round came between them) and became `dev17` and `dev18`. Chosen on
the text of every dev split and, new this round, on the 4 voices' Whisper transcripts of
dev..extra2 (cached by `train skills`), comparing the parser before and after on every line where
a rule's outcome differs:
- a choice argument's `pronouns` name a value when none is named as written (`referred_to`; fetch
  person: "him", "his", "he's" -> grandpa, "her", "she's" -> grandma): Whisper tiny bends the name
  ("Take Bramatha her glasses", "Bring Grant by the newspaper, he's been asking for it"), the
  pronoun stays;
- "already" with a speaker subject makes the speaker the one who did it (`SPEAKER_DOES_IT`: "I
  already turned the lights off." was lights); a cue's -ed form after "got", "was", "been", ... is
  a passive (`_passive`: "The meeting got moved to the big office upstairs." was go_to); a clause
  that starts with a subject and an -ed verb tells what happened, and the probe may not pick a
  skill for it (`tells_past`: "Grandpa nodded off reading the paper." was fetch); "you'd", "you've"
  are the robot's words ("I think you'd best go dock at the charging station"); go_to `unless` "go
  get", "go fetch", ... ("Could you go get my keys from the hallway?" was go_to);
- a correction may start inside a clause (`MID_CORRECTIONS`: "Go to the bedroom no wait, the
  bathroom."), a value in a clause that says how things are is a reason where another is said
  (`_states`: "Go on into the bathroom, Tiny, the kitchen floor's still wet."), and aliases for
  what Whisper tiny writes: "lou" (loo), "whole light", "hull light" (hall light), "light soft",
  "shutter of" (lights off, shut off), "no weight" (no wait).
Against the parser before the round: on the text 3 requests and 3 chatter lines fixed, as heard
145 requests fixed (of them 99 by the pronouns and the first rules), nothing worse anywhere. And
asr_node's `vad.min_silence_ms` went from 300 to 400 ms: the piper voice pauses at commas, and
its lines (requests and chatter) of dev9..dev18 were cut in two 125 times of 1324 at 300 ms,
once at 400.

**Nineteenth round (begun).** The eighteenth held-out set was run once (2fad2d5: 89.6% exact
pooled, text 98.6%; "none" 94.8%, text 96.8%) and became `dev19`. On its text: stop cue and phrase
"stay put" ("Hang on, stay put, don't go any further." was none); fetch `unless` "your own" ("Bring
your own blanket if you're camping with us, Jenny." was fetch). Nothing else changed on any split's
text or transcripts. After the nineteenth set was run (`dev20`): "I meant" starts a correction
("Go to the office sorry, I meant the hallway." was office, as piper's transcript dropped the dash;
no line of any split's text or cached transcripts changes). Tried and dropped: a skill whose choice argument without a default is named
nowhere, not even nearly, may not be chosen ("Go team!" is go_to office): 28 requests on the text
lost, 0 gained ("I'm parched, get me something to drink"; "Head to the entrance ..."), and for go_to
alone 6 on the text and 24 heard lost for one chatter line heard.

**Stop.** `SkillSet.match_phrase` maps whole utterances such as "stop", "halt!", "stop, stop"
to an argument-less skill declared with `phrases:` without the LLM (microseconds): assistant_node
calls it in the subscription callback, before the bounded queue, so a stop is published at once
and never dropped because the LLM is busy.
"""
from __future__ import annotations

import json
import re
import string
import time
from functools import lru_cache
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NONE = "none"  # the skill of an utterance that asks for no skill
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
ARG_TYPES = ("choice", "text")
SKILL_KEYS = {"description", "arguments", "confirm", "ask", "phrases", "cues", "imperative", "not_self", "requires",
              "unless"}
ARG_KEYS = {"choice": {"type", "values", "default", "aliases", "pronouns", "last_named", "description"},
            "text": {"type", "max_chars", "description"}}
EXAMPLE_KEYS = {"text", "skill", "arguments"}
TOP_KEYS = {"skills", "examples", "other_people", "endearments", "pleasantries"}
ROBOT_NAMES = {"robot", "tiny"}  # what the operator calls the robot
FILLERS = ROBOT_NAMES | {"please", "hey", "now", "ok", "okay", "right", "just"}
MAX_PHRASE_WORDS = 12
MAX_FAST_CHARS = 40 * MAX_PHRASE_WORDS  # longer text skips the fast path (it runs in a subscription callback)
# A short utterance this similar to a phrase (difflib ratio of the two without spaces) takes the
# fast path too: Whisper tiny splits and bends short commands ("Emergencies top.", "Stomp." for
# "emergency stop" / "stop" in the dev split's speech, 0.89 each). 0.88 keeps "who" (0.86 to
# "whoa") out; a stop heard where none was said is the safe mistake.
FUZZY_PHRASE_RATIO = 0.88
FUZZY_PHRASE_WORDS = 3


def default_skills_file() -> Path:
    """config/skills.yaml next to the sources (checkout), else in the installed share folder."""
    here = Path(__file__).resolve().parents[2] / "config" / "skills.yaml"
    if here.is_file():
        return here
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory("tinyalign_ros")) / "config" / "skills.yaml"


class SkillsError(ValueError):
    """The skills file is malformed; the message says where and what is allowed."""


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def _tokens(text: str) -> list[str]:
    """The lowercase words of `text` (letters, digits, apostrophes; a typographic apostrophe read as
    '), punctuation dropped: what every word match of this module compares."""
    return re.findall(r"[a-z0-9']+", text.lower().replace("\u2019", "'"))


def normalize_phrase(text: str) -> str:
    """Lowercase words without punctuation, fillers dropped and immediate repetitions folded:
    "Stop, stop, STOP please!" -> "stop"."""
    words = [w for w in _tokens(text) if w not in FILLERS]
    for n in range(1, len(words) // 2 + 1):  # "stop stop stop", "stop it stop it"
        unit = words[:n]
        if len(words) % n == 0 and unit * (len(words) // n) == words:
            words = unit
            break
    return " ".join(words)


ARTICLES = {"a", "an", "the", "my", "your", "his", "her", "their", "some"}
VOWELS = set("aeiou")


def inflections(word: str) -> set[str]:
    """The regular inflections of an English word: -s/-es, -ed/-d, -ing, with a final e dropped
    ("move" -> "moving"), a final consonant doubled ("stop" -> "stopping") and y -> ies/ied.
    Home-made on purpose: the cue words are a handful of verbs and nouns, and generating their
    forms (rather than stemming what was said with a stemmer library) cannot make two different
    words equal ("here" and "her" both stem to "her")."""
    forms = {word, word + "s", word + "es", word + "ed", word + "ing"}
    if word.endswith("e"):
        forms |= {word + "d", word[:-1] + "ing"}
    if word.endswith("y") and len(word) > 2 and word[-2] not in VOWELS:
        forms |= {word[:-1] + "ies", word[:-1] + "ied"}
    if (len(word) >= 3 and word[-1] not in VOWELS | {"w", "x", "y"} and word[-2] in VOWELS
            and word[-3] not in VOWELS):  # one vowel before one consonant: stop -> stopped, stopping
        forms |= {word + word[-1] + "ed", word + word[-1] + "ing"}
    return forms


@lru_cache(maxsize=None)
def _cue_forms(cue: str, inflected: bool) -> tuple[frozenset[str], ...]:
    """Per word of a cue, the forms it may be heard in: the word (`inflected`: any of its
    `inflections`; a word with an apostrophe, "don't", as written)."""
    return tuple(frozenset(inflections(w) if inflected and "'" not in w else {w}) for w in cue.split())


# Third round (module docstring): where in what was said a cue counts.
# A clause ends at punctuation and before these words ("stay close and follow me").
CLAUSE_BREAKS = {"and", "then", "but"}
# Said before a command to the robot without changing it: dropped from a clause's start (and not
# counted as words before an imperative cue).
LEAD_INS = FILLERS | {"oh", "no", "whoa", "yes", "well", "can", "could", "would", "will", "you", "come", "on"}
LEAD_IN_PHRASES = (("i", "want", "you", "to"), ("i", "need", "you", "to"), ("i'd", "like", "you", "to"),
                   ("i", "would", "like", "you", "to"), ("you", "need", "to"), ("you", "have", "to"),
                   ("i", "told", "you", "to"))
# A word before an imperative cue that makes the clause about someone or something else, or a
# question ("I can't stop thinking", "did you follow the news", "how do I stop my dog").
NOT_ADDRESSED = {"i", "i'm", "i've", "i'd", "i'll", "we", "we're", "we've", "we'll", "we'd", "he", "he's", "he'll",
                 "she", "she's", "she'll", "they", "they're", "they've", "they'll", "they'd", "it", "it's",
                 "there", "my", "our", "his", "her", "their", "its", "how", "what", "when", "where", "why", "who",
                 "which", "did", "does", "do", "is", "are", "was", "were", "has", "have", "had"}
# Words that may follow an imperative cue at the end of its clause ("stop it right now", "I said stop").
CUE_TAIL = FILLERS | {"there", "here", "immediately", "it", "that", "this", "at", "once", "away", "moving", "all"}
# A word right before a cue that ends its clause which makes the cue a noun ("come to a halt", "my
# stop") or another subject's verb ("this headache would stop", "it won't stop"): not a command.
NOT_BARE_COMMAND = ARTICLES | {"this", "that", "our", "its", "bus", "would", "will", "won't", "wouldn't", "to", "can't",
                               "cannot", "couldn't", "didn't", "doesn't", "don't", "never", "might", "may", "shall"}
# A subject before a `not_self` skill's cue that makes the speaker the one who acts ("I'm going out
# to the garden", "I need to go to the bank"), unless the robot is named too ("I need you to go").
SPEAKER_SUBJECTS = {"i", "i'm", "i'll", "i've", "i'd", "we", "we're", "we'll", "we'd"}
ROBOT_WORDS = {"you", "you're", "you'll", "you'd", "you've", "yourself"}  # "I think you'd best go ..."
# Words that make the speaker the one who acts for every skill, `not_self` or not, said with a
# SPEAKER_SUBJECTS subject before the cue ("I'll get the coffee myself, don't worry about it"), or
# the one who has done it ("I already turned the lights off."; eighteenth round).
SPEAKER_DOES_IT = {"myself", "ourselves", "already"}
# Words that negate what follows: a cue right after one is no command ("don't stop now", "can't
# stop, I'm late"), "myself" in a clause with one no action of the speaker's ("I can't reach it myself").
NEGATIONS = {"not", "never", "don't", "can't", "cannot", "couldn't", "won't", "wouldn't", "didn't", "doesn't"}
# Said right before a cue's -ed form, these make it a passive or a report ("The meeting got moved to
# the big office upstairs.", "The bus stop's been moved again"): no request (eighteenth round).
PASSIVE_AUX = {"got", "get", "gets", "getting", "was", "were", "been", "be", "being", "is", "are"}
# Subjects that, followed by an -ed verb at a clause's start, tell what happened ("Grandpa nodded off
# reading the paper.", "I burned the toast again"): `tells_past` (eighteenth round).
NARRATORS = {"i", "we", "he", "she", "they", "someone", "somebody", "everybody", "everyone"}
SELF_QUESTION = re.compile(r"^(?:(?:how|where|what|when|why|which) )?(?:should|shall|do|did|must) (?:i|we)\b")


def _clauses(text: str, breaks: bool = True) -> list[list[str]]:
    """The clauses of `text` as `_tokens`: split at punctuation, a dash between words and (`breaks`)
    CLAUSE_BREAKS."""
    out = []
    for part in re.split(r"[,.!?;:]+|\s[-\u2013\u2014]+\s", text.lower().replace("\u2019", "'")):
        clause: list[str] = []
        for w in _tokens(part) + [""]:
            if (breaks and w in CLAUSE_BREAKS) or not w:
                out += [clause] if clause else []
                clause = []
            else:
                clause.append(w)
    return out


def _without_lead_in(words: list[str]) -> list[str]:
    """`words` less the lead-in words and phrases they start with ("please can you", "I want you to")."""
    i, more = 0, True
    while more and i < len(words):
        more = False
        if words[i] in LEAD_INS:
            i, more = i + 1, True
        for ph in LEAD_IN_PHRASES:
            if tuple(words[i:i + len(ph)]) == ph:
                i, more = i + len(ph), True
    return words[i:]


def _said_at(clause: list[str], cue: str, inflected: bool) -> list[int]:
    """Where in `clause` the cue's words start, in order (`_cue_forms`)."""
    forms = _cue_forms(cue, inflected)
    return [i for i in range(len(clause) - len(forms) + 1)
            if all(w in f for w, f in zip(clause[i:i + len(forms)], forms))]


def _addressed(clause: list[str], start: int, end: int) -> bool:
    """Whether a cue said at clause[start:end] is a command to the robot: at most two words before
    it, none of them a subject or question word and the first not an article ("please stop moving",
    "walk behind me", "cut the motors"), or nothing but CUE_TAIL after it ("I said stop") and no
    NOT_BARE_COMMAND word right before it ("come to a halt", "this headache would stop"); never right
    after a NEGATIONS word ("don't stop now, you're nearly done")."""
    if start and clause[start - 1] in NEGATIONS:
        return False
    before = [w for w in _without_lead_in(clause[:start]) if w not in LEAD_INS]
    after = [w for w in clause[end:] if w not in CUE_TAIL]
    bare = not after and not (start > 0 and clause[start - 1] in NOT_BARE_COMMAND)
    return bare or (len(before) <= 2 and not set(before) & NOT_ADDRESSED
                    and not (before and before[0] in ARTICLES))


def _passive(clause: list[str], start: int, cue: str) -> bool:
    """Whether the cue said at clause[start] is said in an -ed form right after a PASSIVE_AUX word
    ("got moved", "been moved")."""
    word = clause[start]
    return (start > 0 and clause[start - 1] in PASSIVE_AUX and word.endswith("ed")
            and word != cue.split()[0])


def _by_speaker(clause: list[str], start: int) -> bool:
    """Whether a cue said at clause[start] is the speaker's own action (`not_self` skills)."""
    before = set(clause[:start])
    return bool(before & SPEAKER_SUBJECTS) and not before & ROBOT_WORDS


def _says_myself(clause: list[str]) -> bool:
    """Whether the clause says "myself" / "ourselves" / "already" without a negation ("I'll do it
    myself", "I already turned the lights off"; not "I can't reach it myself")."""
    return bool(SPEAKER_DOES_IT.intersection(clause)) and not NEGATIONS.intersection(clause)


def does_it_myself(text: str) -> bool:
    """Whether the speaker says they do something themselves (`_says_myself`, with a speaker subject
    before "myself": "I'll answer the front door myself")."""
    return any(w in SPEAKER_DOES_IT and _says_myself(c) and _by_speaker(c, i)
               for c in _clauses(text) for i, w in enumerate(c))


def tells_past(text: str, others: tuple[str, ...] = ()) -> bool:
    """Whether a clause of `text` starts (after its lead-in) with one of NARRATORS or `others`
    (`other_people`) and a verb in -ed ("Grandpa nodded off reading the paper.", "I switched
    energy providers last month"; not "I need ...", "I'm parched"): it tells what happened."""
    for clause in _clauses(text):
        words = _without_lead_in(clause)
        if (len(words) > 1 and (words[0] in NARRATORS or words[0] in others)
                and words[1].endswith("ed") and not words[1].endswith("eed")):
            return True
    return False


def _unpossessed(words: list[str]) -> list[str]:
    """`words` with a possessive 's dropped ("grandpa's", "the light's on")."""
    return [w[:-2] if w.endswith("'s") else w for w in words]


def _words(text: str | list[str]) -> list[str]:
    """`_tokens` (of `text`, or the tokens given) with a possessive 's and a plural -s dropped
    ("grandpa's", "keys"): how values are compared."""
    words = _unpossessed(_tokens(text) if isinstance(text, str) else text)
    return [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words]


def _forms(arg: "Argument", aliases: bool = True) -> list[tuple[str, list[str]]]:
    """(value, its words without articles) for the value, its spoken form and (`aliases`) its
    aliases. A spoken form that is only "you" (the robot's word for the operator: person me ->
    "you") is not matched: in the operator's mouth "you" is the robot ("can you get grandpa ...")."""
    return [(value, words) for value, spoken in arg.values.items()
            for form in {value, spoken, *(arg.aliases.get(value, ()) if aliases else ())}
            if (words := [w for w in _words(form) if w not in ARTICLES]) and words != ["you"]]


# A choice value is heard "nearly" when no value is named as written and a run of words of what was
# said, spaces dropped, is this similar (difflib ratio) to a value's form and starts with the same
# letter: Whisper tiny bends names ("Grandpa Glass of Watcher", "Take the phone to grammar" in the
# dev splits' speech). Values of >= 4 letters only; chosen on the dev splits' Whisper transcripts.
FUZZY_VALUE_RATIO = 0.7


def mentioned(text: str, arg: "Argument", fuzzy: bool = False) -> set[str]:
    """The values of a choice argument that `text` names (the value or its spoken form, articles
    and plural -s ignored, as whole words): grounding evidence added to the LLM's score. With
    `fuzzy`, when none is named as written, the one value a pronoun refers to (`referred_to`), else
    the one value nearly named (`nearly_mentioned`), if any."""
    heard = _words(text)
    said = f" {' '.join(heard)} "
    out = {value for value, words in _forms(arg) if f" {' '.join(words)} " in said}
    if len(out) > 1:
        out = _among_several(text, arg, out)
    return out if out or not fuzzy else referred_to(text, arg) or nearly_mentioned(heard, arg)


def referred_to(text: str, arg: "Argument") -> set[str]:
    """The one value of `arg` one of whose `pronouns` `text` says, if only one value's is said
    ("Bring Grant by the newspaper, he's been asking for it", "Take Bramatha her glasses": Whisper
    tiny bends the name, the pronoun stays; eighteenth round, on the dev splits' Whisper
    transcripts 107 person arguments right, none wrong)."""
    said = set(_tokens(text))
    hit = {value for value, words in arg.pronouns.items() if said.intersection(words)}
    return hit if len(hit) == 1 else set()


# Said before a `last_named` value in its clause, these make it a report of how things are ("Somebody
# left it on again", "The light is still on"), not the value asked for (twelfth round).
REPORTS = {"left", "still", "is", "are", "was", "were", "been"}
# A clause that starts with one of these takes back what was said before it ("Go to the bathroom,
# no wait, the bedroom", "Fetch my phone, sorry, I mean my glasses"; tenth round).
CORRECTIONS = (("no",), ("sorry",), ("wait",), ("i", "mean"), ("i", "meant"), ("make", "that"), ("or", "rather"),
               ("scratch", "that"), ("actually",))
# Said inside a clause, these start a correction too: Whisper drops the comma or dash before them
# ("Go to the bedroom no wait, the bathroom."; eighteenth round).
MID_CORRECTIONS = tuple(c for c in CORRECTIONS if len(c) > 1) + (("no", "wait"), ("no", "weight"), ("no", "sorry"),
                                                                 ("no", "actually"))  # "no weight": Whisper's "no wait"
# Words that make a clause a statement of how things are, as does a word in 's / 're ("the kitchen
# floor's still wet", "you're blocking the kitchen door"): a value said in one is a reason where
# another is said ("Go on into the bathroom, Tiny, the kitchen floor's still wet."; eighteenth round).
STATEMENT_WORDS = {"is", "are", "was", "were", "still"}


def _states(clause: list[str]) -> bool:
    """Whether the clause says how things are (STATEMENT_WORDS, a word in 's or 're but "let's",
    "that's": "That's my glasses for me" is Whisper's "Fetch my glasses for me")."""
    return bool(STATEMENT_WORDS.intersection(clause)) or any(
        w.endswith(("'s", "'re")) and w not in ("let's", "that's") for w in clause)


def _at_corrections(clauses: list[list[str]]) -> list[list[str]]:
    """`clauses`, each also split before a MID_CORRECTIONS phrase said inside it (`_said_at`)."""
    out = []
    for clause in clauses:
        cuts = sorted({i for c in MID_CORRECTIONS for i in _said_at(clause, " ".join(c), False) if i > 0})
        out += [clause[a:b] for a, b in zip([0] + cuts, cuts + [len(clause)])]
    return out


def _among_several(text: str, arg: "Argument", named: set[str]) -> set[str]:
    """Which of several `named` values count: those said from the last correction on where one
    names a value (tenth round: "Go to the bathroom, no wait, the bedroom"), not one said right
    after "not" ("Not the kitchen, the bedroom"; eighth round), not one in a clause of the
    speaker's own ("..., I need the kitchen to myself"), said as the subject of "is" / 's
    ("..., the hallway's too cluttered") or in a clause that says how things are (`_states`:
    "..., the kitchen floor's still wet"): a reason, where another is said (thirteenth and
    eighteenth rounds), and for an argument declared `last_named`, only those of the last clause
    that names one ("Somebody left the light on, turn it off"). A correction may start inside a
    clause (`MID_CORRECTIONS`)."""
    parts = _at_corrections(_clauses(text))
    corrected = [ci for ci, c in enumerate(parts) if ci and any(tuple(c[:len(w)]) == w for w in CORRECTIONS)]
    where = []  # (clause index, value, negated, reported: said after one of REPORTS, aside)
    for ci, clause in enumerate(parts):
        heard = _words(clause)
        speaker = ci not in corrected and bool(set(_without_lead_in(clause)[:1]) & SPEAKER_SUBJECTS)
        states = _states(clause)
        for value, words in _forms(arg):
            for i in _said_at(heard, " ".join(words), False):
                j, end = i - 1, i + len(words)
                while j >= 0 and heard[j] in ARTICLES:
                    j -= 1
                subject = clause[end - 1].endswith("'s") or clause[end:end + 1] in (["is"], ["was"]) or states
                where.append((ci, value, j >= 0 and heard[j] == "not", bool(set(heard[:i]) & REPORTS),
                              speaker or subject))
    for k in reversed(corrected):  # the last correction after which a value is said, and one before it
        if any(ci >= k for ci, v, *_ in where if v in named) and any(ci < k for ci, v, *_ in where if v in named):
            named = {v for ci, v, *_ in where if ci >= k and v in named}
            break
    out = {v for ci, v, negated, *_ in where if v in named and not negated} or named
    if len(out) > 1:  # "..., I need the kitchen to myself", "..., the hallway's too cluttered": a reason
        out = {v for ci, v, *_, aside in where if v in out and not aside} or out
    if arg.last_named and len(out) > 1:  # "left it on", "is still on": the state now, not the one asked for
        out = {v for ci, v, _, reported, _ in where if v in out and not reported} or out
    clauses = [ci for ci, v, *_ in where if v in out]  # none where each value spans a clause break
    if arg.last_named and len(out) > 1 and clauses:
        out = {v for ci, v, negated, *_ in where if ci == max(clauses) and v in out and not negated} or out
    return out


def nearly_mentioned(heard: list[str], arg: "Argument") -> set[str]:
    """The one value of `arg` whose form (not an alias) a run of the words `heard` (`_words`),
    spaces dropped, is FUZZY_VALUE_RATIO similar to and starts like, if any: `mentioned(fuzzy=True)`
    when nothing is named as written."""
    from difflib import SequenceMatcher

    best, pick = FUZZY_VALUE_RATIO, None
    for value, words in _forms(arg, aliases=False):  # aliases are short words ("dock", "out"): too easily near
        target = "".join(words)
        if len(target) < 4:
            continue
        for n in {len(words), len(words) + 1, max(len(words) - 1, 1)}:
            for i in range(len(heard) - n + 1):
                run = "".join(heard[i:i + n])
                if run[:1] != target[:1] or set(heard[i:i + n]) & ARTICLES:
                    continue
                ratio = SequenceMatcher(None, run, target).ratio()
                if ratio >= best and (pick is None or ratio > best):
                    best, pick = ratio, value
    return {pick} if pick is not None else set()


@dataclass(frozen=True)
class Argument:
    name: str
    type: str
    values: dict[str, str] = field(default_factory=dict)  # choice: value -> spoken form
    max_chars: int = 60  # text
    default: str = ""  # choice: the value when the text names none of them ("" = the LLM chooses)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # choice: value -> other words naming it
    pronouns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # choice: value -> words referring to it
    last_named: bool = False  # choice: of values named in different clauses, the last clause's count

    def schema(self) -> dict[str, Any]:
        if self.type == "choice":
            return {"enum": list(self.values)}
        return {"type": "string", "minLength": 1, "maxLength": self.max_chars, "pattern": r"^[^\"\\\n]*$"}

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"argument {self.name} must be a string, got {value!r}")
        if self.type == "choice" and value not in self.values:
            raise ValueError(f"argument {self.name}={value!r} is not one of {sorted(self.values)}")
        if self.type == "text" and not 0 < len(value) <= self.max_chars:
            raise ValueError(f"argument {self.name} must have 1..{self.max_chars} characters")
        return value

    def spoken(self, value: str) -> str:
        return self.values.get(value, value)


@dataclass(frozen=True)
class Skill:
    name: str
    description: str
    arguments: tuple[Argument, ...] = ()
    confirm: str = ""
    ask: str = ""
    phrases: tuple[str, ...] = ()
    cues: tuple[str, ...] = ()  # words that signal this skill (evidence added to the LLM's score)
    imperative: bool = False  # its cues count only said as a command to the robot (`cued`)
    requires: tuple[str, ...] = ()  # words one of which must be said for the skill to be chosen
    not_self: bool = False  # its cues do not count where the speaker is the one who acts (`cued`)
    unless: tuple[str, ...] = ()  # words or phrases any of which, said, rule the skill out

    def cued(self, text: str, inflected: bool = True) -> bool:
        """Whether `text` says one of the cues as whole words, as written or (`inflected`) in any
        regular inflection of each word ("following", "lights", "switched" say "follow", "light",
        "switch"), where it counts: not in a clause that asks what the speaker should do ("should
        I take the train or drive?", "how do I turn off ..."), for an `imperative` skill only as a
        command to the robot (`_addressed`: "please stop", not "I can't stop thinking"), for a
        `not_self` skill not where the speaker is the subject (`_by_speaker`: "I'm going out", not
        "I need you to go"), and for a skill that `requires` words only when one of them is said
        too ("turn off the lights", not "turn off notifications")."""
        if not self.allowed(text):
            return False
        for clause in _clauses(text):
            if SELF_QUESTION.match(" ".join(_without_lead_in(clause))):
                continue
            for cue in self.cues:
                n = len(cue.split())
                if any((not self.imperative or _addressed(clause, i, i + n)) and not self._speaker_acts(clause, i)
                       and not _passive(clause, i, cue) for i in _said_at(clause, cue, inflected)):
                    return True
        return False

    def _speaker_acts(self, clause: list[str], start: int) -> bool:
        """Whether the cue said at clause[start] is the speaker's own action (`_by_speaker`): for a
        `not_self` skill, or for any skill in a clause that says "myself" ("I'll get it myself";
        `_says_myself`)."""
        return (self.not_self or _says_myself(clause)) and _by_speaker(clause, start)

    def allowed(self, text: str) -> bool:
        """False when the skill `requires` words and `text` says none of them, or `text` says one of
        its `unless` phrases as written ("Oh well, what can you do."): it cannot be chosen."""
        if not self.unless and not self.requires:
            return True
        clauses = _clauses(text)
        if any(_said_at(c, u, False) for c in clauses for u in self.unless):
            return False
        return not self.requires or any(_said_at(_unpossessed(c), r, True)  # "the light's on"
                                        for c in clauses for r in self.requires)

    def by_speaker(self, text: str) -> bool:
        """Whether one of the skill's cues is said with the speaker as the one who acts (`_speaker_acts`:
        "I'll go to the kitchen myself"): then the skill probe may not pick it (`choose`)."""
        return any(self._speaker_acts(c, i) for c, i, _ in self._cues_said(text))

    def not_asked(self, text: str) -> bool:
        """Whether one of the skill's cues is said right after a NEGATIONS word ("Don't stop now,
        you're nearly done"; sixteenth round) or as a passive ("The meeting got moved to the big
        office upstairs."; `_passive`, eighteenth round): then the skill probe may not pick it
        (`choose`)."""
        return any((i and c[i - 1] in NEGATIONS) or _passive(c, i, cue) for c, i, cue in self._cues_said(text))

    def _cues_said(self, text: str):
        """(clause, start, cue) of every cue of the skill said in `text`, in any inflection (`_said_at`)."""
        return ((c, i, cue) for c in _clauses(text) for cue in self.cues for i in _said_at(c, cue, True))

    @property
    def arguments_by_name(self) -> dict[str, Argument]:
        return {a.name: a for a in self.arguments}

    def schema(self) -> dict[str, Any]:
        props = {a.name: a.schema() for a in self.arguments}
        return {"type": "object", "properties": {
            "skill": {"const": self.name},
            "arguments": {"type": "object", "properties": props, "required": list(props),
                          "additionalProperties": False}},
            "required": ["skill", "arguments"], "additionalProperties": False}

    def signature(self) -> str:
        """One prompt line: `go_to(place: kitchen | living room | ...): Drive to a place.`"""
        args = ", ".join(f"{a.name}: {' | '.join(a.values)}" if a.type == "choice" else f"{a.name}: text"
                         for a in self.arguments)
        return f"{self.name}({args}): {self.description}"


@dataclass(frozen=True)
class SkillCall:
    """One checked skill call (skill NONE: the utterance asks for no skill)."""

    skill: str
    arguments: dict[str, str] = field(default_factory=dict)
    confidence: float = 1.0
    text: str = ""  # what it was made from
    via: str = "llm"  # "llm", "phrase" (the fast path), "no_cue" (no skill's cue word said), "probe" (no
    # cue said: the skill probe alone), "empty" (nothing but fillers and thanks: "", "Tiny.", "okay",
    # "great, cheers"), "others" (said to another person: "Honey, ...", `SkillSet.to_someone_else`) or
    # "stop_doing" ("stop driving ...": `SkillSet.stop_doing`) or "stop_clause" ("Stop, don't go ...":
    # `SkillSet.stop_clause`)
    seconds: float = 0.0  # time spent making it

    @property
    def is_none(self) -> bool:
        return self.skill == NONE

    def to_json(self) -> str:
        return json.dumps({"skill": self.skill, "arguments": self.arguments}, sort_keys=True)

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, sort_keys=True)


@dataclass(frozen=True)
class Example:
    text: str
    skill: str
    arguments: dict[str, str]


class SkillSet:
    def __init__(self, skills: list[Skill], examples: list[Example] = (), source: str = "skills",
                 other_people: tuple[str, ...] = (), pleasantries: tuple[str, ...] = (),
                 endearments: tuple[str, ...] = ()) -> None:
        self.skills = {s.name: s for s in skills}
        self.examples = list(examples)
        self.source = source
        # terms of address for people, for people or the robot, and words of thanks, each as
        # `_tokens` joined by spaces
        self.other_people = tuple(other_people)
        self.endearments = tuple(endearments)
        self.pleasantries = tuple(pleasantries)
        self._phrases = {p: s.name for s in skills for p in s.phrases}
        # the -ing forms of the other skills' cue verbs ("driving", "following"): what a stop stops
        self._doing = {f for s in skills if not s.phrases for c in s.cues for f in inflections(c.split()[0])
                       if f.endswith("ing")}

    # ------------------------------------------------------------------ loading and checking
    @classmethod
    def load(cls, path: str | Path) -> "SkillSet":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise SkillsError(f"cannot read the skills file {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise SkillsError(f"{path}: not valid YAML: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "skills") -> "SkillSet":
        def fail(where: str, what: str) -> SkillsError:
            return SkillsError(f"{source}: {where}: {what}")

        def mapping(value: Any, where: str, keys: set[str] | None = None) -> dict:
            if not isinstance(value, dict):
                raise fail(where, f"must be a mapping, got {type(value).__name__}")
            if keys is not None and set(value) - keys:
                raise fail(where, f"unknown key(s) {sorted(map(str, set(value) - keys))}; allowed: {sorted(keys)}")
            return value

        def text(value: Any, where: str, required: bool = True) -> str:
            if not isinstance(value, str) or (required and not value.strip()):
                raise fail(where, f"must be a non-empty string, got {value!r}"
                           + (" (quote on/off/yes/no: YAML reads them as booleans)" if isinstance(value, bool) else ""))
            return value.strip()

        data = mapping(data, "top level", TOP_KEYS)
        raw_skills = mapping(data.get("skills"), "skills")
        if not raw_skills:
            raise fail("skills", "declares no skill")
        skills: list[Skill] = []
        for name, raw in raw_skills.items():
            where = f"skills.{name}"
            if not isinstance(name, str) or not NAME_RE.match(name) or name == NONE:
                raise fail(where, f"a skill name is lowercase letters, digits and _ (and not '{NONE}')")
            raw = mapping(raw, where, SKILL_KEYS)
            if "description" not in raw:
                raise fail(where, "needs a description (the LLM reads it)")
            args: list[Argument] = []
            for arg_name, raw_arg in mapping(raw.get("arguments") or {}, f"{where}.arguments").items():
                aw = f"{where}.arguments.{arg_name}"
                if not isinstance(arg_name, str) or not NAME_RE.match(arg_name):
                    raise fail(aw, "an argument name is lowercase letters, digits and _")
                raw_arg = mapping(raw_arg, aw)
                kind = raw_arg.get("type")
                if kind not in ARG_TYPES:
                    raise fail(f"{aw}.type", f"must be one of {list(ARG_TYPES)}, got {kind!r}")
                mapping(raw_arg, aw, ARG_KEYS[kind])
                if kind == "choice":
                    values = raw_arg.get("values")
                    if isinstance(values, list):
                        values = {text(v, f"{aw}.values"): text(v, f"{aw}.values") for v in values}
                    values = {text(k, f"{aw}.values"): text(v, f"{aw}.values.{k}")
                              for k, v in mapping(values, f"{aw}.values").items()}
                    if not values:
                        raise fail(f"{aw}.values", "a choice needs at least one value")
                    if any('"' in v or "\\" in v for v in values):
                        raise fail(f"{aw}.values", "values may not contain quotes or backslashes")
                    default = raw_arg.get("default", "")
                    if default and default not in values:
                        raise fail(f"{aw}.default", f"{default!r} is not one of the values {sorted(values)}")

                    def words_of_values(key: str, one_word: bool = False) -> dict[str, tuple[str, ...]]:
                        """{value: words} of `aliases:` / `pronouns:` (one word each), checked."""
                        out = {}
                        for value, forms in mapping(raw_arg.get(key) or {}, f"{aw}.{key}").items():
                            value = text(value, f"{aw}.{key}")  # a bare on/off key: YAML made it a boolean
                            if value not in values:
                                raise fail(f"{aw}.{key}", f"{value!r} is not one of the values {sorted(values)}")
                            if not isinstance(forms, list) or not forms:
                                raise fail(f"{aw}.{key}.{value}", "must be a non-empty list of words or phrases")
                            out[value] = tuple(text(f, f"{aw}.{key}.{value}") for f in forms)
                            if one_word and any(len(f.split()) != 1 for f in out[value]):
                                raise fail(f"{aw}.{key}.{value}", "must be single words")
                        return out

                    aliases, pronouns = words_of_values("aliases"), words_of_values("pronouns", one_word=True)
                    last_named = raw_arg.get("last_named", False)
                    if not isinstance(last_named, bool):
                        raise fail(f"{aw}.last_named", f"must be true or false, got {last_named!r}")
                    args.append(Argument(arg_name, kind, values, default=default, aliases=aliases,
                                         pronouns={v: tuple(w.lower() for w in ws) for v, ws in pronouns.items()},
                                         last_named=last_named))
                else:
                    max_chars = raw_arg.get("max_chars", 60)
                    if not isinstance(max_chars, int) or isinstance(max_chars, bool) or not 1 <= max_chars <= 200:
                        raise fail(f"{aw}.max_chars", f"must be an integer 1..200, got {max_chars!r}")
                    args.append(Argument(arg_name, kind, max_chars=max_chars))
            names = {a.name for a in args}
            templates = {}
            for key in ("confirm", "ask"):
                if key in raw:
                    templates[key] = text(raw[key], f"{where}.{key}")
                    try:
                        unknown = set(_fields(templates[key])) - names
                    except ValueError as exc:
                        raise fail(f"{where}.{key}", f"not a valid template: {exc}") from exc
                    if unknown:
                        raise fail(f"{where}.{key}", f"names {sorted(unknown)}, not arguments of {name} "
                                                     f"({sorted(names) or 'it has none'})")
            phrases = raw.get("phrases") or []
            if not isinstance(phrases, list):
                raise fail(f"{where}.phrases", "must be a list of utterances")
            if phrases and args:
                raise fail(f"{where}.phrases", "only a skill without arguments can have phrases")
            normalized = []
            for p in phrases:
                n = normalize_phrase(text(p, f"{where}.phrases"))
                if not n or len(n.split()) > MAX_PHRASE_WORDS:
                    raise fail(f"{where}.phrases", f"{p!r} is empty once fillers are dropped, or too long")
                normalized.append(n)
            cues = raw.get("cues") or []
            if not isinstance(cues, list):
                raise fail(f"{where}.cues", "must be a list of words or phrases")
            cues = tuple(" ".join(_tokens(text(c, f"{where}.cues"))) for c in cues)
            imperative, not_self = raw.get("imperative", False), raw.get("not_self", False)
            for key, flag in (("imperative", imperative), ("not_self", not_self)):
                if not isinstance(flag, bool):
                    raise fail(f"{where}.{key}", f"must be true or false, got {flag!r}")
            requires = raw.get("requires") or []
            if not isinstance(requires, list):
                raise fail(f"{where}.requires", "must be a list of words or phrases")
            requires = tuple(" ".join(_tokens(text(r, f"{where}.requires"))) for r in requires)
            unless = raw.get("unless") or []
            if not isinstance(unless, list):
                raise fail(f"{where}.unless", "must be a list of words or phrases")
            unless = tuple(" ".join(_tokens(text(u, f"{where}.unless"))) for u in unless)
            skills.append(Skill(name, text(raw["description"], f"{where}.description"), tuple(args),
                                templates.get("confirm", ""), templates.get("ask", ""), tuple(normalized), cues,
                                imperative, requires, not_self, unless))
        seen: dict[str, str] = {}
        for s in skills:
            for p in s.phrases:
                if seen.setdefault(p, s.name) != s.name:
                    raise fail(f"skills.{s.name}.phrases", f"{p!r} is also a phrase of {seen[p]}")
        lists = {}
        for key in ("other_people", "endearments", "pleasantries"):
            words = data.get(key) or []
            if not isinstance(words, list):
                raise fail(key, "must be a list of words or phrases")
            lists[key] = tuple(" ".join(_tokens(text(w, key))) for w in words)
        skill_set = cls(skills, source=source, **lists)
        raw_examples = data.get("examples") or []
        if not isinstance(raw_examples, list):
            raise fail("examples", "must be a list")
        for i, raw in enumerate(raw_examples):
            where = f"examples[{i}]"
            raw = mapping(raw, where, EXAMPLE_KEYS)
            call = {"skill": raw.get("skill"), "arguments": raw.get("arguments") or {}}
            try:
                skill_set.check(call)
            except ValueError as exc:
                raise fail(where, str(exc)) from exc
            skill_set.examples.append(Example(text(raw.get("text"), f"{where}.text"), call["skill"],
                                              dict(call["arguments"])))
        return skill_set

    def select(self, names: list[str]) -> "SkillSet":
        """Only the named skills (a robot that implements a subset); an unknown name is an error."""
        unknown = [n for n in names if n not in self.skills]
        if unknown:
            raise SkillsError(f"{self.source}: unknown skill(s) {unknown}; declared: {sorted(self.skills)}")
        kept = [s for n, s in self.skills.items() if n in names]
        return SkillSet(kept, [e for e in self.examples if e.skill in names or e.skill == NONE], self.source,
                        self.other_people, self.pleasantries, self.endearments)

    def stop_doing(self, text: str) -> str | None:
        """The safety skill (one with `phrases`: stop) when one of its cues is said as a command
        right before the -ing form of another skill's cue verb ("Please stop driving toward the
        kitchen", "stop following me"; tenth round): the robot stops what that skill does, whatever
        else is named. Not after a word that makes the cue no command ("don't stop moving", "I
        can't stop following the news": `_addressed`), nor before other verbs ("stop worrying")."""
        if len(text) > MAX_FAST_CHARS:
            return None
        clauses = _clauses(text)
        for skill in (s for s in self.skills.values() if s.phrases):
            for clause in clauses:
                for cue in skill.cues:
                    n = len(cue.split())
                    for i in _said_at(clause, cue, False):
                        if (i + n < len(clause) and clause[i + n] in self._doing
                                and not (i and clause[i - 1] in NOT_BARE_COMMAND) and _addressed(clause, i, i + n)):
                            return skill.name
        return None

    def fast_call(self, text: str) -> SkillCall | None:
        """What is decided without the LLM and without waiting in assistant_node's queue: a stop
        phrase (`match_phrase`), a stop cue before what the robot is doing (`stop_doing`), or a stop
        phrase as a clause of its own (`stop_clause`)."""
        t0 = time.perf_counter()
        call = self.match_phrase(text)
        if call is None and (name := self.stop_doing(text)) is not None:
            call = SkillCall(name, {}, 1.0, text, "stop_doing", time.perf_counter() - t0)
        if call is None and (name := self.stop_clause(text)) is not None:
            call = SkillCall(name, {}, 1.0, text, "stop_clause", time.perf_counter() - t0)
        return call

    def asks_nothing(self, text: str) -> bool:
        """Whether `text` is nothing but FILLERS and `pleasantries` ("", "Tiny.", "Great, cheers.",
        "No worries."; seventh and eighth rounds: the probe alone took such short ones for stop), and
        `endearments` ("Cheers, love."). A pleasantry of several words counts only as a whole ("no
        worries"; "no" alone is none)."""
        said = f" {' '.join(_tokens(text))} "
        words = self.pleasantries + self.endearments  # "Cheers, love."
        for phrase in (p for p in words if " " in p):
            while f" {phrase} " in said:
                said = said.replace(f" {phrase} ", " ")
        return not set(said.split()) - FILLERS - set(words)

    def stop_clause(self, text: str) -> str | None:
        """The skill (stop) one of whose `phrases` that says its cue is a clause of `text` on its own
        ("Stop, don't go to the kitchen after all." was go_to, thirteenth round; "Honey, stop!",
        "Love, stop moving."): the robot stops whatever else is said, and whoever else is spoken to.
        Not "Stop worrying so much, love." (twelfth round: was a stop) nor "Hold on, love" (no cue)."""
        if len(text) > MAX_FAST_CHARS:
            return None
        for clause in (" ".join(c) for c in _clauses(text, breaks=False)):  # "Halt and Catch Fire was ..."
            name = self._phrases.get(normalize_phrase(clause))
            if name is not None and self.skills[name].cued(clause):
                return name
        return None

    def to_someone_else(self, text: str) -> bool:
        """Whether `text` addresses another person (ninth round): one of `other_people` is a clause
        of its own ("Mum, have you seen the keys?", "Your medicine, Dad.") and the robot is not named
        ("Tiny, ..."). Terms of endearment ("love", "honey") are no such sign since the sixteenth
        round (`endearments`, `fast_only`)."""
        clauses = [" ".join(c) for c in _clauses(text)]
        return (any(c in self.other_people for c in clauses)
                and not any(w in ROBOT_NAMES for c in clauses for w in c.split()))

    def fast_only(self, text: str) -> set[str]:
        """The skills `text` may name only on the fast path (`fast_call`): the safety skill (one with
        `phrases`: stop) where one of `endearments` is a clause of its own ("Stop worrying so much,
        love.", "Stop by the bakery on your way home, honey."; "Honey, stop!" still stops there).
        Sixteenth round: such an utterance is parsed as usual ("Could you bring me a mug of coffee,
        love?"), as people call the robot so too."""
        if not any(" ".join(c) in self.endearments for c in _clauses(text)):
            return set()
        return {s.name for s in self.skills.values() if s.phrases}

    def check(self, call: Any) -> tuple[str, dict[str, str]]:
        """(skill, arguments) of a call dict, or ValueError saying what is wrong with it."""
        if not isinstance(call, dict) or set(call) != {"skill", "arguments"}:
            raise ValueError(f"a call is {{'skill': ..., 'arguments': {{...}}}}, got {call!r}")
        name, args = call["skill"], call["arguments"]
        if not isinstance(args, dict):
            raise ValueError(f"arguments must be a mapping, got {args!r}")
        if name == NONE:
            if args:
                raise ValueError("'none' takes no arguments")
            return NONE, {}
        if name not in self.skills:
            raise ValueError(f"unknown skill {name!r}; declared: {sorted(self.skills)}")
        skill = self.skills[name]
        expected = {a.name for a in skill.arguments}
        if set(args) != expected:
            raise ValueError(f"{name} takes arguments {sorted(expected)}, got {sorted(args)}")
        return name, {a.name: a.check(args[a.name]) for a in skill.arguments}

    # ------------------------------------------------------------------ schema, phrases, speech
    def schema(self) -> dict[str, Any]:
        """JSON schema of one skill call or none."""
        none = {"type": "object", "properties": {
            "skill": {"const": NONE},
            "arguments": {"type": "object", "properties": {}, "additionalProperties": False}},
            "required": ["skill", "arguments"], "additionalProperties": False}
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "skill call or none",
                "anyOf": [s.schema() for s in self.skills.values()] + [none]}

    def match_phrase(self, text: str) -> SkillCall | None:
        """The fast path: a whole utterance that is one of a skill's `phrases`, else None."""
        t0 = time.perf_counter()
        if len(text) > MAX_FAST_CHARS:  # no phrase is that long: skip the work in a callback
            return None
        n = normalize_phrase(text)
        name = self._phrases.get(n) if len(n.split()) <= MAX_PHRASE_WORDS else None
        confidence = 1.0
        if name is None and 0 < len(n.split()) <= FUZZY_PHRASE_WORDS:
            from difflib import SequenceMatcher

            said = n.replace(" ", "")
            ratio, phrase = max((SequenceMatcher(None, said, p.replace(" ", "")).ratio(), p) for p in self._phrases)
            if ratio >= FUZZY_PHRASE_RATIO:
                name, confidence = self._phrases[phrase], ratio
        if name is None:
            return None
        return SkillCall(name, {}, confidence, text, "phrase", time.perf_counter() - t0)

    def _spoken(self, call: SkillCall) -> dict[str, str]:
        skill = self.skills[call.skill]
        return {a.name: a.spoken(call.arguments[a.name]) for a in skill.arguments}

    def confirmation(self, call: SkillCall) -> str:
        skill = self.skills[call.skill]
        if skill.confirm:
            return skill.confirm.format(**self._spoken(call))
        args = ", ".join(self._spoken(call).values())
        return f"OK: {skill.description.rstrip('.').lower()}" + (f" ({args})." if args else ".")

    def ask_back(self, call: SkillCall) -> str:
        skill = self.skills[call.skill]
        if skill.ask:
            return skill.ask.format(**self._spoken(call))
        return f"Sorry, did you ask me to {skill.description.rstrip('.').lower()}?"

    def prompt_lines(self) -> str:
        return "\n".join(f"- {s.signature()}" for s in self.skills.values())


# ---------------------------------------------------------------------- the LLM under a grammar
SYSTEM_PROMPT = (
    "You turn what the operator says to a home robot into one skill call in JSON. "
    "The skills:\n{skills}\n"
    'Answer {{"skill": "none", "arguments": {{}}}} when the operator asks a question, chats, or asks '
    "for something no skill does."
)
METHODS = ("choice", "generate")
CONTENT_FREE = "N/A"  # the calibration request
# Evidence added to the calibrated log-likelihoods (nats), chosen on the dev split only
# (data/skill_requests_dev.tsv + even lines of questions.txt): "none" starts NONE_BIAS ahead, a
# skill whose cue words were said gets CUE_BONUS, an argument value that was said MENTION_BONUS.
# The second round (dev + dev2, module docstring): INFLECTED_CUE_BONUS for a cue heard only
# inflected, MISSING_PENALTY per choice argument without a default left unnamed, NAMED_BONUS per
# one named.
NONE_BIAS = 10.0
CUE_BONUS = 12.0
MENTION_BONUS = 3.0
MISSING_PENALTY = 8.0
NAMED_BONUS = 4.0
INFLECTED_CUE_BONUS = 6.0
# The confidence is the product, over the decisions, of the chosen option's softmax over the scores
# divided by CONFIDENCE_TEMPERATURE. Chosen on the dev split's text and on 50 dev requests as Whisper
# heard them in 4 voices (misheard ones give most of the wrong calls): with commands.min_confidence
# 0.5, at 1 it flagged 15 of the 21 wrong skill calls, at 3 17 of 21 and none of the 50 right ones
# (at 4, 0.6: 20 of 21 but 2 right ones asked back).
CONFIDENCE_TEMPERATURE = 3.0
# The skill probe (core/skill_probe.py; fourth round, module docstring): PROBE_WEIGHT x its log
# probability is added to each option's score where a cue was said; where none was, its top skill
# is taken when the probe gives it more than PROBE_THRESHOLD (else "none"). Chosen on dev..dev4;
# the weight chosen again in the sixteenth round (module docstring) with leave-one-split-out probes.
PROBE_WEIGHT = 3.0
PROBE_THRESHOLD = 0.5


def _softmax_top(scores: list[float]) -> float:
    import math

    top = max(scores)
    return 1.0 / sum(math.exp(x - top) for x in scores)


JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class CommandParser:
    """Text -> SkillCall with a frozen causal LM (transformers) under the skill set's grammar.

    The fixed part of the prompt (instructions, skills, few-shot turns) is run through the model
    once and its key/value cache kept; a request only runs its own tokens and the decisions.
    Not thread-safe: one caller at a time (assistant_node's worker).
    """

    def __init__(self, skills: SkillSet, model, tokenizer, method: str = "choice", calibrate: bool = True,
                 none_bias: float = NONE_BIAS, cue_bonus: float = CUE_BONUS, mention_bonus: float = MENTION_BONUS,
                 missing_penalty: float = MISSING_PENALTY, named_bonus: float = NAMED_BONUS,
                 inflected_cue_bonus: float = INFLECTED_CUE_BONUS,
                 max_tokens: int = 64, require_cue: bool = True,
                 temperature: float = CONFIDENCE_TEMPERATURE, probe=None, probe_weight: float = PROBE_WEIGHT,
                 probe_threshold: float = PROBE_THRESHOLD) -> None:
        """`probe`: a SkillProbe (core/skill_probe.py) fit for this skill set and LLM, or None (the
        cue rules alone); SkillProbeError when it was fit for other skills or another LLM."""
        import llguidance
        import llguidance.hf
        import torch

        self.skills, self.model, self.tokenizer = skills, model, tokenizer
        self.max_tokens = max_tokens
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.calibrate = calibrate
        self.none_bias, self.cue_bonus, self.mention_bonus = none_bias, cue_bonus, mention_bonus
        self.missing_penalty, self.named_bonus = missing_penalty, named_bonus
        self.inflected_cue_bonus = inflected_cue_bonus
        if temperature <= 0:
            raise ValueError(f"confidence temperature must be > 0, got {temperature}")
        self.temperature = temperature
        # the cue gate: only when every skill declares cues (a skill without any is found by the LLM alone)
        self.require_cue = require_cue and all(s.cues for s in skills.skills.values())
        self.last_steps: list[tuple] = []  # (key, options, scores) of the last choose(): for benchmarks
        self.probe, self.probe_weight, self.probe_threshold = probe, probe_weight, probe_threshold
        self.last_probe: dict[str, float] = {}  # the probe's probabilities for the last request
        if probe is not None:
            from .skill_probe import llm_fingerprint

            probe.check(list(skills.skills) + [NONE], llm_fingerprint(model))
        self._prior: dict = {}
        self.schema = skills.schema()
        self.grammar = llguidance.LLMatcher.grammar_from_json_schema(self.schema, overrides=JSON_OPTIONS)
        self.lltok = llguidance.hf.from_tokenizer(tokenizer)
        # choice mode writes a free-text argument under the grammar of its skill alone
        self._skill_grammars = {
            s.name: llguidance.LLMatcher.grammar_from_json_schema(
                {"anyOf": [s.schema()]}, overrides=JSON_OPTIONS)
            for s in skills.skills.values() if any(a.type == "text" for a in s.arguments)}
        for grammar in [self.grammar, *self._skill_grammars.values()]:
            error = llguidance.LLMatcher.validate_grammar(grammar, self.lltok)
            if error:
                raise SkillsError(f"{skills.source}: the skills' grammar does not compile: {error}")
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self._torch = torch
        prefix, self._suffix = self._prompt_parts()
        self._prefix_ids = tokenizer(prefix, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model(input_ids=self._prefix_ids, use_cache=True)
        self._prefix_kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        if method == "choice" and calibrate:
            self._calibrate()

    def _prompt_parts(self) -> tuple[str, str]:
        """(fixed prefix, request template) of the chat prompt, split where the request goes."""
        marker = "\x00REQUEST\x00"
        messages = [{"role": "system", "content": SYSTEM_PROMPT.format(skills=self.skills.prompt_lines())}]
        for ex in self.skills.examples:
            messages += [{"role": "user", "content": ex.text},
                         {"role": "assistant", "content": json.dumps({"skill": ex.skill, "arguments": ex.arguments})}]
        messages.append({"role": "user", "content": marker})
        full = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prefix, suffix = full.split(marker)
        return prefix, "{request}" + suffix

    def _fresh_cache(self):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(self._prefix_kv):
            cache.update(k, v, i)
        return cache

    def _mask(self, matcher) -> Any:
        import numpy as np

        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return self._torch.from_numpy(bits[: self.vocab].astype(bool))

    # ------------------------------------------------------------------ constrained choice
    @staticmethod
    def _said(text: str) -> str:
        """The operator's words as every prompt carries them (checked for length, spaces collapsed)."""
        from .llm import check_user_text

        return " ".join(check_user_text(text).split())

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _score(self, cache, shared: list[int], last_logits, candidates: list[list[int]], hidden: bool = False):
        """Log-likelihood of each candidate continuation after `shared`, in ONE forward pass: the
        candidates are packed behind the shared tokens with an attention mask that lets each see
        the cache, the shared tokens and itself only. The cache keeps the shared tokens, not the
        candidates. Returns (scores, logits after the shared tokens), and the pass's hidden states
        (embeddings, then one per layer) as a third item when `hidden`."""
        torch = self._torch
        past, n_shared = cache.get_seq_length(), len(shared)
        flat = shared + [t for c in candidates for t in c]
        q = len(flat)
        allowed = torch.zeros(q, past + q, dtype=torch.bool)
        allowed[:, :past] = True
        if n_shared:
            allowed[:n_shared, past:past + n_shared] = torch.ones(n_shared, n_shared, dtype=torch.bool).tril()
            allowed[n_shared:, past:past + n_shared] = True
        pos = list(range(past, past + n_shared))
        start = n_shared
        for c in candidates:
            for j in range(len(c)):
                allowed[start + j, past + start:past + start + j + 1] = True
                pos.append(past + n_shared + j)
            start += len(c)
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[None, None]
        out = self.model(input_ids=torch.tensor([flat]), past_key_values=cache, use_cache=True,
                         attention_mask=mask, position_ids=torch.tensor([pos]), output_hidden_states=hidden)
        logits = out.logits[0, :, : self.vocab]
        cache.crop(-(q - n_shared)) if q > n_shared else None
        after_shared = logits[n_shared - 1] if n_shared else last_logits
        scores, start = [], n_shared
        for c in candidates:
            rows = torch.cat([after_shared[None], logits[start:start + len(c) - 1]])
            lp = torch.log_softmax(rows.float(), -1)
            scores.append(float(lp[torch.arange(len(c)), torch.tensor(c)].sum()))
            start += len(c)
        return (scores, after_shared, out.hidden_states) if hidden else (scores, after_shared)

    def _choice_scores(self, text: str, use_probe: bool = True):
        """Yield (key, options, scores) at each decision of constrained choice for `text`, and
        receive the chosen option index: first the skill ("", names), then each argument of a
        skill without free text ((skill, argument), values)."""
        words = self._said(text)
        request = self._suffix.format(request=words)
        cache = self._fresh_cache()
        names = list(self.skills.skills) + [NONE]
        shared, candidates = self._ids(request + '{"skill": "'), [self._ids(n + '"') for n in names]
        self.last_probe = {}
        if self.probe is not None and use_probe:
            from .skill_probe import request_features

            scores, _, hidden = self._score(cache, shared, None, candidates, hidden=True)
            self.last_probe = self.probe.probs(request_features(hidden, self.probe.layer, len(self._ids(words))))
        else:
            scores, _ = self._score(cache, shared, None, candidates)
        skill = names[(yield "", names, scores)]
        if skill == NONE or skill in self._skill_grammars:
            return
        context = self._ids(skill + '", "arguments": {')
        for i, arg in enumerate(self.skills.skills[skill].arguments):
            context += self._ids(("" if i == 0 else ", ") + f'"{arg.name}": "')
            said = mentioned(text, arg, fuzzy=True) or ({arg.default} if arg.default else set())
            if len(said) == 1:  # the operator named exactly one value (or none, and there is a default)
                value = said.pop()
                yield (skill, arg.name), [value], [0.0]
            else:
                values = list(arg.values)
                scores, _ = self._score(cache, context, None, [self._ids(v + '"') for v in values])
                value = values[(yield (skill, arg.name), values, scores)]
            context = self._ids(value + '"')

    def features(self, text: str, layer: int):
        """The skill probe's features of `text` (core/skill_probe.py): the request's hidden states
        after `layer` in this parser's prompt, as `choose` reads them."""
        from .skill_probe import request_features

        words = self._said(text)
        with self._torch.inference_mode():
            out = self.model(input_ids=self._torch.tensor([self._ids(self._suffix.format(request=words))]),
                             past_key_values=self._fresh_cache(), use_cache=True, output_hidden_states=True)
        return request_features(out.hidden_states, layer, len(self._ids(words)))

    def _calibrate(self) -> None:
        """Contextual calibration (Zhao et al. 2021, "Calibrate before use"): the score of each
        option for a content-free request, subtracted at every decision, so the few-shot
        examples' and the prompt's own preferences (this 135M model copies them) cancel out."""
        self._prior = {}
        with self._torch.inference_mode():
            for skill in [None, *self.skills.skills]:
                steps = self._choice_scores(CONTENT_FREE, use_probe=False)
                try:
                    key, options, scores = next(steps)
                    while True:
                        self._prior[key] = scores
                        pick = options.index(skill) if key == "" and skill else 0
                        if key == "" and not skill:
                            break
                        key, options, scores = steps.send(pick)
                except StopIteration:
                    pass

    def _evidence(self, skill: Skill, text: str) -> float:
        """What the words said add to a skill's calibrated score: CUE_BONUS when one of its cues
        was said, less MISSING_PENALTY for each choice argument without a default none of whose
        values was said as written (third round: a value only nearly said, "winter" for water, no
        longer spares the penalty; it still picks the value once the skill is chosen), plus
        NAMED_BONUS for each one said: "I'm going to read" says go_to's cue but no place. -inf when
        the skill `requires` words and none was said, or one of its `unless` phrases was."""
        if not skill.allowed(text):
            return float("-inf")
        needed = [a for a in skill.arguments if a.type == "choice" and not a.default]
        named = sum(bool(mentioned(text, a)) for a in needed)  # as written: a value only nearly heard is no evidence
        missing = len(needed) - named
        cue = (self.cue_bonus if skill.cued(text, inflected=False) else
               self.inflected_cue_bonus if skill.cued(text) else 0.0)
        return cue - self.missing_penalty * missing + self.named_bonus * named

    def choose(self, text: str, cued: bool = True,
               fast_only: set[str] | None = None) -> tuple[str, dict[str, str], float]:
        """Constrained choice: the skill whose name is likeliest after the request (then each
        argument's value in turn), scored by the LLM's log-likelihood of the JSON it would write,
        less the calibration prior. Every option is a declared skill or an allowed value, so the
        result is valid by construction; the confidence is the product of the softmaxes over the
        (calibrated) options at each decision. With a probe, its log probabilities add to the
        skill scores; `cued` False (the request says no skill's cue) lets the probe alone decide:
        its top allowed skill when more likely than `probe_threshold`, else "none". `fast_only`:
        `SkillSet.fast_only(text)` where the caller has it."""
        import math

        confidence, skill, args = 1.0, NONE, {}
        self.last_steps = []
        with self._torch.inference_mode():
            steps = self._choice_scores(text)
            try:
                key, options, scores = next(steps)
                while True:
                    prior = self._prior.get(key) if self.calibrate else None
                    if prior is not None and len(prior) == len(scores):
                        scores = [x - y for x, y in zip(scores, prior)]
                    if key == "":
                        if fast_only is None:  # `parse` passes what it found
                            fast_only = self.skills.fast_only(text)
                        scores = [x + (self.none_bias if o == NONE else float("-inf") if o in fast_only
                                       else self._evidence(self.skills.skills[o], text))
                                  for x, o in zip(scores, options)]
                        if not cued:  # "I'll go to the kitchen myself", "I'll answer the door myself"
                            # no skill the speaker does or did, nor in a tale of what happened, nor one said negated
                            mine = does_it_myself(text) or tells_past(text, self.skills.other_people)
                            scores = [float("-inf") if o != NONE and (mine or self.skills.skills[o].by_speaker(text)
                                                                      or self.skills.skills[o].not_asked(text))
                                      else x for x, o in zip(scores, options)]
                        if self.probe is not None:
                            scores, decided = self._with_probe(options, scores, cued)
                            if decided is not None:  # no cue: the probe's pick, its probability as confidence
                                self.last_steps.append((key, options, scores))
                                confidence *= decided[1]
                                skill = decided[0]
                                key, options, scores = steps.send(options.index(skill))
                                continue
                    else:
                        arg = self.skills.skills[key[0]].arguments_by_name[key[1]]
                        said = mentioned(text, arg, fuzzy=True)
                        if not said and arg.default:
                            said = {arg.default}
                        scores = [x + (self.mention_bonus if o in said else 0.0) for x, o in zip(scores, options)]
                    best = max(range(len(options)), key=scores.__getitem__)
                    self.last_steps.append((key, options, scores))
                    confidence *= _softmax_top([x / self.temperature for x in scores])
                    if key == "":
                        skill = options[best]
                    else:
                        args[key[1]] = options[best]
                    key, options, scores = steps.send(best)
            except StopIteration:
                pass
        if skill in self._skill_grammars:  # free text cannot be enumerated: written under its skill's grammar
            _, args, conf = self.generate(text, self._skill_grammars[skill])
            confidence *= conf
        return skill, args, float(confidence if math.isfinite(confidence) else 0.0)

    def _with_probe(self, options: list[str], scores: list[float], cued: bool):
        """(scores, None) with PROBE_WEIGHT x the probe's log probability added, where a cue was
        said; else (scores, (pick, confidence)): the probe's likeliest allowed skill when above
        the threshold, else none (confidence 1 - that skill's probability)."""
        import math

        probs = self.last_probe
        if cued:
            return [x + self.probe_weight * math.log(max(probs.get(o, 0.0), 1e-9))
                    for x, o in zip(scores, options)], None
        allowed = [o for o, x in zip(options, scores) if o != NONE and x > float("-inf")]
        top = max(allowed, key=lambda o: probs.get(o, 0.0), default=NONE)
        p_top = probs.get(top, 0.0) if top != NONE else 0.0
        if p_top > self.probe_threshold:
            return scores, (top, p_top)
        return scores, (NONE, 1.0 - p_top)

    def parse(self, text: str) -> SkillCall:
        """The skill call `text` asks for (NONE when none), always a valid call of the skill set."""
        t0 = time.perf_counter()
        fast = self.skills.fast_call(text)  # "stop", "Please stop driving toward the kitchen"
        if fast is not None:
            return fast
        if self.skills.asks_nothing(text):  # "Tiny.", "Great, cheers."
            return SkillCall(NONE, {}, 1.0, text, "empty", time.perf_counter() - t0)
        if self.skills.to_someone_else(text):  # "Honey, stop!" was a stop on the fast path
            return SkillCall(NONE, {}, 1.0, text, "others", time.perf_counter() - t0)
        fast_only = self.skills.fast_only(text)  # "Stop worrying so much, love."
        cued = any(s.cued(text) for s in self.skills.skills.values() if s.name not in fast_only)
        if self.require_cue and not cued and (self.probe is None or self.method != "choice"):
            return SkillCall(NONE, {}, 1.0, text, "no_cue", time.perf_counter() - t0)
        if self.method == "choice":
            skill, args, confidence = self.choose(text, cued=cued or not self.require_cue, fast_only=fast_only)
            via = "llm" if cued or not self.require_cue else "probe"
        else:
            (skill, args, confidence), via = self.generate(text), "llm"
        return SkillCall(skill, args, confidence, text, via, time.perf_counter() - t0)

    def generate(self, text: str, grammar: str | None = None) -> tuple[str, dict[str, str], float]:
        """Greedy decoding under the grammar (default: every skill): (skill, arguments, confidence)."""
        import llguidance

        torch = self._torch
        request = self._suffix.format(request=self._said(text))
        feed = self.tokenizer(request, add_special_tokens=False)["input_ids"]
        matcher = llguidance.LLMatcher(self.lltok, grammar or self.grammar, log_level=0)
        forced = matcher.compute_ff_tokens()
        matcher.consume_tokens(forced)
        feed, out_ids, logp_sum = feed + forced, list(forced), 0.0
        cache = self._fresh_cache()
        with torch.inference_mode():
            for _ in range(self.max_tokens):
                logits = self.model(input_ids=torch.tensor([feed]), past_key_values=cache,
                                    use_cache=True).logits[0, -1, : self.vocab]
                allowed = self._mask(matcher)
                logits = logits.masked_fill(~allowed, float("-inf"))
                token = int(torch.argmax(logits))
                if int(allowed.sum()) > 1:
                    logp_sum += float(torch.log_softmax(logits, -1)[token])
                if token == self.tokenizer.eos_token_id or not matcher.consume_token(token):
                    break
                out_ids.append(token)
                forced = matcher.compute_ff_tokens()
                matcher.consume_tokens(forced)
                out_ids += forced
                if matcher.is_accepting() or matcher.is_stopped() or matcher.is_error():
                    break
                feed = [token] + forced
        if matcher.is_error():
            raise RuntimeError(f"grammar error while decoding {text!r}: {matcher.get_error()}")
        out = self.tokenizer.decode(out_ids, skip_special_tokens=True)
        skill, args = self.skills.check(json.loads(out))  # raises if the grammar ever let through junk
        return skill, args, float(torch.exp(torch.tensor(logp_sum)))
