"""Hostile and broken inputs through the real CLI: the error contract holds for every one.

For each case of ``hostile_corpus`` (and for a few dozen hypothesis mutations of valid models) every run
of ``onnxpress optimize`` (and ``inspect`` / ``validate`` where the case asks) must:

- exit with the case's exact code (1 or 2 for refused inputs; 0 for inputs that are in fact valid, whose
  output must then validate against the input),
- print exactly one line on stderr, starting ``onnxpress: error:``, naming the problem, with no traceback and
  not through the CLI's catch-all for unexpected exceptions ("rerun with --debug"),
- leave nothing in the output folder (no output, no ``.tmp``, no ``.data``) when it fails,
- leave the input bytes unchanged (sha256) and create, change or delete nothing outside the output folder
  (the whole case folder is snapshotted before and after, including the working directory and TMPDIR).

Runs are in-process (``onnxpress.cli.run`` under ``capfd``, which also captures what native libraries write
to fd 2) except the cases marked ``isolate``, which run ``python -m onnxpress`` in a subprocess with a 4 GiB
address-space limit (crash isolation, recursion limits, resource bounds).

The figures (cases, runs, tracebacks, partial outputs, ...) are printed once every case has run, by
whichever xdist worker finishes last.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import resource
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import hostile_corpus as hc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxpress
from onnxpress.cli import run

MEMORY_LIMIT = 4 << 30  # RLIMIT_AS of isolated runs
SUBPROCESS_TIMEOUT = 180
MUTATION_EXAMPLES = 100
# onnxruntime writes a session id file ".ses" into TMPDIR when it is imported: a library side effect, not
# an onnxpress output (in-process runs have onnxruntime imported already, so they never create it).
ALLOWED_NEW_OUTSIDE = {"tmp/.ses"}
CATCH_ALL = "rerun with --debug for the traceback"
PREFIX = "onnxpress: error: "

# Known bugs outside the files this suite may fix; a case that hits one is reported as xfail, not passed.
EXTRA_STDERR_BUG = (
    "known bug: third-party log lines reach stderr besides the one error line "
    "(onnxruntime's own ERROR log: runtime.session_options should set log_severity_level = 4; "
    "onnx-ir warnings during passes: cli.run should route library logging away from stderr unless --debug)"
)
ORT_LOGS = {"empty_graph", "constant_of_shape_4tib", "expand_4tib", "range_2pow40", "external_huge_sparse_file"}


# ---------------------------------------------------------------------------------------------- helpers


@dataclasses.dataclass
class Run:
    case: str
    command: str
    code: int | None  # None: timed out
    expected: int
    stdout: str
    stderr: str
    violations: list[str]


def _layout(root: Path) -> dict[str, Path]:
    folders = {name: root / name for name in ("in", "out", "work", "tmp")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return folders


def fingerprint(path: Path) -> str:
    """sha256 of a regular file (size and mtime above 64 MiB); never opens a FIFO, device or folder."""
    try:
        st_ = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(st_.st_mode):
        return "link:" + os.readlink(path)
    if stat.S_ISDIR(st_.st_mode):
        return "dir"
    if stat.S_ISREG(st_.st_mode) and st_.st_size <= 64 << 20:
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    if stat.S_ISREG(st_.st_mode):  # a huge sparse file
        return f"size:{st_.st_size}:mtime:{st_.st_mtime_ns}"
    return f"mode:{stat.S_IFMT(st_.st_mode):o}"


def snapshot(root: Path, skip: Path) -> dict[str, str]:
    """path -> fingerprint of everything under root except the folder ``skip``."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == skip:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = here / name
            if path != skip:
                found[str(path.relative_to(root))] = fingerprint(path)
    return found


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_cli(args: list[str], folders: dict[str, Path], isolate: bool, capfd, monkeypatch) -> tuple[int | None, str, str]:
    if isolate:
        env = {k: v for k, v in os.environ.items() if k != "ONNXPRESS_DEBUG"}
        env["TMPDIR"] = str(folders["tmp"])
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "onnxpress", *args], capture_output=True, text=True, cwd=folders["work"],
                env=env, timeout=SUBPROCESS_TIMEOUT, preexec_fn=_limit_memory,
            )
        except subprocess.TimeoutExpired as exc:
            return None, str(exc.stdout or ""), str(exc.stderr or "")
        return proc.returncode, proc.stdout, proc.stderr
    with monkeypatch.context() as m:
        m.chdir(folders["work"])
        m.setattr(tempfile, "tempdir", str(folders["tmp"]))
        m.delenv("ONNXPRESS_DEBUG", raising=False)
        capfd.readouterr()
        code = run(args)
        out, err = capfd.readouterr()
    return code, out, err


