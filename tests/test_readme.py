"""The README's two commands are what CI and a newcomer actually run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND = 'pip install -e ".[test]" && python -m pytest'
MAIN_COMMAND = "pip install -e . && python -m experiments.crossover"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert TEST_COMMAND in readme
    assert ci.strip().splitlines()[-1] == TEST_COMMAND


def test_readme_gives_the_main_command():
    assert MAIN_COMMAND in (ROOT / "README.md").read_text()
