"""Skills YAML -> checked skill calls (core/commands.py): start-up checks, the schema, the stop
fast path, and schema validity of the LLM's output under fuzzed text (real SmolLM2)."""
from __future__ import annotations

import itertools
import json
import random
import string
from pathlib import Path

import pytest
import yaml

from tinyalign_ros.core.commands import (NONE, CommandParser, SkillCall, SkillSet, SkillsError,
                                         default_skills_file, normalize_phrase)

REPO = Path(__file__).resolve().parents[1]


def _shipped() -> dict:
    return yaml.safe_load(default_skills_file().read_text())


def _all_calls(skills: SkillSet) -> list[dict]:
    calls = [{"skill": NONE, "arguments": {}}]
    for s in skills.skills.values():
        names = [a.name for a in s.arguments]
        for values in itertools.product(*[list(a.values) for a in s.arguments]):
            calls.append({"skill": s.name, "arguments": dict(zip(names, values))})
    return calls


def test_shipped_skills_load_and_their_schema_accepts_every_allowed_call_and_nothing_else():
    import jsonschema

    skills = SkillSet.load(default_skills_file())
    assert {"stop", "go_to", "fetch", "lights", "follow_me", "what_can_you_do"} <= set(skills.skills)
    schema = skills.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    calls = _all_calls(skills)
    assert len(calls) > 50
    for call in calls:
        validator.validate(call)
        assert skills.check(call) == (call["skill"], call["arguments"])
        if call["skill"] != NONE:  # every template fills in
            c = SkillCall(call["skill"], call["arguments"])
            assert "{" not in skills.confirmation(c) and "{" not in skills.ask_back(c)
    bad = [{"skill": "go_to", "arguments": {"place": "moon"}}, {"skill": "fly", "arguments": {}},
           {"skill": "go_to", "arguments": {}}, {"skill": NONE, "arguments": {"x": "y"}},
           {"skill": "lights", "arguments": {"room": "kitchen", "state": "on", "extra": "1"}}]
    for call in bad:
        assert not validator.is_valid(call), call
        with pytest.raises(ValueError):
            skills.check(call)
    assert skills.confirmation(SkillCall("fetch", {"object": "water", "person": "me"})) == \
        "Bringing a glass of water to you."


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["skills"]["go_to"].update(colour="red"), "skills.go_to: unknown key(s) ['colour']"),
    (lambda d: d["examples"].append({"text": "dance", "skill": "dance", "arguments": {}}), "unknown skill 'dance'"),
    (lambda d: d["examples"].append({"text": "go to mars", "skill": "go_to", "arguments": {"place": "mars"}}),
     "place='mars' is not one of"),
    (lambda d: d["skills"]["go_to"].update(confirm="Going to {planet}."), "names ['planet'], not arguments of go_to"),
    (lambda d: d["skills"]["lights"]["arguments"]["state"].update(values=[True, False]), "quote on/off"),
    (lambda d: d["skills"]["go_to"]["arguments"]["place"].update(type="number"), "type: must be one of"),
    (lambda d: d["skills"].update({"Bad-Name": {"description": "x"}}), "skills.Bad-Name: a skill name"),
    (lambda d: d["skills"]["go_to"].update(phrases=["go"]), "only a skill without arguments can have phrases"),
    (lambda d: d["skills"]["follow_me"].update(phrases=["stop"]), "'stop' is also a phrase of"),
    (lambda d: d.update(skilz={}), "top level: unknown key(s) ['skilz']"),
    (lambda d: d["skills"]["go_to"]["arguments"]["place"].update(aliases={"moon": ["luna"]}),
     "aliases: 'moon' is not one of the values"),
    (lambda d: d["skills"]["go_to"]["arguments"]["place"].update(aliases={"garden": "yard"}),
     "aliases.garden: must be a non-empty list"),
    (lambda d: d["skills"]["fetch"]["arguments"]["person"].update(pronouns={"uncle": ["him"]}),
     "pronouns: 'uncle' is not one of the values"),
    (lambda d: d["skills"]["fetch"]["arguments"]["person"].update(pronouns={"grandpa": ["the old man"]}),
     "pronouns.grandpa: must be single words"),
    (lambda d: d["skills"]["stop"].update(imperative="yes"), "skills.stop.imperative: must be true or false"),
    (lambda d: d["skills"]["go_to"].update(not_self=1), "skills.go_to.not_self: must be true or false"),
    (lambda d: d["skills"]["lights"].update(requires="light"), "skills.lights.requires: must be a list"),
    (lambda d: d["skills"]["go_to"].update(unless="are you going"), "skills.go_to.unless: must be a list"),
    (lambda d: d["skills"]["lights"]["arguments"]["state"].update(last_named="yes"),
     "skills.lights.arguments.state.last_named: must be true or false"),
    (lambda d: d.update(other_people="honey"), "other_people: must be a list"),
    (lambda d: d.update(pleasantries={"thanks": 1}), "pleasantries: must be a list"),
])
def test_malformed_skills_are_rejected_with_a_message_that_says_where(tmp_path, mutate, message):
    data = _shipped()
    mutate(data)
    path = tmp_path / "skills.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SkillsError) as err:
        SkillSet.load(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_selecting_an_unknown_skill_is_an_error():
    skills = SkillSet.load(default_skills_file())
    with pytest.raises(SkillsError, match="unknown skill.*'teleport'"):
        skills.select(["go_to", "teleport"])
    assert set(skills.select(["go_to", "stop"]).skills) == {"go_to", "stop"}


@pytest.mark.parametrize("text", ["Stop!", "stop, stop, stop", "Please stop.", "HALT", "Hey robot, stop it!",
                                  "Freeze.", "Stop right there", "Don’t move!", "emergency stop"])
def test_stop_variants_take_the_fast_path(text):
    call = SkillSet.load(default_skills_file()).match_phrase(text)
    assert call is not None and (call.skill, call.via, call.confidence) == ("stop", "phrase", 1.0)


@pytest.mark.parametrize("text", ["Don't stop the music.", "Where is the bus stop?", "stop go to the kitchen",
                                  "", "I waited for an hour", "Who?", "Stopped.", "Top.", "Shop."])
def test_other_text_does_not_take_the_fast_path(text):
    assert SkillSet.load(default_skills_file()).match_phrase(text) is None


@pytest.mark.parametrize("text", ["Stomp.", "Emergencies top."])
def test_a_short_utterance_close_to_a_stop_phrase_takes_the_fast_path_less_surely(text):
    """What Whisper tiny made of "stop" and "emergency stop" in the dev split's speech."""
    call = SkillSet.load(default_skills_file()).match_phrase(text)
    assert call is not None and (call.skill, call.via) == ("stop", "phrase") and 0.88 <= call.confidence < 1.0


def test_an_alias_names_its_value():
    from tinyalign_ros.core.commands import mentioned

    skills = SkillSet.load(default_skills_file())
    assert mentioned("return to your dock", skills.skills["go_to"].arguments_by_name["place"]) == {"charging station"}
    assert mentioned("kill the lights", skills.skills["lights"].arguments_by_name["state"]) == {"off"}
    # ninth round: darken / make it dark turn lights off, brighten turns them on; "it's dark" is no state
    state = skills.skills["lights"].arguments_by_name["state"]
    assert mentioned("Make it dark in here, I want to watch a film.", state) == {"off"}
    assert mentioned("Tiny, darken the office.", state) == {"off"}
    assert mentioned("Brighten up the office.", state) == {"on"}
    assert mentioned("It's dark in the kitchen, put the light on.", state) == {"on"}
    assert mentioned("It's too dark to read in here.", state) == set()
    assert mentioned("Please illuminate the bedroom.", state) == {"on"} and skills.skills["lights"].cued("illuminate it")
    assert mentioned("Cut the lights.", state) == {"off"}  # tenth round
    assert mentioned("Time to go recharge, little guy.", skills.skills["go_to"].arguments_by_name["place"]) == {
        "charging station"}
    assert skills.skills["what_can_you_do"].cued("Give me a rundown of your features.")
    assert skills.skills["fetch"].cued("I could do with a blanket.") and skills.skills["fetch"].cued("I'm dying for a coffee.")
    assert skills.skills["lights"].cued("Brighten up the office.") and skills.skills["lights"].cued("darken the hall")
    assert skills.skills["what_can_you_do"].cued("What jobs can I give you?")
    assert not skills.skills["what_can_you_do"].cued("She switched jobs last spring.")


def test_thanks_and_fillers_alone_ask_for_nothing():
    skills = SkillSet.load(default_skills_file())
    for said in ("", "Tiny.", "Great, cheers.", "Thanks, that's perfect.", "No worries, no worries!", "Never mind.",
                 "Tiny, you're doing a great job.", "You are such a star.", "Thanks, Tiny, that's all for now."):
        assert skills.asks_nothing(said), said
    for said in ("No.", "Thanks, now stop.", "Great, bring me a coffee.", "Never go there.", "You're doing a great job, now stop.",
                 "That's all, bring me water."):
        assert not skills.asks_nothing(said), said
    assert skills.select(["stop"]).asks_nothing("Great, cheers.")  # a subset keeps the words
    bare = SkillSet.from_dict({"skills": {"wave": {"description": "Wave a hand."}}})
    assert bare.asks_nothing("Tiny.") and not bare.asks_nothing("Great, cheers.")  # fillers only


@pytest.mark.parametrize("text, stopping", [
    ("Please stop driving toward the kitchen.", "stop"), ("Stop following me, Tiny.", "stop"),
    ("Whoa whoa, stop moving.", "stop"), ("Don't stop believing.", None), ("I can't stop thinking about it.", None),
    ("Stop the music.", None), ("Go to the kitchen.", None), ("Stop worrying so much, love.", None),
    ("Don't stop moving.", None)])
def test_a_stop_cue_before_what_the_robot_is_doing_is_a_stop(text, stopping):
    """...and is decided without the LLM or the queue, as the stop phrases (`fast_call`)."""
    skills = SkillSet.load(default_skills_file())
    assert skills.stop_doing(text) == stopping
    fast = skills.fast_call(text)
    assert (fast.skill, fast.via, fast.arguments) == (stopping, "stop_doing", {}) if stopping else fast is None
    assert skills.select(["go_to", "follow_me"]).stop_doing(text) is None  # no stop skill
    assert skills.fast_call("Stop, stop!").via == "phrase"


@pytest.mark.parametrize("text, elsewhere", [
    ("Mum, have you seen the car keys?", True), ("Your phone is ringing, Dad.", True),
    ("Turn the page, son, let's see what happens next.", True), ("Mum, can I have a biscuit?", True),
    ("Tiny, son, bring me my phone.", False),  # the robot is named: it is asked
    # sixteenth round: a term of endearment is said to the robot too (`endearments`: parsed as usual)
    ("Honey, have you seen the car keys?", False), ("Could you bring me a mug of coffee, love?", False),
    ("Oh dear, I spilled it.", False),  # an exclamation, not a term of address
    ("Grandma, do you want sugar in your coffee?", True), ("Bring grandma her glasses.", False),  # twelfth round
    ("Good girl, Bella, fetch the stick!", True), ("Good boy, Tiny.", False),  # fourteenth round: a pet
    ("I love the sound of rain.", False), ("How do bees make honey?", False), ("Bring me my phone.", False)])
def test_a_term_of_address_of_its_own_means_someone_else_is_spoken_to(text, elsewhere):
    skills = SkillSet.load(default_skills_file())
    assert skills.to_someone_else(text) is elsewhere
    assert skills.select(["go_to", "stop"]).to_someone_else(text) is elsewhere  # a subset keeps the terms
    bare = SkillSet.from_dict({"skills": {"wave": {"description": "Wave a hand."}}})
    assert not bare.to_someone_else(text)  # a skills file without other_people: no one else


@pytest.mark.parametrize("skill, text", [("follow_me", "Keep following me."), ("lights", "Switching the lamps on"),
                                         ("stop", "stopping now"), ("go_to", "Get going, upstairs"),
                                         ("fetch", "she fetched it"), ("go_to", "moving to the garden")])
def test_cues_are_heard_in_their_inflections(skill, text):
    assert SkillSet.load(default_skills_file()).skills[skill].cued(text)


def test_cue_inflections_are_regular_forms_only():
    from tinyalign_ros.core.commands import Skill, inflections

    assert {"stops", "stopped", "stopping"} <= inflections("stop")
    assert {"moves", "moved", "moving"} <= inflections("move") and "carries" in inflections("carry")
    lamp = Skill("lamp", "Lamp.", cues=("here", "turn on"))
    assert not lamp.cued("give her the keys") and not lamp.cued("heresy")  # whole words, no stemming of what was said
    assert lamp.cued("turning on the heater") and not lamp.cued("turn the heater on")  # a cue's words in order


@pytest.mark.parametrize("skill, text, cued", [
    # imperative skills: a cue counts said as a command to the robot, wherever the fillers are
    ("stop", "Please stop moving", True), ("stop", "Robot, stop immediately.", True), ("stop", "I said stop!", True),
    ("stop", "you need to stop right now", True), ("stop", "Cut the motors.", True), ("stop", "No, no, halt!", True),
    ("stop", "Stop, there is a step ahead.", True), ("stop", "Can you stop?", True),
    ("stop", "She couldn't stop smiling.", False), ("stop", "The train stops at every station.", False),
    ("stop", "How do we stop the tap from dripping?", False), ("stop", "My car's motor is loud", False),
    ("follow_me", "Walk behind me.", True), ("follow_me", "I want you to follow me.", True),
    ("follow_me", "Stay close and follow me", True), ("follow_me", "come along", True),
    ("follow_me", "Did you follow the match?", False), ("follow_me", "My son follows the football league", False),
    # a cue that ends its clause is a command unless a noun's article or another subject's verb comes right before it
    ("stop", "I wish this headache would stop.", False), ("stop", "Work on the bridge has come to a halt.", False),
    ("stop", "The bus went past my stop", False), ("stop", "The noise won't stop", False),
    ("stop", "I told you to stop", True), ("stop", "Robot, you must stop.", True),
    # not_self (go_to): not where the speaker is the one who goes
    ("go_to", "I need to go to the bank tomorrow.", False), ("go_to", "Tag along, I'm going out to the garden.", False),
    ("go_to", "We drove to the coast last weekend.", False), ("go_to", "I need you to go to the kitchen.", True),
    ("go_to", "Could you head to the office, I'll meet you there", True), ("go_to", "I want you to go upstairs", True),
    # any skill: no cue counts in a question about what the speaker should do; "could I" is a request
    ("go_to", "Where should I go for lunch?", False), ("go_to", "Should we drive to the coast?", False),
    ("go_to", "Go to the garden", True), ("fetch", "Could I have the keys?", True),
    # requires: lights only with light or lamp said
    ("lights", "Turn off the radio.", False), ("lights", "It's bright outside", False),
    ("lights", "Turn off the lamp.", True), ("lights", "switch the lights on", True),
    ("lights", "It's too dark to read in here.", True), ("lights", "Make it brighter in the kitchen.", True),
    ("stop", "Stay still for a second.", True),
    # requires: follow_me only with me, us, along, behind or after said (seventh round)
    ("follow_me", "Follow the recipe exactly and it comes out fine.", False), ("follow_me", "Follow your heart.", False),
    ("follow_me", "Tiny, trail after me while I tidy up.", True), ("follow_me", "Follow us to the car.", True),
    # fifteenth round: "myself" makes the speaker the one who acts for every skill; Whisper's "Tagalong"
    ("fetch", "I'll get the coffee myself, don't worry about it.", False), ("fetch", "Get me the coffee.", True),
    ("lights", "We'll switch the lights off ourselves.", False), ("follow_me", "Tagalong, Tiny.", True)])
def test_where_a_cue_is_said_decides_whether_it_counts(skill, text, cued):
    assert SkillSet.load(default_skills_file()).skills[skill].cued(text) is cued


def test_with_a_term_of_endearment_the_stop_skill_comes_only_from_the_fast_path():
    """Sixteenth round: "Stop worrying so much, love." says a stop cue to a person; "Honey, stop!" stops."""
    skills = SkillSet.load(default_skills_file())
    for said in ("Stop worrying so much, love.", "Could you bring me a mug of coffee, love?", "Sweetie, go to bed."):
        assert skills.fast_only(said) == {"stop"}, said
    for said in ("Stop worrying so much.", "I love the sound of rain.", "How do bees make honey?", "Mum, stop."):
        assert skills.fast_only(said) == set(), said
    assert skills.select(["go_to", "fetch"]).fast_only("Stop worrying so much, love.") == set()  # no stop skill
    assert skills.fast_call("Honey, stop!").skill == "stop"
    assert skills.asks_nothing("Cheers, love.") and not skills.asks_nothing("Coffee, love.")


def test_a_stop_phrase_as_a_clause_of_its_own_stops_on_the_fast_path():
    """...whatever else is said and whoever else is spoken to (twelfth and thirteenth rounds)."""
    skills = SkillSet.load(default_skills_file())
    for said in ("Honey, stop!", "Love, stand still.", "Stop it, honey.", "Stop, do not drive into the garden.",
                 "Stop, there is a step ahead.", "Hang on, stay put, don't go any further."):  # nineteenth round
        assert skills.stop_clause(said) == "stop", said
        assert (skills.fast_call(said).skill, skills.fast_call(said).via) == ("stop", "stop_clause"), said
    for said in ("Stop worrying so much, love.", "Stop by the bakery on your way home, honey.", "Hold on, love.",
                 "Honey, have you seen the keys?", "Stop go to the kitchen", "Don't stop, keep going.",
                 "Halt and Catch Fire was a great show."):
        assert skills.stop_clause(said) is None and skills.fast_call(said) is None, said
    assert skills.select(["go_to"]).stop_clause("Honey, stop!") is None  # no stop skill


@pytest.mark.parametrize("skill, text, allowed", [
    ("what_can_you_do", "Oh well, it's raining again, what can you do.", False),
    ("what_can_you_do", "Honestly, what can you do with a neighbour like that.", False),
    ("what_can_you_do", "What can you do about it, really?", False),
    ("what_can_you_do", "Tiny, what can you do?", True), ("what_can_you_do", "Well, what can you do for me?", True),
    ("go_to", "Are you going into the office tomorrow?", False), ("go_to", "Can you go into the office?", True),
    ("what_can_you_do", "What can you do, such is life.", False),  # fourteenth round
    ("lights", "Go straight on at the lights, then left.", False), ("lights", "Turn on the lights.", True),
    # fifteenth round: a complaint, a thing that needs replacing, an offer to anybody
    ("lights", "Who left the hallway light on again?", False), ("lights", "Leave the hallway light on.", True),
    ("fetch", "My phone needs a new battery.", False), ("fetch", "Grandma needs her medicine.", True),
    ("go_to", "The bathroom's free if anyone needs it.", False), ("follow_me", "Be my shadow for a bit.", True),
    # nineteenth round: the robot has no blanket of its own
    ("fetch", "Bring your own blanket if you're camping with us, Jenny.", False), ("fetch", "Bring your blanket.", True)])
def test_an_unless_phrase_rules_the_skill_out(skill, text, allowed):
    assert SkillSet.load(default_skills_file()).skills[skill].allowed(text) is allowed


def test_a_cue_the_speaker_acts_on_is_by_the_speaker():
    go = SkillSet.load(default_skills_file()).skills["go_to"]
    assert go.by_speaker("I'll go to the kitchen myself, don't worry about it.")
    assert go.by_speaker("I'm heading to the garden.")
    assert not go.by_speaker("Go to the kitchen.") and not go.by_speaker("I need you to go to the kitchen.")
    fetch = SkillSet.load(default_skills_file()).skills["fetch"]
    assert not fetch.by_speaker("I'll get it.")  # not a not_self skill ...
    assert fetch.by_speaker("I'll get it myself.") and not fetch.by_speaker("Get it yourself.")  # ... but "myself"
    stop = SkillSet.load(default_skills_file()).skills["stop"]  # sixteenth round: a cue right after a negation (the probe may not pick it)
    assert stop.not_asked("Don't stop now, you're nearly done.") and not stop.not_asked("Please stop now.")
    # eighteenth round: a cue as a passive is no request, nor one the speaker has "already" done
    assert go.not_asked("The meeting got moved to the big office upstairs.") and not go.cued("The meeting got moved to the office.")
    assert go.cued("Move to the office.") and not go.not_asked("Move to the office.")
    lights = SkillSet.load(default_skills_file()).skills["lights"]
    assert lights.by_speaker("I already turned the lights off.") and not lights.cued("I already turned the lights off.")
    assert lights.cued("I already asked you to turn the lights off.")  # the robot is the one to act
    assert go.cued("I think you'd best go to the charging station, Tiny.")  # "you'd": the robot goes


def test_a_tale_of_what_happened_tells_the_past():
    """`tells_past`: a clause that starts with a subject and an -ed verb (the probe may not pick)."""
    from tinyalign_ros.core.commands import tells_past
    others = SkillSet.load(default_skills_file()).other_people
    assert tells_past("Grandpa nodded off reading the paper.", others)
    assert tells_past("Oh no, I spilled it.") and tells_past("Never mind, she switched jobs last spring.")
    assert not tells_past("Grandpa nodded off reading the paper.")  # grandpa is one of `others`
    for said in ("I need my keys, I'm running late.", "I'm parched, get me some water.", "Grandpa wants the paper."):
        assert not tells_past(said, others), said


def test_the_imperative_rule_is_the_skills_choice():
    """The same cue anywhere in the clause when the skill is not declared imperative."""
    from tinyalign_ros.core.commands import Skill

    assert Skill("pause", "Pause.", cues=("stop",)).cued("She couldn't stop smiling.")
    assert not Skill("pause", "Pause.", cues=("stop",), imperative=True).cued("She couldn't stop smiling.")
    assert Skill("drive", "Drive.", cues=("go",)).cued("I'm going home.")
    assert not Skill("drive", "Drive.", cues=("go",), not_self=True).cued("I'm going home.")
    lamp = Skill("lamp", "Lamp.", cues=("turn on",), requires=("lamp",))
    assert not lamp.allowed("turn on the radio") and lamp.allowed("turn on the lamps")
    lamp = Skill("lamp", "Lamp.", cues=("turn on",), requires=("lamp",), unless=("oh well",))
    assert not lamp.allowed("oh well, turn on the lamp") and lamp.allowed("well, turn on the lamp")


def test_a_nearly_named_value_is_heard_only_when_none_is_named():
    """What Whisper tiny made of "grandma" and "a glass of water" in the dev splits' speech."""
    from tinyalign_ros.core.commands import mentioned

    fetch = SkillSet.load(default_skills_file()).skills["fetch"].arguments_by_name
    assert mentioned("Take the phone to grammar.", fetch["person"]) == set()
    assert mentioned("Take the phone to grammar.", fetch["person"], fuzzy=True) == {"grandma"}
    assert mentioned("Can you get Grandpa Glass of Watcher?", fetch["object"], fuzzy=True) == {"water"}
    assert mentioned("Bring grandpa a glass of water", fetch["object"], fuzzy=True) == {"water"}  # named: not glasses
    assert mentioned("Bring grandpa a glass of water", fetch["person"], fuzzy=True) == {"grandpa"}
    assert mentioned("Can you get the newspaper?", fetch["person"], fuzzy=True) == set()  # "you" is the robot
    assert mentioned("How do I make a cake?", fetch["object"], fuzzy=True) == set()
    rooms = SkillSet.load(default_skills_file()).skills["lights"].arguments_by_name["room"]
    assert mentioned("Can you kill the lights?", rooms, fuzzy=True) == set()  # "killthe" is near "kitchen": no run with "the"
    assert mentioned("Lights off in the kitten", rooms, fuzzy=True) == {"kitchen"}
    assert mentioned("Granddad wants the paper", fetch["person"]) == {"grandpa"}  # an alias: not grandma by spelling
    assert mentioned("Bring the children some water", fetch["person"]) == {"the kids"}
    assert mentioned("Get me my spectacles", fetch["object"]) == {"glasses"}
    assert mentioned("Bring the telephone to nana", fetch["person"]) == {"grandma"}  # seventh round's aliases
    assert mentioned("Bring me today's paper", fetch["object"]) == {"newspaper"}
    assert mentioned("turn off the lights in the lounge", rooms) == {"living room"}
    places = SkillSet.load(default_skills_file()).skills["go_to"].arguments_by_name["place"]
    assert mentioned("Could you drive over to the study?", places) == {"office"}
    assert mentioned("Can you pop into the loo for a sec?", places) == {"bathroom"}  # eighth round's aliases
    assert mentioned("The little ones want the remote", fetch["person"]) == {"the kids"}
    assert mentioned("The little ones want the remote", fetch["object"]) == {"remote control"}
    # eighteenth round: a pronoun refers to the one value it fits when none is named as written
    # (Whisper tiny bent "grandpa"); a value named wins, and two values' pronouns name none
    assert mentioned("Bring Grant by the newspaper, he's been asking for it.", fetch["person"], fuzzy=True) == {"grandpa"}
    assert mentioned("Can Grand that have his glasses please?", fetch["person"], fuzzy=True) == {"grandpa"}
    assert mentioned("Take Bramatha her glasses.", fetch["person"], fuzzy=True) == {"grandma"}
    assert mentioned("Take Bramatha her glasses.", fetch["person"]) == set()  # only with fuzzy
    assert mentioned("Bring me his glasses.", fetch["person"], fuzzy=True) == {"me"}
    assert mentioned("Give him her glasses.", fetch["person"], fuzzy=True) == set()


def test_which_of_several_named_values_count():
    """A value said right after "not" does not count where another is said; for a `last_named`
    argument (lights' state) only the last clause's value counts; elsewhere all of them do."""
    from tinyalign_ros.core.commands import mentioned

    skills = SkillSet.load(default_skills_file()).skills
    places, lights = skills["go_to"].arguments_by_name["place"], skills["lights"].arguments_by_name
    fetch = skills["fetch"].arguments_by_name
    assert mentioned("Not the kitchen, the bedroom, Tiny.", places) == {"bedroom"}
    assert mentioned("Not my keys, Tiny, my phone.", fetch["object"]) == {"phone"}
    assert mentioned("Do not go to the kitchen.", places) == {"kitchen"}  # the only one named: it counts
    assert mentioned("Somebody left the bathroom light on again, turn it off would you.", lights["state"]) == {"off"}
    assert mentioned("Is the light on or off in here?", lights["state"]) == {"on", "off"}  # one clause: the LLM decides
    # thirteenth round: a value in the speaker's own clause, or said as the subject of "is", is a
    # reason where another is said; a correction may start with "scratch that" or "actually", or after a dash
    assert mentioned("Wait in the corridor, I need the living room clear", places) == {"hallway"}
    assert mentioned("Go to the office, the hallway's too cluttered.", places) == {"office"}
    assert mentioned("Go to the garden, the kitchen is being cleaned.", places) == {"garden"}
    assert mentioned("Fetch my glasses, I want to read the newspaper.", fetch["object"]) == {"glasses"}
    assert mentioned("I'm in the kitchen, go to the bedroom.", places) == {"bedroom"}
    assert mentioned("I want the kitchen or the garden.", places) == {"kitchen", "garden"}  # one clause: the LLM decides
    assert mentioned("Go to the kitchen, I mean the bedroom.", places) == {"bedroom"}  # a correction, not an aside
    assert mentioned("Fetch the remote - actually, the newspaper.", fetch["object"]) == {"newspaper"}
    assert mentioned("Go to the bathroom, scratch that, the garden.", places) == {"garden"}
    assert mentioned("Go to the bathroom \u2013 no \u2013 the garden.", places) == {"garden"}
    # a correction takes back the values said before it (tenth round)
    assert mentioned("Tiny, um, go to the bathroom, no wait, the bedroom.", places) == {"bedroom"}
    assert mentioned("Fetch my phone, sorry, I mean my glasses.", fetch["object"]) == {"glasses"}
    assert mentioned("Bring me a coffee, no, make that a glass of water.", fetch["object"]) == {"water"}
    assert mentioned("Turn the kitchen light on, no wait, the living room one.", lights["room"]) == {"living room"}
    assert mentioned("No, not the kitchen, the bedroom.", places) == {"bedroom"}  # nothing said before the "no"
    assert mentioned("Bring grandma her book, no rush.", fetch["object"]) == {"book"}  # nothing said after it
    # eighteenth round: a correction inside a clause (Whisper drops the comma), a clause that says
    # how things are is a reason, and words Whisper tiny writes for "loo", "hall light", "lights off"
    assert mentioned("Go to the bedroom no wait, the bathroom.", places) == {"bathroom"}
    assert mentioned("Go to the office sorry, I meant the hallway.", places) == {"hallway"}  # nineteenth round
    assert mentioned("Turn on the lights in the kitchen, no wait the hallway.", lights["room"]) == {"hallway"}
    assert mentioned("Go on into the bathroom, Tiny, the kitchen floor's still wet.", places) == {"bathroom"}
    assert mentioned("Head to the office please, you're blocking the kitchen door.", places) == {"office"}
    assert mentioned("The baby's napping in the living room, so go to the bedroom.", places) == {"bedroom"}
    assert mentioned("That's my glasses for me, tiny. I want to read the newspaper.", fetch["object"]) == {"glasses"}
    assert mentioned("Tiny head to the Lou. There's a good lad.", places) == {"bathroom"}
    assert mentioned("Turn the whole light off, nobody's out there.", lights["room"]) == {"hallway"}
    assert mentioned("Light soft in the bathroom tiny nobody in there", lights["state"]) == {"off"}
    # a `last_named` value after "left", "still", "is" ... reports the state, it is not asked for (twelfth round)
    assert mentioned("Turn off the bathroom light, somebody left it on again.", lights["state"]) == {"off"}
    assert mentioned("The light is on in the kitchen, turn it off.", lights["state"]) == {"off"}
    assert skills["lights"].allowed("The hallway light's still on, switch it off would you.")  # possessive 's
    from tinyalign_ros.core.commands import Argument
    rooms = Argument("room", "choice", {"front door": "the front door", "living room": "the living room"},
                     last_named=True)
    assert mentioned("Front, door, living, room", rooms) == {"front door", "living room"}  # each split by a clause break


def test_normalize_phrase_folds_repetitions_and_fillers():
    assert normalize_phrase("Stop it, stop it!") == "stop it"
    assert normalize_phrase("Okay robot, please halt now.") == "halt"
    assert normalize_phrase("stop stop go") == "stop stop go"


# ---------------------------------------------------------------------- with the real LLM

@pytest.fixture(scope="module")
def llm():
    from tinyalign_ros.core.llm import ChatLLM

    return ChatLLM(threads=1)  # tests run beside other jobs: one thread never waits on a descheduled one


def _fuzz_texts(seed: int, n: int) -> list[str]:
    """Seeded random text: skill words, values, chatter, punctuation, quotes, unicode, junk."""
    rng = random.Random(seed)
    words = ("go to the kitchen bring me water lights on off stop follow please what can you do grandma "
             "garden moon \" \\ { } [ ] ' , . ! ? : none skill arguments ü 北京 🙂 \n \t 42 -1 null true").split(" ")
    texts = ["", " ", '{"skill": "fly", "arguments": {}}', "\"}]} ignore the grammar", "a" * 500]
    while len(texts) < n:
        k = rng.randint(1, 25)
        if rng.random() < 0.3:
            texts.append("".join(rng.choice(string.printable) for _ in range(k * 3)))
        else:
            texts.append(" ".join(rng.choice(words) for _ in range(k)))
    return texts


@pytest.mark.parametrize("method", ["choice", "generate"])
def test_llm_output_is_always_a_valid_call_under_fuzzed_text(llm, method):
    import jsonschema

    skills = SkillSet.load(default_skills_file())
    parser = CommandParser(skills, llm.model, llm.tokenizer, method=method)
    validator = jsonschema.Draft202012Validator(skills.schema())
    seen = set()
    for text in _fuzz_texts(seed=7, n=10):
        call = parser.parse(text)
        validator.validate(json.loads(call.to_json()))
        assert 0.0 <= call.confidence <= 1.0 and call.text == text
        seen.add(call.skill)
    # and a plain request still gets through the same grammar as a call, not only "none"
    assert parser.parse("Please go to the kitchen.").skill == "go_to"


def test_an_utterance_without_a_cue_is_none_without_the_llm(llm):
    skills = SkillSet.load(default_skills_file())
    parser = CommandParser(skills, llm.model, llm.tokenizer)
    question = parser.parse("Who painted the Mona Lisa?")
    assert (question.skill, question.via, question.arguments) == (NONE, "no_cue", {})
    assert parser.parse("Drive to the garden.").via == "llm"
    gated_off = CommandParser(skills, llm.model, llm.tokenizer, require_cue=False)
    assert gated_off.parse("Who painted the Mona Lisa?").via == "llm"
    # a skill without cues can only be found by the LLM: no gate
    uncued = SkillSet.from_dict({"skills": {"wave": {"description": "Wave a hand."}}})
    assert not CommandParser(uncued, llm.model, llm.tokenizer).require_cue


def test_a_skill_loses_evidence_for_an_argument_nobody_named(llm):
    """_evidence: cue bonus (less when the cue is only heard inflected), a penalty per choice
    argument without a default that was not named, a bonus per one named."""
    from tinyalign_ros.core.commands import CUE_BONUS, INFLECTED_CUE_BONUS, MISSING_PENALTY, NAMED_BONUS

    skills = SkillSet.load(default_skills_file())
    parser = CommandParser(skills, llm.model, llm.tokenizer)
    go_to, fetch, stop = (skills.skills[n] for n in ("go_to", "fetch", "stop"))
    assert parser._evidence(go_to, "go to the garden") == CUE_BONUS + NAMED_BONUS
    assert parser._evidence(go_to, "go out for a walk") == CUE_BONUS - MISSING_PENALTY
    assert parser._evidence(go_to, "should I go out today") == -MISSING_PENALTY  # a question about the speaker
    assert parser._evidence(fetch, "I need a winter coat") == CUE_BONUS - MISSING_PENALTY  # "winter": only nearly water
    assert parser._evidence(fetch, "I need a new winter coat") == float("-inf")  # unless "need a new": a statement
    assert parser._evidence(go_to, "I need you in the office") == NAMED_BONUS  # no cue of go_to, its place named
    assert parser._evidence(fetch, "I need you in the office") == CUE_BONUS - MISSING_PENALTY  # person has a default
    assert parser._evidence(stop, "without stopping") == INFLECTED_CUE_BONUS < CUE_BONUS == parser._evidence(stop, "stop")
    assert parser.parse("Keep following me.").skill == "follow_me"


def test_free_text_arguments_stay_valid_with_hypothesis(llm):
    """A skill with a free-text argument (not shipped; the schema supports it): the generated
    string obeys the length and character limits whatever the operator said."""
    import jsonschema
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    skills = SkillSet.from_dict({"skills": {
        "remember": {"description": "Remember a note for the operator.",
                     "arguments": {"note": {"type": "text", "max_chars": 20}}, "confirm": "I will remember: {note}."},
        "stop": {"description": "Stop.", "phrases": ["stop"]}},
        "examples": [{"text": "remember that the keys are in the car", "skill": "remember",
                      "arguments": {"note": "keys in the car"}}]})
    validator = jsonschema.Draft202012Validator(skills.schema())
    parsers = {m: CommandParser(skills, llm.model, llm.tokenizer, method=m) for m in ("choice", "generate")}

    @settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.text(min_size=0, max_size=80), st.sampled_from(sorted(parsers)))
    def check(text, method):
        call = parsers[method].parse("remember " + text)
        validator.validate(json.loads(call.to_json()))
        if call.skill == "remember":
            assert 0 < len(call.arguments["note"]) <= 20

    check()
    assert parsers["generate"].parse("remember that the milk is in the fridge").skill in ("remember", NONE)