PROGRESS_LINE = re.compile(r"^\[\s*\d+\.\d s\] ")


def check_run(r: Run, message: str, folders: dict[str, Path], out_before: set[str]) -> None:
    """Fill ``r.violations`` with every broken promise of the error contract."""
    text = r.stdout + r.stderr
    # a run that lasts LOG_AFTER_SECONDS with stderr redirected logs "[  21.3 s] stage" lines by design (on a loaded
    # machine even a failing load can take that long): they are progress, not part of the error contract
    lines = [line for line in r.stderr.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]
    if r.code is None:
        r.violations.append("timeout")
    elif r.code != r.expected:
        r.violations.append(f"exit code {r.code}, expected {r.expected}")
    if "Traceback" in text:
        r.violations.append("traceback")
    if r.code not in (0, None):
        if CATCH_ALL in r.stderr:
            r.violations.append("unhandled exception (catch-all)")
        error_lines = [line for line in lines if line.startswith(PREFIX)]
        if len(error_lines) != 1:
            r.violations.append(f"{len(error_lines)} 'onnxpress: error:' lines")
        elif len(lines) > 1:
            r.violations.append("extra stderr")
        elif message and message.lower() not in lines[0].lower():
            r.violations.append(f"message lacks {message!r}")
    elif r.code == 0 and lines:
        r.violations.append("extra stderr")
    out_now = set(os.listdir(folders["out"]))
    leftovers = sorted(p for p in out_now if p.endswith(".tmp") or p.startswith("."))
    if leftovers:
        r.violations.append(f"temporary files left: {leftovers}")
    if r.code != 0 and out_now != out_before:
        r.violations.append(f"partial output: {sorted(out_now - out_before)}")
    tmp_left = set(os.listdir(folders["tmp"])) - {".ses"}
    if tmp_left:
        r.violations.append(f"temporary files left in TMPDIR: {sorted(tmp_left)}")


# ---------------------------------------------------------------------------------------------- figures


def _records_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # one folder for all workers
    folder = shared / "hostile-records"
    folder.mkdir(exist_ok=True)
    return folder


def _expected_records() -> set[str]:
    return {f"case-{name}" for name in hc.CASES} | {"mutations"}


