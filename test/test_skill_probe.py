"""The skill probe (core/skill_probe.py): fit, save/load and its refusals; the parser reads the
same features it was fit on and follows it where no cue was said (real SmolLM2); the shipped probe
and `tinyalign train skills`."""
from __future__ import annotations

import json

import pytest
import torch

from tinyalign_ros.core.commands import NONE, CommandParser, SkillSet, default_skills_file
from tinyalign_ros.core.models import shipped_model
from tinyalign_ros.core.skill_probe import SkillProbe, SkillProbeError, llm_fingerprint

NAMES = ["go_to", "stop", NONE]


@pytest.fixture(scope="module")
def llm():
    from tinyalign_ros.core.llm import ChatLLM

    return ChatLLM(threads=2)


@pytest.fixture(scope="module")
def skills():
    return SkillSet.load(default_skills_file())


def _blobs(n: int = 30, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(NAMES), d, generator=g) * 4
    labels = [NAMES[i % len(NAMES)] for i in range(n)]
    feats = torch.stack([centres[NAMES.index(y)] + torch.randn(d, generator=g) for y in labels])
    return feats, labels, centres


def test_a_probe_fits_saves_loads_and_refuses_other_skills_or_llms(tmp_path):
    feats, labels, centres = _blobs()
    probe = SkillProbe.fit(feats, labels, NAMES, layer=3, llm="llm-a")
    for name, centre in zip(NAMES, centres):
        p = probe.probs(centre)
        assert max(p, key=p.get) == name and abs(sum(p.values()) - 1) < 1e-5
    path = tmp_path / "probe.safetensors"
    probe.save(path)
    back = SkillProbe.load(path)
    assert (back.labels, back.layer, back.llm) == (NAMES, 3, "llm-a")
    assert back.probs(centres[1]) == pytest.approx(probe.probs(centres[1]))
    back.check(list(reversed(NAMES)), "llm-a")  # the order of the skill set does not matter
    with pytest.raises(SkillProbeError, match="fit for skills"):
        back.check(["go_to", NONE], "llm-a")
    with pytest.raises(SkillProbeError, match="fit on LLM"):
        back.check(NAMES, "llm-b")
    with pytest.raises(SkillProbeError, match="not among"):
        SkillProbe.fit(feats, labels[:-1] + ["fly"], NAMES, layer=3, llm="llm-a")
    (tmp_path / "torn.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(SkillProbeError, match="not a valid safetensors"):
        SkillProbe.load(tmp_path / "torn.safetensors")
    with pytest.raises(SkillProbeError, match="not found"):
        SkillProbe.load(tmp_path / "missing.safetensors")


def _biased_probe(model, skills: SkillSet, favourite: str, p_favourite: float, layer: int = 2) -> SkillProbe:
    """A probe that says `favourite` with probability `p_favourite` whatever it hears (the rest shared)."""
    names = list(skills.skills) + [NONE]
    d = model.config.hidden_size
    rest = (1 - p_favourite) / (len(names) - 1)
    bias = torch.tensor([p_favourite if n == favourite else rest for n in names]).log()
    return SkillProbe(names, layer, torch.zeros(len(names), d), bias, torch.zeros(d), torch.ones(d),
                      llm_fingerprint(model))


def test_the_parser_reads_the_features_the_probe_was_fit_on(llm, skills):
    """`features` (what `tinyalign train skills` fits on) equals what `choose` reads in its own pass."""
    names = list(skills.skills) + [NONE]
    d = llm.model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    probe = SkillProbe(names, 14, torch.randn(len(names), d, generator=g), torch.zeros(len(names)),
                       torch.zeros(d), torch.ones(d) * 30, llm_fingerprint(llm.model))
    parser = CommandParser(skills, llm.model, llm.tokenizer, probe=probe)
    for text in ("Please go to the kitchen.", "I want you in the bedroom", "N/A"):  # N/A: the calibration request
        parser.parse(text)
        assert parser.last_probe == pytest.approx(probe.probs(parser.features(text, 14)), abs=1e-4)


def test_without_a_cue_the_probe_names_the_skill_only_when_it_is_sure(llm, skills):
    sure = CommandParser(skills, llm.model, llm.tokenizer, probe=_biased_probe(llm.model, skills, "go_to", 0.95))
    call = sure.parse("Pop out to the garden for me.")  # no cue of any skill
    assert (call.skill, call.arguments, call.via) == ("go_to", {"place": "garden"}, "probe")
    assert call.confidence == pytest.approx(0.95, abs=1e-3)
    unsure = CommandParser(skills, llm.model, llm.tokenizer, probe=_biased_probe(llm.model, skills, "go_to", 0.4))
    call = unsure.parse("Pop out to the garden for me.")
    assert (call.skill, call.via) == (NONE, "probe")
    # a skill whose required words were not said is never the probe's pick ("lights" needs light, lamp, dark, ...)
    lights = CommandParser(skills, llm.model, llm.tokenizer, probe=_biased_probe(llm.model, skills, "lights", 0.99))
    assert lights.parse("Make the office cosier.").skill == NONE
    # without a probe the same request is "none" at once, as before
    assert CommandParser(skills, llm.model, llm.tokenizer).parse("Pop out to the garden for me.").via == "no_cue"


def test_a_probe_for_another_skill_set_is_refused(llm, skills):
    other = SkillSet.from_dict({"skills": {"wave": {"description": "Wave a hand.", "cues": ["wave"]}}})
    with pytest.raises(SkillProbeError, match="fit for skills"):
        CommandParser(other, llm.model, llm.tokenizer, probe=_biased_probe(llm.model, skills, "go_to", 0.9))


def test_the_shipped_probe_fits_the_shipped_skills_and_llm(llm, skills):
    probe = SkillProbe.load(shipped_model("skill_probe.safetensors"))
    parser = CommandParser(skills, llm.model, llm.tokenizer, probe=probe)  # refuses a stale probe
    # dev-split requests that say no cue word (data/skill_requests_dev4.tsv), and chatter
    call = parser.parse("Pop out to the garden for me.")
    assert (call.skill, call.arguments, call.via) == ("go_to", {"place": "garden"}, "probe")
    assert parser.parse("Who painted the Mona Lisa?").skill == NONE
    # the robot's name alone, or a filler, asks for nothing (the probe alone made them stop: short like "stop!")
    # and so do thanks and praise (the probe took "Great, cheers." for stop), unless a skill is asked for too
    for said in ("Tiny.", "Hey Tiny.", "Okay.", "Please.", "Great, cheers.", "Thanks, that's perfect.", "Nice, well done.",
                 "No worries.", "Never mind."):
        call = parser.parse(said)
        assert (call.skill, call.via) == (NONE, "empty"), said
    assert parser.parse("Thanks, now stop.").skill == "stop"
    # said to someone else (the probe took "Your phone is ringing, love." for fetch), except a stop
    for said in ("Your phone is ringing, Dad.", "Mum.", "Mum, bring me the remote.", "Grandpa, come and sit with us for a bit."):
        call = parser.parse(said)
        assert (call.skill, call.via) == (NONE, "others"), said
    assert (parser.parse("Honey, stop!").skill, parser.parse("Honey, stop!").via) == ("stop", "stop_clause")
    # sixteenth round: a term of endearment is said to the robot too, but its stop comes only from the fast path
    call = parser.parse("Could you bring me a mug of coffee, love?")
    assert (call.skill, call.arguments) == ("fetch", {"object": "coffee", "person": "me"})
    for said in ("Stop worrying so much, love.", "Stop by the bakery on your way home, honey.", "Honey."):
        assert parser.parse(said).skill == NONE, said
    assert parser.parse("Don't stop now, you're nearly done.").skill == NONE  # a negated cue is no command
    # eighteenth round: a report, a passive, a tale are no requests (the probe took each for one);
    # "go get" is a fetch; a pronoun tells whom to bring it to when the name was misheard
    for said in ("I already turned the lights off.", "The meeting got moved to the big office upstairs.",
                 "Grandpa nodded off reading the paper."):
        assert parser.parse(said).skill == NONE, said
    call = parser.parse("Could you go get my keys from the hallway?")
    assert (call.skill, call.arguments) == ("fetch", {"object": "keys", "person": "me"})
    call = parser.parse("Take Bramatha her glasses.")
    assert (call.skill, call.arguments) == ("fetch", {"object": "glasses", "person": "grandma"})
    # twelfth round: the probe may not pick what the speaker does (it took this for go_to), nor a
    # skill an `unless` phrase rules out (a sigh is not a question to the robot)
    for said in ("I'll go to the kitchen myself, don't worry about it.", "Oh well, it's raining again, what can you do."):
        assert parser.parse(said).skill == NONE, said
    assert parser.parse("Tiny, what can you do?").skill == "what_can_you_do"
    # a stop cue before what the robot does: the stop, not the drive (tenth round: this was go_to)
    call = parser.parse("Please stop driving toward the kitchen.")
    assert (call.skill, call.via) == ("stop", "stop_doing")


def test_train_skills_fits_a_probe_the_parser_takes_and_never_on_the_held_out_split(tmp_path, llm, skills):
    from tinyalign_ros.train.skills import main

    with pytest.raises(SystemExit, match="held-out split is never fit on"):
        main(["--splits", "dev,heldout", "--voices", "0", "--out", str(tmp_path / "x.safetensors")])
    out = tmp_path / "probe.safetensors"
    assert main(["--splits", "dev,dev2", "--voices", "0", "--out", str(out), "--loo-probes", str(tmp_path / "loo")]) == 0
    left_out = SkillProbe.load(tmp_path / "loo" / "without_dev2.safetensors")  # fit on dev alone
    assert left_out.meta["left_out"] == "dev2" and sorted(p.name for p in (tmp_path / "loo").iterdir()) == [
        "without_dev.safetensors", "without_dev2.safetensors"]
    assert main(["--splits", "dev", "--voices", "0", "--out", str(out)]) == 0
    probe = SkillProbe.load(out)
    assert probe.meta["splits"] == '["dev"]'
    CommandParser(skills, llm.model, llm.tokenizer, probe=probe)
    assert (tmp_path / "probe.metrics.json").is_file()
    # --baseline: the probe it would replace, scored on the same rows (its own data here: all right)
    with pytest.raises(SystemExit, match="reads layer"):
        main(["--splits", "dev", "--voices", "0", "--layer", str(probe.layer - 1), "--baseline", str(out),
              "--out", str(tmp_path / "x.safetensors")])
    assert main(["--splits", "dev", "--voices", "0", "--baseline", str(out), "--out", str(tmp_path / "new.safetensors")]) == 0
    scores = json.loads((tmp_path / "new.metrics.json").read_text())["baseline"]["scores"]["dev"]["text"]
    assert scores["n_requests"] == 40 and scores["skill_acc"] > 0.9


def test_the_probe_setting_names_the_shipped_file_by_default():
    from tinyalign_ros.core.skill_probe import probe_path

    assert probe_path("") == str(shipped_model("skill_probe.safetensors"))
    assert probe_path("off") == "off" and probe_path("/robot/probe.safetensors") == "/robot/probe.safetensors"
