"""Print the kill rate of the last ``mutmut run`` (``make mutation``) and list the mutants the tests missed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

STATS = Path("mutants") / "mutmut-cicd-stats.json"


def main() -> int:
    """Export mutmut's counts, print the kill rate over the mutants some test ran, then the survivors."""
    mutmut = str(Path(sys.executable).parent / "mutmut")
    subprocess.run([mutmut, "export-cicd-stats"], check=True, capture_output=True)
    s = json.loads(STATS.read_text())
    judged = s["killed"] + s["timeout"] + s["survived"] + s["suspicious"] + s["segfault"]
    killed = s["killed"] + s["timeout"]  # a mutant that hangs the tests is caught too
    rate = 100 * killed / judged if judged else float("nan")
    print(
        f"mutation score: {killed} of {judged} mutants killed ({rate:.1f} %); survived {s['survived']}, "
        f"suspicious (tests crashed or ended oddly) {s['suspicious']}, not reached by any selected test "
        f"{s['no_tests']}, of {s['total']} in all"
    )
    print("not killed (inspect one with: .venv/bin/mutmut show NAME):")
    subprocess.run([mutmut, "results"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