def record(tmp_path_factory, request, key: str, runs: list[Run], **extra) -> None:
    """Store this test's runs; the test that completes the set prints the figures (once per session)."""
    folder = _records_dir(tmp_path_factory)
    payload = {"runs": [dataclasses.asdict(r) | {"stdout": "", "stderr": r.stderr[-500:]} for r in runs], **extra}
    tmp = folder / f".{key}.json.tmp"
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, folder / f"{key}.json")
    if {p.stem for p in folder.glob("*.json")} < _expected_records():
        return
    try:
        os.close(os.open(folder / "printed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    text = figures(folder)
    (folder / "figures.txt").write_text(text)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        sys.__stderr__.write("\n" + text + "\n")  # under xdist, worker stdout is dropped but fd 2 reaches the terminal
        sys.__stderr__.flush()


def figures(folder: Path) -> str:
    runs, cases, mutations = [], 0, 0
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        runs += data["runs"]
        cases += path.stem.startswith("case-")
        mutations += data.get("examples", 0)
    by_command = collections.Counter(r["command"] for r in runs)
    codes = collections.Counter(r["code"] for r in runs)
    kinds = collections.Counter(v.split(":")[0] for r in runs for v in r["violations"])
    partial = sum(1 for r in runs for v in r["violations"] if v.startswith(("partial output", "temporary files")))
    return (
        f"hostile inputs: {cases} corpus cases + {mutations} hypothesis mutations; {len(runs)} CLI runs "
        f"({', '.join(f'{k} {v}' for k, v in sorted(by_command.items()))}); exit codes {dict(sorted(codes.items(), key=str))}; "
        f"tracebacks {kinds.get('traceback', 0)}; unhandled exceptions {kinds.get('unhandled exception (catch-all)', 0)}; "
        f"partial outputs {partial}; files changed outside the output folder {kinds.get('changed outside the output folder', 0)}; "
        f"inputs modified {kinds.get('input modified', 0)}; wrong exit codes {sum(v for k, v in kinds.items() if k.startswith('exit code'))}; "
        f"runs with extra stderr lines {kinds.get('extra stderr', 0)} (known: onnxruntime/onnx-ir logging); timeouts {kinds.get('timeout', 0)}"
    )


# ---------------------------------------------------------------------------------------------- the corpus


def _commands(case: hc.Case, model: Path, out: Path) -> list[tuple[str, list[str], int]]:
    commands = [("optimize", ["optimize", str(model), "-o", str(out)], case.optimize)]
    if case.inspect is not None:
        commands.append(("inspect", ["inspect", str(model), "--json"], case.inspect))
    if case.validate is not None:
        commands.append(("validate", ["validate", str(model), str(model)], case.validate))
    return commands


def test_corpus_is_large_enough():
    assert len(hc.CASES) >= 50
    assert {c.optimize for c in hc.CASES.values()} == {0, 1, 2}
    assert sum(c.isolate for c in hc.CASES.values()) >= 5


# the isolated cases run `python -m onnxpress` in subprocesses (20-40 s each on 2 cores): the slow tier
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c.isolate else c for c in hc.CASES.values()], ids=list(hc.CASES))
def test_hostile_input(case: hc.Case, tmp_path, tmp_path_factory, capfd, monkeypatch, request):
    folders = _layout(tmp_path)
    model = case.build(folders["in"])
    out = folders["out"] / "out.onnx"
    before = snapshot(tmp_path, skip=folders["out"])
    input_sha = fingerprint(model)
    runs: list[Run] = []
    for command, args, expected in _commands(case, model, out):
        out_before = set(os.listdir(folders["out"]))
        code, stdout, stderr = run_cli(args, folders, case.isolate, capfd, monkeypatch)
        r = Run(case.name, command, code, expected, stdout, stderr, [])
        check_run(r, case.message if command == "optimize" else "", folders, out_before)
        if command == "optimize" and code == 0:
            written = sorted(os.listdir(folders["out"]))
            if written not in (["out.onnx"], ["out.onnx", "out.onnx.data"]):
                r.violations.append(f"unexpected files written: {written}")
            code_v, _, err_v = run_cli(["validate", str(model), str(out)], folders, case.isolate, capfd, monkeypatch)
            if code_v != 0:
                r.violations.append(f"output does not validate against the input: {err_v.strip()[-200:]}")
        after = snapshot(tmp_path, skip=folders["out"])
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) and k not in ALLOWED_NEW_OUTSIDE)
        if changed:
            r.violations.append(f"changed outside the output folder: {changed}")
        if fingerprint(model) != input_sha:
            r.violations.append("input modified")
        runs.append(r)
        before = {k: v for k, v in after.items()}
    record(tmp_path_factory, request, f"case-{case.name}", runs)
    failures = [f"{r.command}: {v} | stderr: {r.stderr.strip()[-300:]!r}" for r in runs for v in r.violations]
    if failures and case.name in ORT_LOGS and all(v == "extra stderr" for r in runs for v in r.violations):
        pytest.xfail(EXTRA_STDERR_BUG)
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------- mutations


