"""Held-out truth (issue 15): does the budget search's held-out figure predict what the model does on data
nobody fitted to?

MiniLM, ``onnxpress.optimize(fp32, budget="cos>=0.98", calibration=calib.npz)`` (the CLI's
``--budget "cos>=0.98" --calibration calib.npz``) with the first 32, 128 and 512 of ``minilm``'s calibration
sentences; the tool holds out 25% (at least 8) of them itself. Per row: size, the budget metric on the
fit part, on the held-out part (the verdict), and on a third set the search and the hold-out never saw
(``minilm``'s 250 evaluation sentences), computed the same way (mean per-sample cosine of
``last_hidden_state`` against the fp32 model, ``onnxpress.metrics`` as in the search's own verdict), plus a fourth set (400 sentences from
other standard-library docstrings, ``heldout_check.heldout_sentences``) and the sentence-embedding task
figures. One more row reproduces the old behaviour (``holdout=0``: verdict on the calibration data itself).

Every sentence set is padded to 64 tokens (minilm's max length) so that the per-sample figures of the sets
weigh padding positions equally (the output at every position is part of the sample).

    .venv/bin/python benchmarks/heldout_bench.py [--sizes 32,128,512] [--jobs 2] [--markdown PATH]
    .venv/bin/python benchmarks/heldout_bench.py --quick [--markdown PATH]   # digits MLP, < 60 s (CI)

Each finished row is appended to ``--rows`` (JSON lines) and the table is rewritten after every row, so a run
stopped on a loaded machine keeps what it measured; ``--resume`` skips the rows already in that file.

Targets (issue 15): |held-out - unseen| <= 0.01 and unseen mean cosine >= 0.975 at every calibration size.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

import onnxpress  # noqa: E402
from onnxpress import metrics, runtime  # noqa: E402
from onnxpress.budget.progress import LogLines  # noqa: E402

PREDICT_WITHIN = 0.01
UNSEEN_FLOOR = 0.975
BATCH = 8  # rundata's batch size: the unseen sets are compared in the same batches the held-out part is
SEQ = 64


@dataclasses.dataclass
class Task:
    """A model and its data: a calibration pool (the first n samples calibrate a row) and unseen sets."""

    name: str
    src: Path
    pool: dict[str, np.ndarray]  # leading sample axis
    pool_keys: list[str]  # identity of each pool sample (disjointness is checked on these)
    unseen: dict[str, tuple[dict[str, np.ndarray], list[str]]]  # label -> (arrays, keys); the first is the target's
    texts: dict[str, list[str]] | None = None  # label -> sentences (MiniLM: embedding figures); "pool" too


def _pad(arrays: dict[str, np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
    out = {}
    for name, a in arrays.items():
        fill = pad_id if name == "input_ids" else 0
        out[name] = np.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=fill)
    return out


def minilm_task() -> Task:
    from heldout_check import heldout_sentences

    from onnxpress.models import minilm

    pool = minilm.calibration_sentences()
    unseen = minilm.evaluation_sentences()
    extra = heldout_sentences(400)
    pad_id = int(minilm.tokenizer().pad_token_id)

    def tok(sentences: list[str]) -> dict[str, np.ndarray]:
        return _pad(minilm.tokenize(sentences, max_length=SEQ), SEQ, pad_id)

    keys = [[s.lower() for s in x] for x in (pool, unseen, extra)]
    return Task(
        "minilm", Path(minilm.build()), tok(pool), keys[0],
        {"unseen (minilm evaluation sentences)": (tok(unseen), keys[1]), "unseen-2 (other stdlib docstrings)": (tok(extra), keys[2])},
        {"pool": pool, "unseen (minilm evaluation sentences)": unseen, "unseen-2 (other stdlib docstrings)": extra},
    )


def digits_task() -> Task:
    """The quick (CI) variant: the digits MLP, calibration from its training images, unseen: its test images."""
    from onnxpress.models import digits

    def stack(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}

    def keys(arrays: dict[str, np.ndarray]) -> list[str]:
        a = next(iter(arrays.values()))
        return [hashlib.sha1(np.ascontiguousarray(row).tobytes()).hexdigest() for row in a]

    pool = stack(digits.calibration_feeds("mlp", n=1000))
    unseen = stack(digits.evaluation_feeds("mlp"))
    return Task("digits-mlp", Path(digits.build("mlp")), pool, keys(pool), {"unseen (digits test images)": (unseen, keys(unseen))})


def batches(arrays: dict[str, np.ndarray], indices: list[int] | None = None) -> list[dict[str, np.ndarray]]:
    idx = np.arange(len(next(iter(arrays.values())))) if indices is None else np.asarray(indices)
    return [{k: v[idx[i : i + BATCH]] for k, v in arrays.items()} for i in range(0, len(idx), BATCH)]


def subset(arrays: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in arrays.items()}


def run_row(task: Task, n: int, holdout: Any, budget: str, jobs: int, tmp: Path, refs: dict[str, Any]) -> dict[str, Any]:
    calib = subset(task.pool, n)
    path = tmp / f"calib-{task.name}-{n}.npz"
    np.savez(path, **calib)
    label = f"{n} (holdout={holdout})" if holdout is not None else str(n)
    print(f"  {task.name}: --budget {budget!r} --calibration {n} samples, holdout {holdout if holdout is not None else 'default'} ...", flush=True)
    start = time.perf_counter()
    model, report = onnxpress.optimize(str(task.src), budget=budget, calibration=str(path), holdout=holdout, jobs=jobs,
                                       budget_options={"cache": False}, progress=LogLines(sys.stdout))
    wall = time.perf_counter() - start
    res = report.budget
    split = report.data.get("split") if report.data else None
    if split:
        fit_idx, held_idx = split["calibration_indices"], split["evaluation_indices"]
    else:  # holdout=0: the verdict is on the fit data itself
        fit_idx, held_idx = list(range(n)), list(range(n))
    # the three sets, provably disjoint (sample identities), unless the old behaviour is asked for
    fit_keys = {task.pool_keys[i] for i in fit_idx}
    held_keys = {task.pool_keys[i] for i in held_idx}
    overlaps = {"fit & held-out": len(fit_keys & held_keys) if split else None}
    for name, (_, keys) in task.unseen.items():
        overlaps[f"calibration & {name}"] = len((fit_keys | held_keys) & set(keys))
    if split:
        assert sorted(fit_idx + held_idx) == list(range(n)), "the split is not a partition of the calibration samples"
    session = runtime.make_session(model)
    # the held-out figure recomputed here from the report's indices: the tool's verdict is what we think it is
    held_feeds = batches(calib, held_idx)
    held_check = per_sample(session, held_feeds, [_floats(runtime.run(refs["session"], f)) for f in held_feeds])["cos"]
    row: dict[str, Any] = {
        "task": task.name, "n": n, "label": label, "holdout": holdout, "fit": len(fit_idx), "held": len(held_idx) if split else 0,
        "MB": res.bytes_after / 1e6, "fit_cos": res.fit_value, "held_cos": res.value, "held_recomputed": held_check,
        "passed": res.passed, "search_s": res.seconds.get("total", wall), "wall_s": wall, "builds": len(res.attempts),
        "pipeline": res.pipeline, "notes": list(res.notes), "attempts": res.attempts, "overlaps": overlaps,
        "choices": _choice_summary(res), "evaluation": res.evaluation,
    }
    row["unseen"] = {name: per_sample(session, refs[name]["feeds"], refs[name]["outputs"]) for name in task.unseen}
    if task.texts is not None:
        from onnxpress.models import minilm

        pool_texts = task.texts["pool"]
        sets = {"fit": [pool_texts[i] for i in fit_idx], "held-out": [pool_texts[i] for i in held_idx]}
        sets.update({name: task.texts[name] for name in task.unseen})
        row["embedding"] = {}
        for name, sentences in sets.items():
            feeds = [minilm.tokenize(sentences[i : i + 32]) for i in range(0, len(sentences), 32)]
            ref = refs.get(name, {}).get("embeddings")
            if ref is None:
                ref = minilm.embed(str(task.src), feeds)
            row["embedding"][name] = minilm.compare_embeddings(minilm.embed(session, feeds), ref)
        # how much of the unseen text's tokens the fit sentences index (the embedding split keeps those rows int4)
        fit_ids = np.unique(calib["input_ids"][fit_idx][calib["attention_mask"][fit_idx] > 0])
        first = next(iter(task.unseen))
        arrays = task.unseen[first][0]
        tokens = arrays["input_ids"][arrays["attention_mask"] > 0]
        row["unseen_token_coverage"] = float(np.isin(tokens, fit_ids).mean())
    first = next(iter(row["unseen"].values()))
    target = first["cos"]
    row["gap"] = res.value - target
    # the standard error a mean over the held-out part's sample count has, at the unseen set's spread
    row["held_se"] = first["std_cos"] / np.sqrt(max(row["held"] or row["fit"], 1))
    row["predicts"] = abs(row["gap"]) <= PREDICT_WITHIN
    row["floor"] = target >= UNSEEN_FLOOR
    print(f"    {res.bytes_after / 1e6:.3f} MB, fit {res.fit_value:.5f}, held-out {res.value:.5f} (recomputed {held_check:.5f}), "
          f"unseen {target:.5f}, passed {res.passed}, {wall:.0f} s, {len(res.attempts)} build(s)", flush=True)
    return row


def per_sample(session: Any, feeds: list[dict[str, np.ndarray]], reference_outputs: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """The budget metric's figures (``onnxpress.metrics``: per-sample cosine, mean / min / p5; worst output),
    and the spread of the per-sample cosines."""
    names = list(reference_outputs[0])
    outputs = [runtime.run(session, f, names) for f in feeds]
    per_output = metrics.compare_outputs(outputs, reference_outputs, feeds)
    summary = metrics.worst(m.summary() for m in per_output.values())
    cos = np.asarray(min(per_output.values(), key=lambda m: float(np.mean(m.cos))).cos)
    return {"cos": summary["cos"], "min_cos": summary["min_cos"], "p5_cos": summary["p5_cos"], "std_cos": float(cos.std(ddof=1)), "samples": len(cos)}


def _choice_summary(result: Any) -> str:
    counts: dict[str, int] = {}
    for layer in result.layers:
        counts[layer.choice] = counts.get(layer.choice, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def _floats(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: v for k, v in outputs.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"}


def references(task: Task) -> dict[str, Any]:
    """fp32 outputs (and MiniLM sentence embeddings) of every unseen set, computed once."""
    session = runtime.make_session(str(task.src))
    names = [o.name for o in session.get_outputs()]
    refs: dict[str, Any] = {"session": session}
    for name, (arrays, _) in task.unseen.items():
        feeds = batches(arrays)
        refs[name] = {"feeds": feeds, "outputs": [_floats(runtime.run(session, f, names)) for f in feeds]}
        if task.texts is not None:
            from onnxpress.models import minilm

            sentences = task.texts[name]
            refs[name]["embeddings"] = minilm.embed(session, [minilm.tokenize(sentences[i : i + 32]) for i in range(0, len(sentences), 32)])
    return refs


def _yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def render(task: Task, rows: list[dict[str, Any]], budget: str, command: str, machine_text: str, when: str) -> str:
    first, *rest = task.unseen
    sizes = {name: len(keys) for name, (_, keys) in task.unseen.items()}
    lines = [
        f"# held-out truth: budget verdicts vs unseen data ({task.name})",
        "",
        f"Command: `{command}`. Machine: {machine_text}. Date: {when}.",
        "",
        f"Budget `{budget}` (mean per-sample cosine of the model output vs fp32). Calibration: the first *n* of a pool of {len(task.pool_keys)} samples, "
        f"given as one `.npz` to `onnxpress.optimize(..., calibration=...)`; the tool splits it (seeded) into fit and held-out parts. "
        f"Unseen: {', '.join(f'{k}: {v} samples' for k, v in sizes.items())}; never given to the tool. "
        "The unseen figures are computed like the budget metric (`onnxpress.metrics.compare_outputs` on batches of 8, per-sample cosine, mean / min / p5; "
        "the same function the search's verdict calls). s.e.: the standard error of a mean over the held-out part's sample count at the unseen set's "
        "per-sample spread (how well that many samples can predict at all). "
        f"Targets: |held-out - unseen| <= {PREDICT_WITHIN}; unseen mean cosine >= {UNSEEN_FLOOR}.",
        "",
    ]
    cols = ["calibration n", "verdict on", "fit / held-out", "MB", "fit cos", "held-out cos", f"unseen cos ({sizes[first]})", "held-out - unseen",
            "s.e. of held-out mean", "unseen min / p5 cos"]
    cols += [f"{name.split(' ')[0]} cos ({sizes[name]})" for name in rest]
    if task.texts is not None:
        cols += ["emb. mean cos fit / held-out / unseen", "unseen emb. min cos / NN", "unseen tokens in fit text"]
    cols += ["budget met (tool)", "predicts within 0.01", f"unseen >= {UNSEEN_FLOOR}", "search s", "builds"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        u = r["unseen"][first]
        cells = [str(r["n"]), "calibration itself (holdout=0, OLD)" if r["holdout"] == 0 else f"held-out {r['held']}",
                 f"{r['fit']} / {r['held'] if r['held'] else '(same)'}", f"{r['MB']:.3f}", f"{r['fit_cos']:.5f}", f"{r['held_cos']:.5f}",
                 f"{u['cos']:.5f}", f"{r['gap']:+.5f}", f"{r['held_se']:.4f}", f"{u['min_cos']:.4f} / {u['p5_cos']:.4f}"]
        cells += [f"{r['unseen'][name]['cos']:.5f}" for name in rest]
        if task.texts is not None:
            e = r["embedding"]
            cells += [f"{e['fit']['mean_cos']:.4f} / {e['held-out']['mean_cos']:.4f} / {e[first]['mean_cos']:.4f}",
                      f"{e[first]['min_cos']:.3f} / {e[first]['nn_agreement']:.1%}", f"{r['unseen_token_coverage']:.1%}"]
        cells += ["yes" if r["passed"] else "no", _yes(r["predicts"]), _yes(r["floor"]), f"{r['search_s']:.0f}", str(r["builds"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per row:"]
    for r in rows:
        overlaps = ", ".join(f"{k}: {v}" for k, v in r["overlaps"].items() if v is not None)
        lines.append(f"- **n={r['n']}{' holdout=0' if r['holdout'] == 0 else ''}**: verdict data: {r['evaluation']}. Overlaps (samples in common): {overlaps}. "
                     f"Held-out cos recomputed from the report's split indices: {r['held_recomputed']:.5f}. Choices: {r['choices']}.")
        for a in r["attempts"]:
            split = "; ".join(f"{s['layer']}: {s['held_out_cold_occurrences']}/{s['held_out_occurrences']} held-out token occurrences in 2-bit rows"
                              for s in a.get("heldout_checks") or [])
            lines.append(f"  - build: {a['bytes'] / 1e6:.3f} MB, fit {a['fit_value']:.5f}, held-out {a['value']:.5f}, simulated {a['simulated']:.5f}, "
                         f"target {a['target']:.5f}, passed {a['passed']}{'; ' + split if split else ''}")
        for note in r["notes"]:
            lines.append(f"  - note: {note}")
        text = r["pipeline"]
        lines.append(f"  - pipeline: `{text[:700]}{'...' if len(text) > 700 else ''}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help="calibration sizes (default 32,128,512; --quick: 32)")
    ap.add_argument("--budget", default="cos>=0.98")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--no-old", action="store_true", help="skip the holdout=0 row (the old behaviour, at the smallest size)")
    ap.add_argument("--quick", action="store_true", help="digits MLP instead of MiniLM (CI smoke run, < 60 s)")
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--rows", type=Path, default=Path("/tmp/onnxpress-heldout-rows.jsonl"), help="finished rows, one JSON per line")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --rows and run only the others")
    args = ap.parse_args(argv)
    task = digits_task() if args.quick else minilm_task()
    sizes = [int(s) for s in (args.sizes or ("32" if args.quick else "32,128,512")).split(",")]
    machine_text = machine()
    when = datetime.date.today().isoformat()
    refs = references(task)
    command = "python " + " ".join(["benchmarks/heldout_bench.py", *(argv if argv is not None else sys.argv[1:])])
    rows: list[dict[str, Any]] = []
    if args.resume and args.rows.exists():
        rows = [r for r in map(json.loads, args.rows.read_text().splitlines()) if r["task"] == task.name and r["budget"] == args.budget]
    elif args.rows.exists():
        args.rows.unlink()
    # the smallest size and its old-behaviour twin first: on a slow machine the comparison the issue is about comes first
    plan: list[tuple[int, Any]] = [(min(sizes), None)] + ([] if args.no_old else [(min(sizes), 0)]) + [(n, None) for n in sorted(sizes)[1:]]
    with tempfile.TemporaryDirectory(prefix="heldout-bench-") as tmp:
        for n, holdout in plan:
            if any(r["n"] == n and r["holdout"] == holdout for r in rows):
                continue
            row = run_row(task, n, holdout, args.budget, args.jobs, Path(tmp), refs)
            row["budget"] = args.budget
            with args.rows.open("a") as f:
                f.write(json.dumps(row, default=float) + "\n")
            rows.append(row)
            rows.sort(key=lambda r: (r["n"], r["holdout"] == 0))
            md = render(task, rows, args.budget, command, machine_text, when)
            if args.markdown:
                args.markdown.parent.mkdir(parents=True, exist_ok=True)
                args.markdown.write_text(md)
    md = render(task, rows, args.budget, command, machine_text, when)
    if args.markdown:
        args.markdown.write_text(md)
    print(md)
    return 0  # a missed target is a finding in the table, not a failed run

if __name__ == "__main__":
    sys.exit(main())
