"""Every third-party module realjax imports (at the top or inside a function) is a declared dependency:
a core one, or one from the extra that the code path needs. A module that only arrives through the
`test` extra would pass CI and fail the README's demo command on a fresh machine."""

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "orbax": "orbax-checkpoint", "math_verify": "math-verify", "ml_dtypes": "ml-dtypes",
                "tensorboardX": "tensorboardx"}
# modules that come with an extra, only imported on that extra's code path: (extra, its requirement)
EXTRAS = {"torch": ("bench", "torch"), "libtpu": ("tpu", "jax"), "wandb": ("wandb", "wandb")}
# modules imported only by scripts that run in another interpreter, never in realjax's environment
FOREIGN = {"vllm"}  # realjax/tools/bench/vllm_runner.py runs under `bench rollout --vllm-python PATH`


def _imported_modules() -> set[str]:
    mods = set()
    for path in (ROOT / "realjax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m != "realjax" and m not in FOREIGN}


def _names(requirements) -> set[str]:
    return {re.split(r"[<>=\[;! ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_every_imported_module_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _names(project["dependencies"])
    extras = {name: _names(reqs) for name, reqs in project["optional-dependencies"].items()}
    missing = []
    for mod in sorted(_imported_modules()):
        if mod in EXTRAS:
            extra, requirement = EXTRAS[mod]
            ok = requirement in extras.get(extra, ())
        else:
            ok = DISTRIBUTION.get(mod, mod).lower().replace("_", "-") in core
        if not ok:
            missing.append(mod)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
