"""``make mutation``: mutmut over the numerical core, one module at a time, each judged by its own fast tests.

mutmut 3 maps every function to the selected tests that call it and reruns all of them on each of its mutants.
One shared selection would make every mutant of ``split_cells`` rerun every datamodule test, so each module of
``[tool.exprae.mutation]`` in ``pyproject.toml`` gets its own run in ``.mutation/<module>/``: a scratch root whose
``pyproject.toml`` is the project's ``[tool.mutmut]`` with that module's ``only_mutate`` and test selection.
Prints each module's kill rate as it finishes, its mutants not killed, then one table over all modules.

    python scripts/mutation.py                  # every module (tens of minutes on 2 cores)
    python scripts/mutation.py split masking    # some modules
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / ".mutation"
LINKED = ("src", "tests", "configs")  # what a mutmut root needs; mutmut copies them into its mutants/


def toml_value(v: object) -> str:
    """A TOML literal for the plain values a ``[tool.*]`` table holds (str, bool, number, list, table)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML literal for {v!r}")


def scratch_root(name: str, module: dict, project: dict) -> Path:
    """``.mutation/<name>/``: links to the sources and tests, and a pyproject scoped to one module."""
    root = SCRATCH / name
    root.mkdir(parents=True, exist_ok=True)
    for part in LINKED:
        link = root / part
        if not link.is_symlink():
            link.symlink_to(ROOT / part, target_is_directory=True)
    mutmut = dict(project["tool"]["mutmut"])
    mutmut["only_mutate"] = module["mutate"]
    mutmut["pytest_add_cli_args_test_selection"] = module["tests"]
    mutmut["pytest_add_cli_args"] = mutmut.get("pytest_add_cli_args", []) + module.get("pytest_args", [])
    pytest_ini = project["tool"]["pytest"]["ini_options"]
    text = ["[tool.pytest.ini_options]", *(f"{k} = {toml_value(v)}" for k, v in pytest_ini.items()), ""]
    text += ["[tool.mutmut]", *(f"{k} = {toml_value(v)}" for k, v in mutmut.items()), ""]
    (root / "pyproject.toml").write_text("\n".join(text))
    return root


def _results(mutmut: str, root: Path, env: dict) -> list[str]:
    """``mutmut results``: one ``name: status`` line per mutant not killed."""
    out = subprocess.run([mutmut, "results"], cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if ": " in line]


def run_module(name: str, module: dict, project: dict, *, fresh: bool, retest: bool) -> dict:
    """Run mutmut for one module; returns its counts (mutmut's cicd stats), wall time and survivors."""
    root = scratch_root(name, module, project)
    if fresh:
        shutil.rmtree(root / "mutants", ignore_errors=True)
    mutmut = str(Path(sys.executable).parent / "mutmut")
    env = dict(os.environ)
    # Two workers on two cores: one thread each, or BLAS threads fight over them and runs time out.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    # The copied tests live in <root>/mutants/tests, where conftest's default path to the real data is wrong.
    env.setdefault("EXPRAE_REALDATA", str(ROOT.parent / "shared" / "realdata"))
    names = []
    if retest:  # only the mutants an earlier run did not kill, e.g. after adding tests for them
        names = [
            line.split(":")[0] for line in _results(mutmut, root, env) if line.endswith((": survived", ": suspicious"))
        ]
    start = time.monotonic()
    run = subprocess.run([mutmut, "run", *names], cwd=root, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    if run.returncode != 0:
        tail = (run.stdout + run.stderr)[-3000:]
        raise SystemExit(f"mutmut run failed for {name} (exit {run.returncode}):\n{tail}")
    subprocess.run([mutmut, "export-cicd-stats"], cwd=root, env=env, check=True, capture_output=True)
    stats = json.loads((root / "mutants" / "mutmut-cicd-stats.json").read_text())
    stats["not_killed"] = [line for line in _results(mutmut, root, env) if not line.endswith(": timeout")]
    stats["wall_s"] = wall
    return stats


def score(s: dict) -> tuple[int, int]:
    """(killed, judged): a timeout counts as killed; "no tests" (no selected test reached it) is not judged."""
    killed = s["killed"] + s["timeout"]
    return killed, killed + s["survived"] + s["suspicious"] + s["segfault"]


def report_line(name: str, s: dict) -> str:
    killed, judged = score(s)
    rate = 100 * killed / judged if judged else float("nan")
    return (
        f"{name:<16} {killed:>5} / {judged:<5} killed {rate:5.1f} %   survived {s['survived']:>3}  "
        f"suspicious {s['suspicious']:>3}  no tests {s['no_tests']:>3}  total {s['total']:>4}  {s['wall_s'] / 60:5.1f} min"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="module names of [tool.exprae.mutation] (default: all)")
    parser.add_argument("--keep", action="store_true", help="reuse earlier results (mutmut reruns changed code)")
    parser.add_argument("--retest", action="store_true", help="with --keep: rerun the survivors of the last run")
    args = parser.parse_args(argv)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    modules = project["tool"]["exprae"]["mutation"]
    unknown = sorted(set(args.modules) - set(modules))
    if unknown:
        parser.error(f"unknown modules {unknown}; known: {sorted(modules)}")
    results = {}
    for name in args.modules or list(modules):
        results[name] = s = run_module(name, modules[name], project, fresh=not args.keep, retest=args.retest)
        print(report_line(name, s), flush=True)
        for line in s["not_killed"]:
            print(f"    {line}")
        print(
            f"    inspect one with: cd .mutation/{name} && {Path(sys.executable).parent}/mutmut show NAME", flush=True
        )
    print("\nmutation score per module (killed over mutants some selected test ran; timeouts count as killed)")
    for name, s in results.items():
        print(report_line(name, s))
    keys = ("killed", "timeout", "survived", "suspicious", "segfault", "no_tests", "total", "wall_s")
    total = {k: sum(s[k] for s in results.values()) for k in keys}
    print(report_line("all", total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
