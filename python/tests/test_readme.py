"""README "From Python": the pytest example runs as written and passes, and with the bug the
README describes it fails with the message the README shows, line for line."""

import re
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("torch", reason="SKIP: torch is not installed; the README's example is a torch kernel")


def readme_blocks():
    text = (REPO / "README.md").read_text()
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    message = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    return example, message


def run_pytest(path):
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                          capture_output=True, text=True, cwd=path.parent)


def test_the_readme_example_passes(tmp_path):
    example, _ = readme_blocks()
    (tmp_path / "test_example.py").write_text(example)
    run = run_pytest(tmp_path / "test_example.py")
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout + run.stderr


def test_the_readme_failure_message_is_what_pytest_prints(tmp_path):
    example, message = readme_blocks()
    assert ".clamp(min=1e-4)" in example
    (tmp_path / "test_bug.py").write_text(example.replace(".clamp(min=1e-4)", ""))
    run = run_pytest(tmp_path / "test_bug.py")
    assert run.returncode == 1, run.stdout + run.stderr
    printed = [line[1:].strip() for line in run.stdout.splitlines() if line.startswith("E  ")]
    assert printed == message.strip().splitlines(), run.stdout
