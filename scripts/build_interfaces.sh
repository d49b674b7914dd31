#!/usr/bin/env bash
# Generate and install tinyalign_ros' msg/srv types into a venv with plain cmake, from the ROS 2
# pip wheels (docs/design.md section 3). No ROS install and no setup.sh to source afterwards.
set -euo pipefail
VENV="$(cd "${1:?usage: build_interfaces.sh VENV}" && pwd)"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="$ROOT/build/interfaces"
PY="$VENV/bin/python"

# The wheels' cmake exports hard-code the include dirs of the machine that built them.
py_inc="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
np_inc="$("$PY" -c 'import numpy; print(numpy.get_include())')"
if [ ! -f "$py_inc/Python.h" ]; then
  echo "error: Python headers not found in $py_inc (apt-get install python3-dev)" >&2
  exit 1
fi
{ grep -rlZ --include='*.cmake' '/opt/python/cp311-cp311' "$VENV/share" 2>/dev/null || true; } \
  | xargs -0 -r sed -i \
      -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$np_inc#g" \
      -e "s#/opt/python/cp311-cp311/include/python3.11#$py_inc#g"

mkdir -p "$BUILD"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$VENV" -DCMAKE_INSTALL_PREFIX="$VENV" \
  -DPython3_EXECUTABLE="$PY" -DBUILD_TESTING=OFF -DTINYALIGN_INSTALL_PYTHON_SOURCES=OFF >"$BUILD/configure.log" \
  || { cat "$BUILD/configure.log" >&2; exit 1; }
cmake --build "$BUILD" -j"$(nproc)" >"$BUILD/build.log" || { tail -50 "$BUILD/build.log" >&2; exit 1; }
cmake --install "$BUILD" >"$BUILD/install.log"
# rosidl also installs a `tinyalign_ros` egg-info; pip owns that distribution name in a venv
# (editable install of the checkout) and would uninstall the generated code along with it.
site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf "$site"/tinyalign_ros-*.egg-info
# ...and an empty tinyalign_ros/__init__.py that would shadow the checkout's package. Without it
# the generated msg/srv folder is a plain directory that the checkout's __init__ merges in.
rm -rf "$site"/tinyalign_ros/__init__.py "$site"/tinyalign_ros/__pycache__
(cd / && "$PY" -c 'from tinyalign_ros.msg import AudioChunk, Utterance, Response; from tinyalign_ros.srv import Personalize') \
  && echo "interfaces installed into $VENV"
