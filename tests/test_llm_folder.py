"""An onnxruntime-genai folder in, an onnxruntime-genai folder out (``onnxpress.llm.folder``): the optimized
model, genai_config.json naming it, the tokenizer files; written atomically; the input folder only read."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai")

import onnxpress  # noqa: E402
from onnxpress.cli import run  # noqa: E402
from onnxpress.llm import folder as genai_folder  # noqa: E402
from onnxpress.llm import task  # noqa: E402
from onnxpress.models import smollm  # noqa: E402

INT4 = "qdq(mode=int4,block_size=32)"


@pytest.fixture(scope="module")
def tiny_folder() -> Path:
    return smollm.tiny_onnx()


def snapshot(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file of a folder (hidden ones too)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def genai_tokens(folder: Path, prompt: list[int], n: int) -> list[int]:
    return genai_folder.genai_generate(folder, prompt, n)


def test_int4_output_is_a_genai_folder_that_generates(tiny_folder, tmp_path, capsys):
    before = snapshot(tiny_folder)
    out = tmp_path / "int4"
    code = run(["optimize", str(tiny_folder / "model.onnx"), "-o", str(out / "model.onnx"), "-p", INT4, "--no-validate", "-q"])
    assert code == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json"])
    assert json.loads((out / "genai_config.json").read_text()) == json.loads((tiny_folder / "genai_config.json").read_text())
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in proto.graph.node) >= 8  # 2 layers x (qkv, o, gate/up, down) at int4
    assert (out / "model.onnx.data").stat().st_size < (tiny_folder / "model.onnx.data").stat().st_size / 2
    prompt = list(smollm.tiny_tokenizer()(smollm.llm_text.eval_texts()[0])["input_ids"][:10])
    tokens = genai_tokens(out, prompt, 6)
    assert len(tokens) == 6 and tokens == task.greedy(out / "model.onnx", [prompt], 6)[0]
    assert snapshot(tiny_folder) == before  # the input folder is only read
    assert not list(tmp_path.glob(".*"))  # no staging folder left behind


def test_another_model_name_is_written_into_genai_config(tiny_folder, tmp_path):
    out = tmp_path / "q"
    _, report = onnxpress.optimize(str(tiny_folder / "model.onnx"), INT4, validate_result=False, output=out / "decoder-int4.onnx")
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "decoder-int4.onnx"
    assert (out / "decoder-int4.onnx.data").is_file() and not (out / "model.onnx").exists()
    assert report.written[0] == str(out / "decoder-int4.onnx") and "onnxruntime-genai folder" in report.notes[-1]
    assert len(genai_tokens(out, [5, 6, 7, 8], 4)) == 4


def test_an_earlier_output_is_replaced_whole_and_a_foreign_folder_is_refused(tiny_folder, tmp_path, capsys):
    src = str(tiny_folder / "model.onnx")
    out = tmp_path / "out"
    assert run(["optimize", src, "-o", str(out / "a.onnx"), "-p", INT4, "--no-validate", "-q"]) == 0
    assert run(["optimize", src, "-o", str(out / "b.onnx"), "-p", "qdq(mode=weight)", "--no-validate", "-q"]) == 0
    assert not (out / "a.onnx").exists() and (out / "b.onnx").is_file()  # replaced whole, not merged
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "b.onnx"
    capsys.readouterr()
    # a folder with other files, and a genai folder onnxpress did not write (a copy of the fp32 export)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_folder, foreign)
    for target, files in ((other, snapshot(other)), (foreign, snapshot(foreign))):
        code = run(["optimize", src, "-o", str(target / "model.onnx"), "-p", INT4, "--no-validate", "-q"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "new or empty folder" in err and len(err.splitlines()) == 1, err
        assert snapshot(target) == files
    assert run(["optimize", src, "-o", str(tmp_path / "no" / "such" / "model.onnx"), "-p", INT4, "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no").exists() and not list(tmp_path.glob(".*"))


def test_a_failed_write_leaves_no_folder_and_the_earlier_output_intact(tiny_folder, tmp_path, monkeypatch):
    src = str(tiny_folder / "model.onnx")
    model, _ = onnxpress.optimize(src, "qdq(mode=weight)", validate_result=False)
    new = genai_folder.plan_output(src, tmp_path / "new" / "model.onnx")
    old = tmp_path / "prev"
    genai_folder.write_folder(genai_folder.plan_output(src, old / "model.onnx"), model)
    kept = snapshot(old)

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(genai_folder.shutil, "copyfile", broken)
    for plan in (new, genai_folder.plan_output(src, old / "model.onnx")):
        with pytest.raises(OSError, match="disk full"):
            genai_folder.write_folder(plan, model)
    assert not (tmp_path / "new").exists() and snapshot(old) == kept
    monkeypatch.undo()
    # a failure in the commit itself (the config, moved last, cannot move): everything moves back
    real = genai_folder.os.replace

    def fail_on_config(a, b):
        if Path(a).name == genai_folder.CONFIG and Path(b).parent == old and ".old." not in Path(a).parent.name:
            raise OSError("interrupted")
        return real(a, b)

    monkeypatch.setattr(genai_folder.os, "replace", fail_on_config)
    with pytest.raises(OSError, match="interrupted"):
        genai_folder.write_folder(genai_folder.plan_output(src, old / "model.onnx"), model)
    assert snapshot(old) == kept and not list(tmp_path.glob(".*"))


def test_output_in_the_input_folder_stays_one_model_file(tiny_folder, tmp_path):
    """Beside the input, the folder's genai_config.json keeps naming the original: only the model is written."""
    copy = tmp_path / "genai"
    shutil.copytree(tiny_folder, copy)
    before = snapshot(copy)
    onnxpress.optimize(str(copy / "model.onnx"), "qdq(mode=weight)", validate_result=False, output=copy / "weight.onnx")
    after = snapshot(copy)
    assert set(after) - set(before) == {"weight.onnx", "weight.onnx.data"}
    assert all(after[name] == digest for name, digest in before.items())
    # that model is not the one genai_config.json names: optimizing it elsewhere writes a plain file again
    assert genai_folder.plan_output(copy / "weight.onnx", tmp_path / "x" / "m.onnx") is None


def test_companions_skip_models_and_copy_the_components_the_config_names(tiny_folder, tmp_path):
    copy = tmp_path / "genai"
    shutil.copytree(tiny_folder, copy)
    shutil.copy(copy / "model.onnx", copy / "old.onnx")  # a model the config does not name: not copied
    config = json.loads((copy / "genai_config.json").read_text())
    onnx.save(onnx.load(str(copy / "model.onnx")), str(copy / "vision.onnx"), save_as_external_data=True, location="vision.bin")
    config["model"]["vision"] = {"filename": "vision.onnx"}
    files = genai_folder.companion_files(copy, "model.onnx", config)
    assert files == sorted(["tokenizer.json", "tokenizer_config.json", "vision.onnx", "vision.bin"])
