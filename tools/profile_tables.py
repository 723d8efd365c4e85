"""Markdown tables for docs/scaling.md, made from the JSON that tools/profile_cpu.sh writes (nothing typed by hand).

    python tools/profile_tables.py docs/results/profile > /tmp/tables.md
    python tools/profile_tables.py docs/results/profile --fill docs/scaling.md   # rewrite the tables in place

``--fill`` replaces each ``<!-- table:NAME -->`` marker (and the table after it, up to ``<!-- /table -->``) with
the current table of that name.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _load(p: Path):
    return json.loads(p.read_text()) if p.is_file() else None


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def peak(root: Path) -> list[str]:
    out = ["| ranks | GEMM peak per rank (fp32) | all-reduce 16 MiB bus GB/s | broadcast 16 MiB GB/s |",
           "|---|---|---|---|"]
    for n in (1, 2):
        r = _load(root / f"peak_r{n}" / "result.json")
        if not r:
            continue
        ar = next((c for c in r["collectives"] if c["op"] == "all_reduce" and c["bytes"] >= 2**24), None)
        bc = next((c for c in r["collectives"] if c["op"] == "broadcast" and c["bytes"] >= 2**24), None)
        out.append(f"| {n} | {r['peak_flops_per_rank'] / 1e9:.1f} GFLOP/s | "
                   f"{ar['bus_bytes_per_s'] / 1e9:.2f} | {bc['bus_bytes_per_s'] / 1e9:.2f} |" if ar else
                   f"| {n} | {r['peak_flops_per_rank'] / 1e9:.1f} GFLOP/s | - | - |")
    return out


def trainer(root: Path) -> list[str]:
    r = _load(root / "trainer_scaling_demo" / "scaling.json")
    if not r:
        return []
    t = r["trainer"]
    out = ["| scaling | ranks | sequences/step | step s | fwd+bwd s | optimizer s | tokens/s | MFU | efficiency |",
           "|---|---|---|---|---|---|---|---|---|"]
    for x in t["rows"]:
        out.append(f"| {x['kind']} | {x['ranks']} | {x['seqs']} | {x['step_s']:.3f} | {x['fwd_bwd_s']:.3f} | "
                   f"{x['optimizer_s']:.3f} | {x['tokens_per_s']:.0f} | {_pct(x['mfu'])} | {_pct(x['efficiency'])} |")
    return out


def loop(root: Path, paired: str | None = None) -> list[str]:
    if paired:  # one file per world size (tools/profile_cpu.sh paired); efficiencies against the 1-rank run
        parts = [_load(root / paired / f"loop_n{n}" / "scaling.json") for n in (1, 2, 4)]
        if not all(parts):
            return []
        rows = [p["loop"]["rows"][0] for p in parts]
        for x in rows:
            x["efficiency"] = rows[0]["step_s"] * rows[0]["ranks"] / (x["step_s"] * x["ranks"])
            x["speedup"] = rows[0]["step_s"] / x["step_s"]
        r = {"loop": {"rows": rows}}
    else:
        r = _load(root / "loop_scaling_demo" / "scaling.json")
    if not r:
        return []
    out = ["| trainer ranks | step s | trainer s | wait for data s | sync s | sync / L s | trainer tokens/s | "
           "engine tokens/s | engine idle | strong-scaling efficiency | speed-up |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["loop"]["rows"]:
        out.append(f"| {x['ranks']} | {x['step_s']:.3f} | {x['train_s']:.3f} | {x['wait_for_data_s']:.3f} | "
                   f"{x['sync_s']:.3f} | {x['sync_s'] / x['lag']:.4f} | {x['trainer_tokens_per_s']:.0f} | "
                   f"{x['engine_tokens_per_s']:.0f} | {x['engine_idle_fraction']:.2f} | {_pct(x['efficiency'])} | "
                   f"{x['speedup']:.2f} |")
    return out


def breakdown(root: Path, n: int) -> list[str]:
    r = _load(root / "loop_scaling_demo" / f"loop_n{n}" / "breakdown.json")
    if not r:
        return []
    s = r["summary"]
    out = ["| phase | mean s per step | share |", "|---|---|---|"]
    for k, v in s["mean_s"].items():
        if k == "step_s" or not v:
            continue
        out.append(f"| {k} | {v:.3f} | {_pct(s['phase_fraction'].get(k))} |")
    out.append(f"| **step** | **{s['mean_s']['step_s']:.3f}** | 100 % |")
    return out


def validation(root: Path, name: str = "validation.json") -> list[str]:
    r = _load(root / name)
    if not r:
        return []
    out = ["| trainer ranks | measured step s | predicted step s | error | predicted bound | engine idle measured | "
           "engine idle predicted | own-components prediction s | error | bound |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        cal = " (calibration run)" if x["calibration_point"] else ""
        out.append(f"| {x['ranks']}{cal} | {x['measured_step_s']:.3f} | {x['predicted_step_s']:.3f} | "
                   f"{100 * x['error']:+.1f} % | {x['bound']} | {x['measured_engine_idle']:.2f} | "
                   f"{x['predicted_engine_idle']:.2f} | {x['own_predicted_step_s']:.3f} | "
                   f"{100 * x['own_error']:+.1f} % "
                   f"| {x['own_bound']} |")
    return out


def sweep(root: Path) -> list[str]:
    r = _load(root / "sweep_cpu_small_r4" / "result.json")
    if not r:
        return []
    out = ["| layout | DP | step s | fwd+bwd s | optimizer s | tokens/s | MFU | peak RSS MiB/rank |",
           "|---|---|---|---|---|---|---|---|"]
    best = max(r["rows"], key=lambda x: x["tokens_per_s"])["name"] if r["rows"] else None
    for x in sorted(r["rows"], key=lambda x: -x["tokens_per_s"]):
        name = f"**{x['name']}**" if x["name"] == best else x["name"]
        out.append(f"| {name} | {x['dp']} | {x['step_s']:.3f} | {x['fwd_bwd_s']:.3f} | {x['optimizer_s']:.3f} | "
                   f"{x['tokens_per_s']:.0f} | {_pct(x['mfu'])} | {max(x['peak_mem_bytes_per_rank']) / 2**20:.0f} |")
    for e in r["errors"]:
        out.append(f"| {e['layout']} | - | skipped: {e['error'][:80]} | | | | | |")
    return out


def model(root: Path, name: str) -> list[str]:
    r = _load(root / name)
    if not r:
        return []
    out = ["| GPUs | trainer / engine GPUs | trainer step s | generation s per step | sync s | sync / L s | step s | "
           "bound | engine idle | L for ≤ 10 % idle | tokens/s/GPU | trainer MFU | efficiency vs 8 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lsat = x["lag_to_saturate_engines"]
        out.append(f"| {x['gpus']} | {x['trainer_gpus']} / {x['engine_gpus']} | {x['train_s']:.2f} | "
                   f"{x['gen_s_per_step']:.2f} | {x['sync_s']:.2f} | {x['sync_per_step_s']:.4f} | {x['step_s']:.2f} | "
                   f"{x['bound']} | {x['engine_idle_fraction']:.2f} | {lsat if lsat else 'never'} | "
                   f"{x['tokens_per_s_per_gpu']:.0f} | {_pct(x['detail']['trainer']['achieved_mfu'])} | "
                   f"{_pct(x['scaling_efficiency'])} |")
    return out


def sections(root: Path) -> list[tuple[str, list[str]]]:
    return [("peak", peak(root)), ("trainer scaling", trainer(root)), ("loop scaling", loop(root)),
            ("loop scaling paired", loop(root, paired="paired")),
            ("loop scaling paired quiet", loop(root, paired="paired_quiet")),
            ("breakdown n=2", breakdown(root, 2)), ("validation", validation(root)),
            ("validation calibrated on 2 ranks", validation(root, "validation_cal2.json")),
            ("validation paired", validation(root, "validation_paired.json")),
            ("validation paired quiet", validation(root, "validation_paired_quiet.json")), ("sweep", sweep(root)),
            ("model qwen3-4b math", model(root, "model_qwen3_4b_math.json")),
            ("model r1-14b code", model(root, "model_r1_14b_code.json"))]


def fill(doc: Path, tables: dict[str, list[str]]) -> None:
    text = doc.read_text()

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in tables:
            raise SystemExit(f"{doc}: no table named {name!r} (have: {', '.join(tables)})")
        body = "\n".join(tables[name]) if tables[name] else "(no data)"
        return f"<!-- table:{name} -->\n{body}\n<!-- /table -->"

    # a marker owns only the table lines right after it (so a new marker never swallows the text below it)
    text = re.sub(r"<!-- table:([^>]+?) -->(?:\n(?:(?:\||\(no data\))[^\n]*\n)*<!-- /table -->)?", sub, text)
    doc.write_text(text)


def main() -> None:
    args = sys.argv[1:]
    root = Path(args[0] if args and not args[0].startswith("--") else "docs/results/profile")
    secs = sections(root)
    if "--fill" in args:
        fill(Path(args[args.index("--fill") + 1]), dict(secs))
        return
    for title, lines in secs:
        print(f"### {title}\n")
        print("\n".join(lines) if lines else "(no data)")
        print()


if __name__ == "__main__":
    main()
