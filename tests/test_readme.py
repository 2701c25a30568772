"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_testing_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "random_grouped_batch" in b)
    exec(compile(example, "README.md", "exec"), {})


def test_ci_runs_exactly_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert any(command in b.splitlines() for b in blocks), command
