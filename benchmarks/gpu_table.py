"""The GPU check's figures as Markdown tables: one row per model and run, from the JSON files
that ``model_cost.py`` and ``profile_estimate.py`` wrote into a folder (``gpu_check.sh``'s
``$OUT``, or ``benchmarks/results/<gpu>/`` where they are kept).

    python benchmarks/gpu_table.py FOLDER
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def model_tables(folder: Path) -> list[str]:
    lines = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        if "models" not in record:
            continue
        gpu = (record.get("environment") or {}).get("cuda") or "CPU"
        for row in record["models"]:
            setting = ", ".join(
                str(v)
                for v in (
                    f"batch {row['batch']}" + (f" × {row['context']}" if row["context"] else ""),
                    f"{row['autocast']} autocast" if row["autocast"] else None,
                    f"{row['attention']} attention" if row["attention"] else None,
                    "channels_last" if row.get("channels_last") else None,
                )
                if v
            )
            lines += [
                f"**{row['model']}** ({row['params'] / 1e6:.0f}M parameters, {setting}; {gpu})",
                "",
                "| run | time | × reference | peak memory | × reference |",
                "|---|---|---|---|---|",
            ]
            for label, run in row["runs"].items():
                lines.append(
                    f"| {label} | {1e3 * run['seconds']:.1f} ms | {run['time_ratio']:.2f} "
                    f"({run['reference']}) | {run['peak_bytes'] / 2**30:.2f} GiB | "
                    f"{run['memory_ratio']:.2f} |"
                )
            for method, figures in (row.get("precision") or {}).items():
                lines.append(
                    f"| {method} under autocast vs float32: relative L1 error | "
                    f"{figures['relative_l1']:.2g} | | | |"
                )
            lines.append("")
    return lines


def profile_table(folder: Path) -> list[str]:
    path = folder / "profile.json"
    if not path.exists():
        return []
    record = json.loads(path.read_text())
    lines = [
        f"**Profile** ({record['model']}, batch {record['batch']} × {record['context']})",
        "",
        "| step | wall | GPU busy | rules' GPU time (share) | CPU in rules per call |",
        "|---|---|---|---|---|",
    ]
    for label, s in record["steps"].items():
        busy = s["gpu_busy_fraction"]
        share = s["rules_gpu_share"]
        per_call = s["rules_cpu_us_per_call"]
        lines.append(
            f"| {label} | {s['wall_ms']:.1f} ms | "
            + (f"{s['gpu_busy_ms']:.1f} ms ({100 * busy:.0f} %)" if busy is not None else "–")
            + " | "
            + (f"{s['rules_gpu_ms']:.1f} ms ({100 * share:.0f} %)" if share is not None else "–")
            + " | "
            + (f"{per_call:.0f} µs × {s['rule_calls']}" if per_call is not None else "–")
            + " |"
        )
    return lines + [""]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0] if argv else ".")
    print("\n".join(model_tables(folder) + profile_table(folder)))


if __name__ == "__main__":
    main()
