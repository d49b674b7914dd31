"""The launch file (real ROS installs) and `tinyalign run` (venvs) must start the same graph."""
from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tinyalign_ros.nodes.graph import NAMESPACE, NODES, default_config

REPO = Path(__file__).resolve().parents[1]


def launch_nodes(path: Path) -> list[dict]:
    """The keyword arguments of every launch_ros Node(...) in a launch file, read from its AST
    (`launch` is not installable from pip, so the file cannot be imported here)."""
    nodes = []
    for call in ast.walk(ast.parse(path.read_text())):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "Node":
            kw = {k.arg: k.value for k in call.keywords}
            nodes.append({
                **{k: kw[k].value for k in ("package", "executable", "name", "namespace")},
                "params": [ast.unparse(p) for p in kw["parameters"].elts],
            })
    return nodes


def test_launch_file_starts_the_embedded_graph_nodes_with_the_same_yaml():
    nodes = launch_nodes(REPO / "launch" / "assistant.launch.py")
    assert sorted(n["name"] for n in nodes) == sorted(NODES)
    for n in nodes:
        assert n["package"] == "tinyalign_ros" and n["namespace"] == NAMESPACE
        assert n["executable"] == n["name"]
        assert n["params"][0] == "params_file"  # the same YAML as `tinyalign run`
        assert (REPO / "bin" / n["executable"]).is_file()


def test_yaml_has_one_section_per_node():
    config = yaml.safe_load(default_config().read_text())
    assert sorted(config) == sorted(f"/{NAMESPACE}/{n}" for n in NODES)
    for section in config.values():
        assert "ros__parameters" in section


def test_cmake_installs_every_node_executable():
    cmake = (REPO / "CMakeLists.txt").read_text()
    for name in NODES:
        assert f"bin/{name}" in cmake
