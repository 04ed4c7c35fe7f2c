#!/usr/bin/env python3
"""Issue 12 item 5: the ablations over seeds, from committed per-prompt scores.

    python3 bench/ablation_seeds.py add runs/vipo-ones-g16-s1 ...   # eval.json → scores.csv
    python3 bench/ablation_seeds.py add --checkpoint 120 RUN ...    # a `vipo eval --checkpoint` row
    python3 bench/ablation_seeds.py table                           # the bench/NOTES.md §6.4 table
    python3 bench/ablation_seeds.py table-b12k                      # §6.5: the 12 000-step base
    python3 bench/ablation_seeds.py save-b12k runs/abl-b12k         # its finished runs → results/
    python3 bench/ablation_seeds.py save-b12k runs/g16p2-b12k       # ViPO with backbone.pad = 2 (§6.6)

Why a script and not `vipo compare`: the GRPO and ViPO runs of seeds 1–4 (§6.2) were
trained before the machine was reset; their weights are gone and only their per-prompt
scores (bench/results/issue12-eval512/scores.csv) remain. Their seed-0 reruns (§6.3) are
listed separately. Differences are paired by seed (same seed, same base, same prompts) and
their interval is Student's t over seeds, as `vipo compare` computes it.
"""
import csv
import json
import math
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "results"
ABL = ROOT / "issue12-ablations" / "scores.csv"
G62 = ROOT / "issue12-eval512" / "scores.csv"
# Two-sided 95 % Student t quantiles, df 1..10.
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


def read(path):
    with open(path) as f:
        r = csv.reader(f)
        next(r)
        return [(row[0], row[1], row[2], [float(x) for x in row[4:]]) for row in r]


def add(run_dirs, checkpoint=None):
    """Final evaluations, or with `checkpoint` the evaluation of that step (its row is kept
    apart: `table` reads only final rows). Metrics are copied only for final evaluations, so
    a checkpoint row of an unfinished run does not overwrite a finished run's metrics."""
    have = {(r, c, s) for r, c, s, _ in read(ABL)}
    ck = "final" if checkpoint is None else str(checkpoint)
    sub = "final" if checkpoint is None else f"step_{checkpoint}"
    with open(ABL, "a", newline="") as f:
        w = csv.writer(f)
        for d in map(Path, run_dirs):
            # Each run's config and training metrics beside its scores.
            (ABL.parent / d.name).mkdir(exist_ok=True)
            for name in ("config.toml",) + (("metrics.jsonl",) if checkpoint is None else ()):
                shutil.copy(d / name, ABL.parent / d.name / name)
            rep = json.loads((d / "eval" / sub / "eval.json").read_text())
            for split in ("eval", "ood"):
                key = (d.name, ck, split)
                if key in have:
                    print(f"{d.name} {split}: already in {ABL.name}")
                    continue
                xs = rep["scores"][split]["compositional"]
                w.writerow([d.name, ck, split, len(xs)] + [f"{x:.4f}" for x in xs])
                print(f"{d.name} {split}: n {len(xs)}, mean {sum(xs) / len(xs):.4f}")


def metrics(folders, run):
    for folder in folders:
        p = ROOT / folder / run / "metrics.jsonl"
        if p.is_file():
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            return [r for r in rows if "reward_mean" in r]
    return []


def map_mass(folders, run):
    """Map mass on object pixels ÷ object area over training (ratio of the step means, as
    `vipo compare` reports it); None without maps."""
    rows = metrics(folders, run)
    rows = [r for r in rows if r.get("object_area_frac", 0) > 0]
    return sum(r["map_object_mass"] for r in rows) / sum(r["object_area_frac"] for r in rows) if rows else None


# Trailing mean over 24 rollouts: each step's rollout reward is 8 prompts' worth and swings
# by ±0.05, so `vipo compare`'s 5-step window "reaches" a final value by chance (GRPO's own
# 5-step curve reached its final at step 73 of 240). Same first-full-window rule.
SMOOTH = 24


def smooth(v):
    return [sum(v[max(0, i - SMOOTH + 1) : i + 1]) / len(v[max(0, i - SMOOTH + 1) : i + 1]) for i in range(len(v))]


def mean_curve(runs_of_method):
    curves = [[r["reward_mean"] for r in metrics(*fr)] for fr in runs_of_method]
    n = min(map(len, curves))
    return [sum(c[i] for c in curves) / len(curves) for i in range(n)]


def steps_to_reach(curve, target):
    """First step whose full-window trailing mean reaches target."""
    sm = smooth(curve)
    return next((i + 1 for i in range(SMOOTH - 1, len(sm)) if sm[i] >= target), None)


def t_ci(xs):
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, None, None
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = T95[n - 2] * sd / math.sqrt(n)
    return m, m - h, m + h


def fmt(m, lo, hi, sign=True):
    f = "{:+.3f}" if sign else "{:.3f}"
    s = f.format(m)
    return s if lo is None else f"{s} [{f.format(lo)}, {f.format(hi)}]"


def table():
    """§6.4: the 4000-step base, from scores.csv."""
    means = {}  # (method, seed, split) -> mean
    runs = {}  # (method, seed) -> (folders, run folder name)
    for run, ck, split, xs in read(G62):
        if ck == "240" and (run.startswith("grpo-g16-") or run.startswith("vipo-g16-")):
            method, seed = run.rsplit("-s", 1)
            method, seed = method.replace("-g16", ""), int(seed)
            means[(method, seed, split)] = sum(xs) / len(xs)
            runs[(method, seed)] = (("issue12-vipo-g16", "issue12-eval512"), run)
        if run == "base":
            means[("base", 0, split)] = sum(xs) / len(xs)
    for run, ck, split, xs in read(ABL):
        if ck != "final":
            continue
        method, seed = run.rsplit("-s", 1)
        method = method.replace("-g16", "")
        # Seed 0 of GRPO and ViPO: the §6.2 run is the reference; the §6.3 rerun is listed apart.
        if method in ("grpo", "vipo"):
            method += "-rerun"
        means[(method, int(seed), split)] = sum(xs) / len(xs)
        runs[(method, int(seed))] = (("issue12-ablations",), run)
    print_table(means, runs, METHODS + ["grpo-rerun", "vipo-rerun"])


