"""Pure-Python install of tinyalign_ros for venv users (the `tinyalign` command).

A real ROS workspace builds the package with colcon through CMakeLists.txt, which also
generates the msg/srv types; in a venv, scripts/build_interfaces.sh does that part.
"""
from setuptools import find_packages, setup

setup(
    name="tinyalign_ros",
    version="0.1.0",
    description="Speech aligned straight into a small LLM, personalized on the robot (ROS 2)",
    packages=find_packages(include=["tinyalign_ros", "tinyalign_ros.*"]),
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "tinyalign = tinyalign_ros.cli:main",
            "tinyalign-mic-node = tinyalign_ros.nodes.mic_node:main",
            "tinyalign-asr-node = tinyalign_ros.nodes.asr_node:main",
            "tinyalign-assistant-node = tinyalign_ros.nodes.assistant_node:main",
            "tinyalign-personalizer-node = tinyalign_ros.nodes.personalizer_node:main",
        ]
    },
)