def test_mutated_valid_models(tmp_path, tmp_path_factory, capfd, monkeypatch, request):
    """Valid models with one mutation each (flipped bytes, truncation, a deleted field, another data type, an
    extreme dimension, a duplicated node): any exit code 0/1/2 is fine, the rest of the contract is not."""
    runs: list[Run] = []

    @settings(max_examples=MUTATION_EXAMPLES, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        seed=st.sampled_from(sorted(hc.SEEDS)),
        kind=st.sampled_from(hc.MUTATIONS),
        index=st.integers(0, 1 << 16),
        value=st.integers(0, 1 << 16),
    )
    def check(seed, kind, index, value):
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        folders = _layout(root)
        model = folders["in"] / "model.onnx"
        model.write_bytes(hc.mutate(seed, kind, index, value))
        input_sha = fingerprint(model)
        before = snapshot(root, skip=folders["out"])
        code, stdout, stderr = run_cli(["optimize", str(model), "-o", str(folders["out"] / "out.onnx")], folders, False, capfd, monkeypatch)
        r = Run(f"{seed}/{kind}/{index}/{value}", "optimize", code, code if code in (0, 1, 2) else 1, stdout, stderr, [])
        check_run(r, "", folders, set())
        if code == 0:
            try:
                onnxpress.load(folders["out"] / "out.onnx")
            except Exception as exc:
                r.violations.append(f"output does not load: {exc}")
        after = snapshot(root, skip=folders["out"])
        if before != after or fingerprint(model) != input_sha:
            r.violations.append("changed outside the output folder")
        runs.append(r)

    check()
    record(tmp_path_factory, request, "mutations", runs, examples=len(runs))
    assert len(runs) >= MUTATION_EXAMPLES // 2
    assert {r.code for r in runs} >= {1}
    failures = [f"{r.case}: {v} | {r.stderr.strip()[-300:]!r}" for r in runs for v in r.violations]
    if failures and all(v == "extra stderr" for r in runs for v in r.violations):
        pytest.xfail(f"{EXTRA_STDERR_BUG}: {failures[:3]}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------- resource bounds


@pytest.mark.slow  # a subprocess under a memory limit per case
@pytest.mark.parametrize(
    "shape, dims",
    [
        pytest.param([1 << 40, 4], [], id="static-2pow40"),
        pytest.param(["batch", 1 << 20, 1 << 20], ["--dim", "batch=1"], id="static-2pow40-elements"),
        pytest.param(["batch", "seq", 4096], ["--dim", "batch=65536", "--dim", "seq=65536"], id="symbolic-set-huge"),
    ],
)
def test_generated_inputs_are_capped_under_a_memory_limit(tmp_path, shape, dims):
    """A model claiming huge input shapes fails with the cap message, under RLIMIT_AS, without MemoryError."""
    from onnx import TensorProto, helper

    folders = _layout(tmp_path)
    vi = helper.make_tensor_value_info
    model = hc._write(folders["in"], hc._model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, shape)], [vi("y", TensorProto.FLOAT, shape)]))
    env = dict(os.environ, TMPDIR=str(folders["tmp"]))
    proc = subprocess.run(
        [sys.executable, "-m", "onnxpress", "optimize", str(model), "-o", str(folders["out"] / "o.onnx"), *dims],
        capture_output=True, text=True, cwd=folders["work"], env=env, timeout=SUBPROCESS_TIMEOUT, preexec_fn=_limit_memory,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), lines
    assert "cap 67108864" in lines[0] and "--dim" in lines[0]
    assert "MemoryError" not in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(folders["out"]) == []


