"""Shared fixtures: tiny seeded models (no network), an isolated PROTEGE_HOME, built-in model gate."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hermetic: nothing may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `precision: auto` means bf16 on a CPU with bf16 units; the suite's exactness checks (resume, 2 processes
# = 1, greedy = HF generate) compare fp32 runs, and the precision tests ask for bf16 explicitly.
os.environ.setdefault("PROTEGE_PRECISION", "fp32")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _torch_threads(request):
    """Tiny models: one intra-op thread (thread start-up costs more than the math; far faster when the
    CPU is shared). Tests marked slow run the built-in models and keep torch's default."""
    import torch

    before = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama():
    from tiny import tiny_model

    return tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gemma():
    from tiny import tiny_model

    return tiny_model("gemma", seed=0)


@pytest.fixture()
def tiny_llama_dir(tmp_path, tiny_llama):
    """The tiny LLaMA saved as an HF folder, for code that loads models by path."""
    model, tok = tiny_llama
    out = tmp_path / "tiny-llama"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture()
def tiny_policy_dir(tmp_path):
    """The tiny LLaMA with a head of larger weights: at the default init its logits are near uniform
    (log p ~ -log 512 everywhere) and no adapter can move them in a few steps."""
    import torch

    from tiny import tiny_model

    model, tok = tiny_model("llama", seed=0)
    torch.manual_seed(1)
    model.lm_head.weight.data.normal_(0.0, 0.3)
    out = tmp_path / "policy"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def assert_same_tensors(file_a, file_b, atol: float = 1e-5) -> None:
    """Two safetensors files hold the same names and (within `atol`) the same values: a resumed run
    ended where an uninterrupted one did."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(file_a)), load_file(str(file_b))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), k


def builtin_model(alias: str) -> str:
    """Skip unless the built-in alias was pulled (CI pulls them before the tests; see .ci/run)."""
    from protege.models import is_pulled

    if not is_pulled(alias):
        pytest.skip(f"built-in model {alias} not pulled; run `protege pull {alias}` (CI does)")
    return alias


@pytest.fixture()
def shared_data():
    if not SHARED_DATA.exists():
        pytest.skip(f"public benchmark files not found at {SHARED_DATA}")
    return SHARED_DATA


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not path:
        pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver; CI does)")
    return path


def launch_ddp(method: str, config, yaml_path) -> str:
    """`protege train METHOD --config YAML` on two DDP processes (gloo) through the shipped
    recipes/accelerate/ddp.yaml; `config` (a stage config) is written to `yaml_path` first. Returns stderr."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    import pytest
    import yaml

    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not installed")
    Path(yaml_path).write_text(yaml.safe_dump(config.model_dump(mode="json")))
    ddp = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "ddp.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["accelerate", "launch", "--config_file", str(ddp), "--num_processes", "2",
                           "--mixed_precision", "no", "-m", "protege.cli", "train", method, "--config",
                           str(yaml_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr
