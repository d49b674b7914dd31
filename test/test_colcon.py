"""The real-ROS path: `colcon build` of a copy of the checkout, then the code run from `install/`.

What a robot builder does (README, "On a robot with ROS 2"): the package in a workspace's `src/`,
`colcon build --packages-select tinyalign_ros`, `source install/setup.bash`, then the nodes. Here the
ROS 2 underlay is the project's venv (the pip wheels, with our venv's python first on PATH, as
`source .venv/bin/activate` would do); colcon itself is Debian's:

    apt-get install colcon python3-colcon-ros python3-colcon-cmake python3-colcon-python-setup-py \\
        python3-colcon-package-selection python3-colcon-output python3-colcon-parallel-executor \\
        python3-colcon-library-path python3-colcon-bash

(`make test` installs them). Every run is made with PYTHONVERBOSE=1, so the interpreter names the
file of each module it imports: every `tinyalign_ros` module must come from the install space,
none from the checkout that the venv's editable install points at.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, wait_for

VENV = Path(sys.prefix)
PACKAGE = "tinyalign_ros"
# a module file as PYTHONVERBOSE prints it: "# /x/tinyalign_ros/core/asr.py matches ...", "code object from '...pyc'"
MODULE_FILE = re.compile(r"(/[^\s'\"]*?/tinyalign_ros/[^\s'\"]*?\.pyc?)\b")


def loaded_modules(verbose_stderr: str) -> set[str]:
    """The tinyalign_ros source and bytecode files a PYTHONVERBOSE run imported."""
    return set(MODULE_FILE.findall(verbose_stderr))


def test_loaded_modules_reads_python_verbose_output():
    err = ("import 'tinyalign_ros' # <...SourceFileLoader object at 0x7f>\n"
           "# /ws/install/tinyalign_ros/lib/python3.11/site-packages/tinyalign_ros/core/__pycache__/asr.cpython-311.pyc"
           " matches /ws/install/tinyalign_ros/lib/python3.11/site-packages/tinyalign_ros/core/asr.py\n"
           "# code object from '/src/checkout/tinyalign_ros/cli.py'\nimport 'numpy' # from '/venv/numpy/__init__.py'\n")
    assert loaded_modules(err) == {
        "/ws/install/tinyalign_ros/lib/python3.11/site-packages/tinyalign_ros/core/__pycache__/asr.cpython-311.pyc",
        "/ws/install/tinyalign_ros/lib/python3.11/site-packages/tinyalign_ros/core/asr.py",
        "/src/checkout/tinyalign_ros/cli.py"}


def checkout_files() -> list[str]:
    """The checkout as a clone would have it: tracked files, and new ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name and (REPO / name).is_file()]


