"""No committed file names a build machine: a clone must mean the same on every robot.

The rule: no file that git tracks may contain an absolute path into a developer's or a build
machine's own folders, i.e. one under the work, home or root folders (`/work`, `/home`,
`/root` followed by a name). Such a path names one machine's checkout, corpus or user, and is
wrong on every other machine; results and model cards store paths relative to the repository
instead (`core.metrics.portable_path`). System locations that are the same on every Debian
machine stay allowed, e.g. `/usr/share/pocketsphinx/test/data` (where `pocketsphinx-testdata`
installs the real recordings), `/proc/...`, `/opt/...`; so do ROS names (`/tinyalign/...`) and
`~/...` or `$TINYALIGN_HOME/...` forms, which each machine resolves for itself. Binary files
are scanned too (safetensors metadata can carry a command line).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# built from parts so that this file does not match itself
MACHINE_PATH = re.compile(rb"(?<![\w.~$-])/(?:" + b"|".join([b"work", b"home", b"root"]) + rb")/[\w.-]+")


def machine_paths(data: bytes) -> list[str]:
    return sorted({m.group().decode(errors="replace") for m in MACHINE_PATH.finditer(data)})


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (an installed copy has no git history to check)")
    return [REPO / name for name in out.decode().split("\0") if name and (REPO / name).is_file()]


def test_the_rule_catches_machine_paths_and_lets_system_paths_through():
    assert machine_paths(b'"corpus": "' + b"/wo" + b'rk/main/build/corpus"') == ["/" + "work/main"]
    assert machine_paths(b"--out /ho" + b"me/alice/models/x.safetensors") == ["/" + "home/alice"]
    assert machine_paths(b"cd /ro" + b"ot/ws") == ["/" + "root/ws"]
    assert machine_paths(b"/usr/share/pocketsphinx/test/data /tinyalign/asr_node ~/ws $TINYALIGN_HOME/x") == []
    assert machine_paths(b"bench/results/wo" + b"rk/ is a relative folder") == []


def test_no_committed_file_names_a_build_machine():
    files = tracked_files()
    assert len(files) > 50, "git ls-files listed almost nothing: the scan would prove nothing"
    offenders = {str(f.relative_to(REPO)): found for f in files if (found := machine_paths(f.read_bytes()))}
    assert not offenders, f"absolute paths of a build machine in committed files: {offenders}"