# ---------------------------------------------------------------------------------------------- hostile output folder


@pytest.mark.parametrize("external", [True, False], ids=["external-data", "single-file"])
def test_symlinked_outputs_do_not_write_outside_the_output_folder(tmp_path, capfd, monkeypatch, external):
    """out.onnx and out.onnx.data planted as symlinks to files outside the output folder: the save replaces
    the links with regular files and never writes through them."""
    folders = _layout(tmp_path)
    model = hc.CASES["external_valid"].build(folders["in"])  # a valid model whose weights are external
    victims = {name: tmp_path / "secret" / f"victim-{name}" for name in ("out.onnx", "out.onnx.data")}
    for name, victim in victims.items():
        victim.write_bytes(b"do not overwrite " + name.encode())
        os.symlink(victim, folders["out"] / name)
    before = snapshot(tmp_path, skip=folders["out"])
    args = ["optimize", str(model), "-o", str(folders["out"] / "out.onnx"), "--external-data" if external else "--no-external-data"]
    code, _, err = run_cli(args, folders, False, capfd, monkeypatch)
    assert code == 0, err
    assert snapshot(tmp_path, skip=folders["out"]) == before  # victims unchanged, nothing new outside out/
    assert not os.path.islink(folders["out"] / "out.onnx")
    if external:
        assert not os.path.islink(folders["out"] / "out.onnx.data")
    assert run_cli(["validate", str(model), str(folders["out"] / "out.onnx")], folders, False, capfd, monkeypatch)[0] == 0


def test_single_file_output_of_external_data_input_is_self_contained(tmp_path, capfd, monkeypatch):
    """--no-external-data into another folder: the output must embed the weights, not point at the input's
    data file relative to the output folder (where a file of that name could be anything)."""
    folders = _layout(tmp_path)
    model = hc.CASES["external_valid"].build(folders["in"])
    (folders["out"] / "weights.bin").write_bytes(b"\xff" * 64)  # a decoy with the input's data file name
    out = folders["out"] / "out.onnx"
    code, _, err = run_cli(["optimize", str(model), "-o", str(out), "--no-external-data"], folders, False, capfd, monkeypatch)
    assert code == 0, err
    import onnx

    proto = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert run_cli(["validate", str(model), str(out), "--atol", "0", "--rtol", "0"], folders, False, capfd, monkeypatch)[0] == 0


# ---------------------------------------------------------------------------------------------- hostile text in the output

PENDING_CLI_WIRING = (
    "cli.py does not print through onnxpress.render yet (make_console, make_progress, render_inspect): its own "
    "tables and progress column print model names raw (rich markup, escape sequences, 10,000 characters)"
)


def _cli_prints_through_render() -> bool:
    import inspect as pyinspect

    import onnxpress.cli

    source = pyinspect.getsource(onnxpress.cli)
    return all(name in source for name in ("make_console", "make_progress", "render_inspect"))


def _visible(text: str) -> str:
    from onnxpress.render import plain

    return plain(text)