def table_b12k():
    """§6.5: the 12 000-step base, from each run's committed eval_final.json (GRPO and ViPO
    in issue12-b12k/g16, the ablations in issue12-b12k/abl; the same comparison folder on
    this machine, `vipo compare --config configs/ablations.toml --set run_name=abl-b12k`)."""
    def split_means(path):
        """Mean compositional score per split of a `vipo eval` report."""
        rep = json.loads(path.read_text())
        return {split: sum(xs) / len(xs) for split in ("eval", "ood") for xs in [rep["scores"][split]["compositional"]]}

    means, runs = {}, {}
    for folder in ("issue12-b12k/g16", "issue12-b12k/abl", "issue12-b12k/g16p2"):
        for ev in sorted((ROOT / folder).glob("*-s*/eval_final.json")):
            run = ev.parent.name
            method, seed = run.rsplit("-s", 1)
            if folder.endswith("g16p2"):
                method += "-pad2"  # ViPO with context-padded maps (§5.1, §6.6)
            for split, m in split_means(ev).items():
                means[(method, int(seed), split)] = m
            runs[(method, int(seed))] = ((folder,), run)
    for split, m in split_means(ROOT / "issue12-b12k/g16/base_eval/eval.json").items():
        means[("base", 0, split)] = m
    print_table(means, runs, METHODS)


METHODS = ["grpo", "vipo", "vipo-pad2", "vipo-ones", "vipo-psr", "vipo-sklearn", "vipo-reward"]


def save_b12k(cmp_dir):
    """Copy the finished ViPO-family runs of a comparison folder (config, metrics, final
    eval.json) into issue12-b12k/<folder name without -b12k> (abl, g16p2), where
    `table-b12k` reads them; GRPO and the pad-0 ViPO are already in issue12-b12k/g16."""
    cmp_dir = Path(cmp_dir)
    out = ROOT / "issue12-b12k" / cmp_dir.name.removesuffix("-b12k")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("compare.toml", "results.json", "results.md"):
        if (cmp_dir / name).is_file():
            shutil.copy(cmp_dir / name, out / name)
    for ev in sorted(cmp_dir.glob("vipo*-s*/eval/final/eval.json")):
        run = ev.parents[2]
        g16 = ROOT / "issue12-b12k" / "g16" / run.name / "config.toml"
        if g16.is_file() and g16.read_bytes() == (run / "config.toml").read_bytes():
            continue  # a copy of a g16 run, saved there already
        (out / run.name).mkdir(exist_ok=True)
        for name in ("config.toml", "metrics.jsonl"):
            shutil.copy(run / name, out / run.name / name)
        shutil.copy(ev, out / run.name / "eval_final.json")
        print(f"{run.name}: saved")


def print_table(means, runs, methods):
    base = {s: means[("base", 0, s)] for s in ("eval", "ood")}
    print(f"base: eval {base['eval']:.3f}, ood {base['ood']:.3f}")
    print("| method | seeds | eval (per seed) | eval − base | − GRPO (paired by seed) | − ViPO (paired by seed) | ood − base | ood − GRPO (paired by seed) | map mass ÷ object area | steps to GRPO's final rollout reward |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    seeds_of = lambda m: sorted(s for (mm, s, sp) in means if mm == m and sp == "eval")
    target = smooth(mean_curve([runs[("grpo", s)] for s in seeds_of("grpo")]))[-1]
    print(f"GRPO's final rollout reward (trailing mean of {SMOOTH}, mean over seeds): {target:.3f}")
    for m in methods:
        seeds = seeds_of(m)
        if not seeds:
            continue

        def paired(ref, split):
            """m − ref on `split`, paired by seed; empty for ref itself or no shared seed."""
            shared = [s for s in seeds if (ref, s, split) in means]
            if m == ref or not shared:
                return ""
            d = [means[(m, s, split)] - means[(ref, s, split)] for s in shared]
            return fmt(*t_ci(d)) + f" (n {len(d)})"

        ev = [means[(m, s, "eval")] for s in seeds]
        od = [means[(m, s, "ood")] - base["ood"] for s in seeds]
        cols = [m, ",".join(map(str, seeds)), " ".join(f"{x:.3f}" for x in ev), fmt(*t_ci([x - base["eval"] for x in ev]))]
        cols += [paired("grpo", "eval"), paired("vipo", "eval"), fmt(*t_ci(od)), paired("grpo", "ood")]
        mass = [x for x in (map_mass(*runs[(m, s)]) for s in seeds) if x is not None]
        cols.append(" ".join(f"{x:.2f}" for x in mass) or "—")
        cols.append(str(steps_to_reach(mean_curve([runs[(m, s)] for s in seeds]), target) or "not reached"))
        print("| " + " | ".join(cols) + " |")


if __name__ == "__main__":
    if sys.argv[1:3] == ["add", "--checkpoint"] and len(sys.argv) >= 5:
        add(sys.argv[4:], int(sys.argv[3]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "add":
        add(sys.argv[2:])
    elif sys.argv[1:] == ["table"]:
        table()
    elif sys.argv[1:] == ["table-b12k"]:
        table_b12k()
    elif len(sys.argv) == 3 and sys.argv[1] == "save-b12k":
        save_b12k(sys.argv[2])
    else:
        sys.exit(__doc__)
