"""Cut the GLUE sample that ships with q8bert (`q8 run --example`) from the official files.

    python bench/make_sample.py [GLUE_DIR]      (default ../shared/glue)

Rows are drawn with a fixed seed and written unchanged, in the official TSV layout.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

SAMPLES = {"SST-2": {"train": 480, "dev": 240}}
OUT = Path(__file__).resolve().parent.parent / "tasks" / "samples"


def main() -> None:
    glue = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/glue")
    for task, sizes in SAMPLES.items():
        for split, n in sizes.items():
            lines = (glue / task / f"{split}.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
            header, rows = lines[0], lines[1:]
            picked = sorted(random.Random(f"{task}/{split}").sample(range(len(rows)), n))
            target = OUT / task.lower() / f"{split}.tsv"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(header + "".join(rows[i] for i in picked), encoding="utf-8")
            print(f"{target}: {n} of {len(rows)} rows")


if __name__ == "__main__":
    main()