def ros_env(**extra: str) -> dict[str, str]:
    """This process's environment with the venv as the ROS 2 underlay, as an activated venv has it."""
    env = dict(os.environ, VIRTUAL_ENV=str(VENV), PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}",
               AMENT_PREFIX_PATH=str(VENV), CMAKE_PREFIX_PATH=str(VENV), **extra)
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A colcon workspace with a copy of the checkout in src/, built."""
    if shutil.which("colcon") is None:
        pytest.fail("colcon is missing: apt-get install colcon python3-colcon-ros python3-colcon-cmake "
                    "python3-colcon-python-setup-py python3-colcon-package-selection python3-colcon-output "
                    "python3-colcon-parallel-executor python3-colcon-library-path python3-colcon-bash "
                    "(make test installs them)")
    ws = tmp_path_factory.mktemp("colcon_ws")
    src = ws / "src" / PACKAGE
    for name in checkout_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    proc = subprocess.run(
        ["colcon", "build", "--packages-select", PACKAGE,
         "--cmake-args", f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF"],
        cwd=ws, env=ros_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return ws


def in_install_space(ws: Path, command: str, **kwargs) -> subprocess.Popen:
    """`command` in bash after `source install/setup.bash`, with PYTHONVERBOSE on; outside the checkout."""
    env = ros_env(PYTHONVERBOSE="1", **kwargs.pop("env", {}))
    cwd = ws / "elsewhere"
    cwd.mkdir(exist_ok=True)
    return subprocess.Popen(["bash", "-c", f"source {ws / 'install' / 'setup.bash'} && exec {command}"],
                            cwd=cwd, env=env, **kwargs)


def assert_from_install_space(ws: Path, modules: set[str], expected: list[str]) -> None:
    prefix = str(ws / "install" / PACKAGE / "lib")
    outside = sorted(m for m in modules if not m.startswith(prefix))
    assert not outside, f"tinyalign_ros modules loaded from outside {prefix}: {outside[:10]}"
    for rel in expected:
        assert any(m.endswith(f"/site-packages/tinyalign_ros/{rel}") for m in modules), f"{rel} was not imported"


def test_colcon_installs_nodes_launch_config_and_models(workspace):
    share = workspace / "install" / PACKAGE / "share" / PACKAGE
    site = next((workspace / "install" / PACKAGE / "lib").glob("python3*/site-packages")) / PACKAGE
    from tinyalign_ros.nodes.graph import NODES

    for node in NODES:
        assert os.access(workspace / "install" / PACKAGE / "lib" / PACKAGE / node, os.X_OK), node
    for rel in ("launch/assistant.launch.py", "launch/booster.launch.py", "config/assistant.yaml",
                "models/exit_heads.safetensors", "models/projector.safetensors", "models/boost_fusion.safetensors"):
        assert (share / rel).is_file(), rel
    for rel in ("__init__.py", "cli.py", "nodes/asr_node.py", "core/asr.py", "msg/_utterance.py"):
        assert (site / rel).is_file(), rel


def test_the_graph_runs_from_the_install_space_on_the_demo_file(workspace, demo_file):
    path, segments = demo_file
    # a domain of its own: the graph's nodes must not meet this test process's
    proc = in_install_space(workspace, f"python3 -m tinyalign_ros.cli run --input {path} --fast --jsonl",
                            env={"ROS_DOMAIN_ID": str((int(os.environ["ROS_DOMAIN_ID"]) + 50) % 100 + 1)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    answered = [r for r in rows if not r.get("dropped") and r["response"].strip()]
    assert len(answered) == len(segments), out
    assert_from_install_space(workspace, loaded_modules(err),
                              ["cli.py", "nodes/graph.py", "nodes/asr_node.py", "nodes/assistant_node.py",
                               "core/asr.py", "core/llm.py", "msg/_utterance.py"])


def test_a_node_executable_from_install_publishes_the_demo_file(workspace, demo_file, ros):
    from tinyalign_ros.msg import AudioChunk
    from tinyalign_ros.nodes.common import AUDIO_QOS

    path, _ = demo_file
    chunks: list[AudioChunk] = []
    ros.node("listener").create_subscription(AudioChunk, "audio", chunks.append, AUDIO_QOS)
    executable = workspace / "install" / PACKAGE / "lib" / PACKAGE / "mic_node"
    log = workspace / "mic_node.log"
    with log.open("w") as err:
        # real time: a fast file source would wait for an asr_node's consumption reports
        proc = in_install_space(workspace, f"{executable} --ros-args -r __ns:=/tinyalign -p input_file:={path}",
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            wait_for(lambda: any(c.end_of_stream for c in chunks), timeout=120,
                     what="the whole file on /tinyalign/audio",
                     state=lambda: f"{len(chunks)} chunks; exit code {proc.poll()}")
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    import soundfile as sf

    seconds = sum(len(c.samples) for c in chunks) / 16000
    assert seconds >= sf.info(str(path)).duration  # the whole file (plus mic_node's tail silence)
    assert_from_install_space(workspace, loaded_modules(log.read_text()), ["nodes/mic_node.py", "core/audio.py"])