@pytest.mark.parametrize("kind", sorted(hc.HOSTILE_NAMES))
def test_hostile_names_print_literally(kind, tmp_path, capfd, monkeypatch):
    """optimize (per-layer summary, --verbose, --quiet, a pipeline naming a TorchScript layer and a quoted
    hostile name) and inspect (tables and JSON) on a model whose names are rich markup, escape sequences or
    10,000 characters: exit 0, no traceback, nothing on stderr, every name printed as visible plain text
    (escapes as \\x1b..., long names as head…tail (N chars)), no escape character reaches stdout, JSON whole."""
    monkeypatch.setenv("COLUMNS", "100000")  # one table row per line: the names can be searched for as they are
    folders = _layout(tmp_path)
    names = hc.HOSTILE_NAMES[kind]
    model = hc._write(folders["in"], hc.hostile_names_proto(kind))
    out = str(folders["out"] / "out.onnx")
    quoted = '"' + names[1].replace("\\", "\\\\").replace('"', '\\"') + '"'
    runs = {
        "summary": ["optimize", str(model), "-o", out, "--force", "-p", f"strip-metadata,qdq(mode=weight,exclude=[{hc.TS_NAME}])"],
        "verbose": ["optimize", str(model), "-o", out, "--force", "-p", f"qdq(mode=weight,exclude=[{quoted}])", "--verbose"],
        "quiet": ["optimize", str(model), "-o", out, "--force", "-p", f"qdq(mode=weight,exclude=[{hc.TS_NAME},{quoted}])", "--quiet"],
        "inspect": ["inspect", str(model)],
        "json": ["inspect", str(model), "--json"],
    }
    printed: dict[str, str] = {}
    failures: list[str] = []
    thread_errors: list[BaseException] = []  # the progress bar renders in a thread: its MarkupError would not reach the exit code
    monkeypatch.setattr(threading, "excepthook", lambda args: thread_errors.append(args.exc_value))
    for key, args in runs.items():
        code, stdout, stderr = run_cli(args, folders, False, capfd, monkeypatch)
        printed[key] = stdout
        if code != 0 or "Traceback" in stdout + stderr or stderr.strip():
            failures.append(f"{key}: exit {code}, stderr {stderr.strip()[-300:]!r}")
        failures += [f"{key}: {type(e).__name__} in a thread: {e}" for e in thread_errors]
        thread_errors.clear()
        for ch in ("\x1b", "\x07", "\u202e"):
            if ch in stdout and key != "json":
                failures.append(f"{key}: {ch!r} reached stdout")
    if not failures:
        weights = [f"{name}.weight" for name in names]
        for key in ("summary", "verbose", "inspect"):
            for text in (*(names if key != "inspect" else weights), f"out{names[-1]}"):
                if _visible(text) not in printed[key]:
                    failures.append(f"{key}: {text[:60]!r} not printed as {_visible(text)[:80]!r}")
        for name in names:  # (the verbose and quiet runs' pipelines name one: the Result table prints a pipeline whole)
            if len(name) > 1000 and (name in printed["summary"] or name in printed["inspect"]):
                failures.append("a 10,000-character name printed whole in a table")
        quiet = printed["quiet"].strip().splitlines()
        if len(quiet) != 1 or not quiet[0].startswith("passed") or hc.TS_NAME not in quiet[0] or not quiet[0].endswith(out):
            failures.append(f"--quiet printed {quiet!r}")
        info = json.loads(printed["json"])
        if sorted(r["name"] for r in info["largest"]) != sorted(weights) or info["outputs"][0]["name"] != f"out{names[-1]}":
            failures.append("inspect --json does not hold the names whole")
    if failures and not _cli_prints_through_render():
        pytest.xfail(f"{PENDING_CLI_WIRING}: {failures[:2]}")
    assert not failures, "\n".join(failures)


def test_hostile_metadata_prints_literally(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")
    folders = _layout(tmp_path)
    model = hc.CASES["metadata_markup_and_escapes"].build(folders["in"])
    code, stdout, stderr = run_cli(["inspect", str(model)], folders, False, capfd, monkeypatch)
    failures = [] if code == 0 and not stderr.strip() else [f"exit {code}: {stderr.strip()[-300:]!r}"]
    for text in ("[/key]", "[red]v[/red]\\x1b]8;;http://evil\\x1b\\", "[link=http://e]g[/link]", "[/x]producer \\x1b[2J1.0", "(10,000 chars)", "\\x1b[31mk", "\\n\\r"):
        if text not in stdout:
            failures.append(f"{text!r} not printed")
    if "\x1b" in stdout:
        failures.append("an escape character reached stdout")
    if failures and not _cli_prints_through_render():
        pytest.xfail(f"{PENDING_CLI_WIRING}: {failures[:2]}")
    assert not failures, "\n".join(failures)
