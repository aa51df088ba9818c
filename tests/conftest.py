import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Child processes (twistd, the gwms CLI) must import this tree and find its twistd plugins.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
