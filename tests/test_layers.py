"""The package's dependency layers: the core imports no training, video or plotting library, and the command
line answers `--help` / `--version` without importing torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

OPTIONAL = ("accelerate", "av", "decord", "matplotlib")
CORE_MODULES = (
    "slowfast_adapter", "slowfast_adapter.model", "slowfast_adapter.io.adapter_io", "slowfast_adapter.io.hub",
    "slowfast_adapter.tools.flops", "slowfast_adapter.families", "slowfast_adapter.core.surface",
)  # fmt: skip


def _imported_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_core_imports_no_training_video_or_plotting_library():
    imported = _imported_after("\n".join(f"import {m}" for m in CORE_MODULES) + "\nslowfast_adapter.wrap")
    assert "torch" in imported  # the probe really loaded the core
    assert not imported & set(OPTIONAL), sorted(imported & set(OPTIONAL))


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_do_not_import_torch(flag):
    code = f"from slowfast_adapter.cli import main\ntry:\n    main(['{flag}'])\nexcept SystemExit:\n    pass"
    assert "torch" not in _imported_after(code)


def test_version_flag_prints_the_package_version():
    import slowfast_adapter

    out = subprocess.run([sys.executable, "-m", "slowfast_adapter.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"slowfast-adapter {slowfast_adapter.__version__}"
