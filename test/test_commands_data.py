"""The request and chatter sets of `tinyalign bench commands` (data/): each split loads, the
held-out split covers every skill and every argument value, and its sentences appear in no dev
split, no chatter list the parser was tuned on and no few-shot example of the skills file."""
from __future__ import annotations

import re

import pytest
import yaml

from tinyalign_ros.core.skill_data import DATA, SPLITS, load_items
from tinyalign_ros.core.commands import NONE, SkillSet, default_skills_file


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower().replace("’", "'")))


@pytest.mark.parametrize("split", SPLITS)
def test_every_split_loads_as_checked_calls(split):
    skills = SkillSet.load(default_skills_file())
    items = load_items(split, 10_000)
    requests = [it for it in items if it.skill != NONE]
    assert requests and len(items) > len(requests)
    for it in requests:
        assert skills.check({"skill": it.skill, "arguments": it.arguments}) == (it.skill, it.arguments)
    assert len(load_items(split, 3, n_commands=2)) == 5


def test_an_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="split must be one of"):
        load_items("test", 10)


def test_the_held_out_split_covers_every_skill_and_value():
    skills = SkillSet.load(default_skills_file())
    items = load_items("heldout", 10_000)
    requests = [it for it in items if it.skill != NONE]
    assert len(requests) >= 60 and len(items) - len(requests) >= 40
    assert {it.skill for it in requests} == set(skills.skills)
    for skill in skills.skills.values():
        for arg in skill.arguments:
            said = {it.arguments[arg.name] for it in requests if it.skill == skill.name}
            assert said == set(arg.values), (skill.name, arg.name, set(arg.values) - said)


def test_the_held_out_sentences_were_never_tuned_on():
    held_out = [_norm(it.text) for it in load_items("heldout", 10_000)]
    assert len(set(held_out)) == len(held_out)
    seen = {_norm(it.text) for split in SPLITS if split != "heldout" for it in load_items(split, 10_000)}
    seen |= {_norm(q) for q in (DATA / "questions.txt").read_text().splitlines()}
    seen |= {_norm(e["text"]) for e in yaml.safe_load(default_skills_file().read_text())["examples"]}
    assert not set(held_out) & seen, sorted(set(held_out) & seen)
