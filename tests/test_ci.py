""".ci/run refuses to go on without the browser the report tests need."""

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_fails_when_chromium_cannot_be_installed(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("dirname"), bin_dir / "dirname")
    (bin_dir / "apt-get").write_text("#!/bin/sh\nexit 100\n")  # as apt-get does without a network
    (bin_dir / "apt-get").chmod(0o755)
    (bin_dir / "pip").write_text("#!/bin/sh\necho pip must not run >&2\nexit 3\n")
    (bin_dir / "pip").chmod(0o755)
    result = subprocess.run([shutil.which("bash"), str(REPO / ".ci" / "run")], env={"PATH": str(bin_dir)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "could not install chromium" in result.stderr and "pip must not run" not in result.stderr