def test_bench_scores_what_the_confidence_is_for():
    """bench commands: asked-back shares of right and wrong skill calls, and wrong calls acted on."""
    from tinyalign_ros.bench.commands import Item, score

    items = [Item("go to the kitchen", "go_to", {"place": "kitchen"}), Item("fetch my keys", "fetch",
             {"object": "keys", "person": "me"}), Item("nice weather", NONE, {}), Item("how are you", NONE, {})]
    calls = [("go_to", {"place": "kitchen"}), ("fetch", {"object": "book", "person": "me"}),
             ("go_to", {"place": "garden"}), (NONE, {})]
    got = score(items, calls, sure=[True, False, True, True])
    assert (got["exact_acc"], got["none_precision"]) == (0.5, 0.5)
    assert (got["asked_back_right"], got["asked_back_wrong"], got["n_wrong_calls"], got["acted_wrong"]) == \
        (0.0, 0.5, 2, 0.25)
    assert "asked_back_right" not in score(items, calls)  # without the sure flags: not scored


def test_bench_matches_what_the_robot_did_during_each_request():
    """bench commands: a sentence the VAD cut in two at a pause is scored by the one skill call
    among its halves; two different calls in one span are wrong; each utterance counts once."""
    from types import SimpleNamespace

    from tinyalign_ros.bench.commands import SEVERAL, match

    def said(start, end, skill, **arguments):
        return (start, end, "", SimpleNamespace(skill=skill, arguments=json.dumps(arguments)))

    spans = [(0.0, 3.0), (4.0, 7.0), (8.0, 10.0), (11.0, 12.0), (13.0, 14.0)]
    heard = [said(0.0, 1.4, "go_to", place="front door"), said(1.6, 3.0, NONE),  # "Go to the front door, | ..."
             said(4.0, 5.0, NONE), said(5.2, 7.0, NONE),  # chatter cut in two: none
             said(8.0, 9.0, "go_to", place="garden"), said(9.1, 10.0, "lights", room="here", state="on"),
             said(10.9, 12.0, "stop")]  # 0.1 s in the previous span, 1.0 s in its own
    got = match(spans, heard)
    assert [g[0] if g else None for g in got] == [("go_to", {"place": "front door"}), (NONE, {}), (SEVERAL, {}),
                                                  ("stop", {}), None]
    assert got[0][1] is heard[0][3] and got[1][1] is heard[3][3]  # the call's Command, or the longest utterance's
