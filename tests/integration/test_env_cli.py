"""`gen env` through the real CLI: it names the CPU platform and why, reports the npu rules when
asked, imports no model library, and survives a broken torch_npu install (one whose import
raises, registered as torch's device backend extension, as torch_npu without CANN is)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def _gen(*args: str, env: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("gen")
    assert exe, "the `gen` console script is not installed (pip install -e .)"
    full = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, env={**full, **(env or {})})


def test_gen_env_names_the_cpu_platform_and_why() -> None:
    proc = _gen("env", drop=("GEN_PLATFORM", "GEN_PLATFORM_RULES"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "platform: cpu"
    assert lines[1].startswith("  why: no accelerator (cuda: torch.cuda.is_available() is False; npu: ")
    for expected in ("backend: gloo", "dtype (--dtype auto): float32", "attention backend: native",
                     "forbidden dtypes: none", "platform policies: cuda, npu, cpu"):  # fmt: skip
        assert expected in lines, proc.stdout
    versions = next(line for line in lines if line.startswith("versions: "))
    for name in ("torch 2.", "diffusers 0.", "transformers ", "torch_npu "):
        assert name in versions


def test_gen_env_json_with_npu_rules_and_slurm_visibility() -> None:
    proc = _gen("env", "--json", env={"GEN_PLATFORM_RULES": "npu", "SLURM_JOB_ID": "42",
                                      "CUDA_VISIBLE_DEVICES": "", "SLURM_LOCALID": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["platform"], report["rules"], report["guard"]) == ("cpu", "npu", True)
    assert report["forbidden_dtypes"] == ["float64", "complex128"]
    assert report["backend"] == "gloo" and report["dtype"] == "float32"
    assert report["attention_backend"] == "native"
    assert report["visibility"] == {"CUDA_VISIBLE_DEVICES": "", "SLURM_JOB_ID": "42", "SLURM_LOCALID": "1"}
    assert report["settings"]["GEN_PLATFORM_RULES"] == "npu"
    assert set(report["versions"]) == {"gen", "python", "torch", "diffusers", "transformers", "torch_npu"}


def test_gen_env_imports_no_model_library() -> None:
    code = ("import json, sys; from click.testing import CliRunner; from jobs.cli import main; "
            "r = CliRunner().invoke(main, ['env', '--json']); assert r.exit_code == 0, r.output; "
            "json.loads(r.output); print(','.join(m for m in ('diffusers', 'transformers', "
            "'pipeline.loading', 'pipeline.generate', 'torch_npu') if m in sys.modules))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def _broken_torch_npu(root: Path) -> Path:
    """torch_npu 2.13.0 installed without CANN: its import raises, and it is torch's backend
    extension (entry point torch.backends), so a plain `import torch` loads it."""
    (root / "torch_npu").mkdir(parents=True)
    (root / "torch_npu" / "__init__.py").write_text(
        "raise RuntimeError('libhccl.so: cannot open shared object file: No such file or directory')\n"
        "def _autoload():\n    pass\n")  # fmt: skip
    info = root / "torch_npu-2.13.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch-npu\nVersion: 2.13.0\n")
    (info / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    return root


def test_gen_env_survives_a_broken_torch_npu(tmp_path: Path) -> None:
    site = _broken_torch_npu(tmp_path / "site")
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # what the broken install does to a plain `import torch` (../shared/NOTES.md, "NPU")
    plain = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": path, "TORCH_DEVICE_BACKEND_AUTOLOAD": "1"})  # fmt: skip
    assert plain.returncode != 0 and "Failed to load the backend extension: torch_npu" in plain.stderr
    # gen turns the autoload off unless told otherwise, and imports torch_npu itself
    proc = _gen("env", "--json", env={"PYTHONPATH": path}, drop=("TORCH_DEVICE_BACKEND_AUTOLOAD",))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["platform"] == "cpu"
    assert "npu: torch_npu is installed but does not import (RuntimeError: libhccl.so" in report["reason"]
    assert "CANN" in report["reason"]
    assert report["versions"]["torch_npu"] == "2.13.0"
    assert report["settings"]["TORCH_DEVICE_BACKEND_AUTOLOAD"] == "0"
