"""Start the tinyalign_ros assistant graph on a real ROS 2 install.

    ros2 launch tinyalign_ros assistant.launch.py [params_file:=my.yaml] [input_file:=speech.wav]

`tinyalign run` builds the same graph in one process for venvs without `launch`; both read
config/assistant.yaml and start the nodes of tinyalign_ros.nodes.graph.NODES (tested).
booster_node (knowledge-boosting teacher) starts only with booster:=true; on a real robot it
belongs on a stronger machine of the same ROS 2 network (booster.launch.py there).
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory("tinyalign_ros"), "config", "assistant.yaml")
    params_file = LaunchConfiguration("params_file")
    input_file = LaunchConfiguration("input_file")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="parameter YAML for every node"),
        DeclareLaunchArgument("input_file", default_value="",
                              description="WAV/FLAC to play instead of the microphone"),
        DeclareLaunchArgument("booster", default_value="false",
                              description="also start booster_node on this machine (Whisper base teacher)"),
        Node(package="tinyalign_ros", executable="mic_node", name="mic_node", namespace="tinyalign",
             parameters=[params_file, {"input_file": input_file}], output="screen"),
        Node(package="tinyalign_ros", executable="asr_node", name="asr_node", namespace="tinyalign",
             parameters=[params_file], output="screen"),
        Node(package="tinyalign_ros", executable="assistant_node", name="assistant_node", namespace="tinyalign",
             parameters=[params_file], output="screen"),
        Node(package="tinyalign_ros", executable="tts_node", name="tts_node", namespace="tinyalign",
             parameters=[params_file], output="screen"),
        Node(package="tinyalign_ros", executable="personalizer_node", name="personalizer_node",
             namespace="tinyalign", parameters=[params_file], output="screen"),
        Node(package="tinyalign_ros", executable="booster_node", name="booster_node", namespace="tinyalign",
             parameters=[params_file], output="screen", condition=IfCondition(LaunchConfiguration("booster"))),
    ])
