"""Bad and hostile input, and a hostile machine: every case is one line on stderr, exit
status 2 (143 for SIGTERM), no traceback, and no file (not even a temp file) left behind.

The README's "Bad input" table is run row by row, so it cannot drift from the tool.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from test_cli import user_error
from torch import nn

import attnsurgeon
from attnsurgeon import checkpoint, files
from attnsurgeon.errors import UsageError, foreign_error

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def readme_rows() -> list[dict[str, str]]:
    """The rows of the README's "Bad input" table: what, example (or -), message, exit."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("bad input", "") or set(cells[0]) <= {"-"}:
            continue
        example, message = (re.fullmatch(r"`(.*)`", c) for c in cells[1:3])
        rows.append({"what": cells[0], "example": example.group(1) if example else "",
                     "message": message.group(1), "exit": cells[3]})
    return rows


ROWS = readme_rows()


def readme_message(what: str) -> str:
    """The message the README promises for the row whose first cell mentions ``what``."""
    (row,) = [r for r in ROWS if what in r["what"]]
    return row["message"]


@pytest.fixture
def bad_files(tmp_path, monkeypatch) -> Path:
    """The files the README's examples name, in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("shopping list\n")
    Path("deep.toml").write_text("a = " + "[" * 5000 + "\n")  # deeper than the recursion limit from any stack depth
    Path("old.pt").write_bytes(b"")
    state = torchvision.models.resnet18().state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, "nan.pth")
    torch.save(nn.Linear(2, 2), "pickled.pth")  # a whole module: needs unpickling code
    torch.save({"format": "attnsurgeon", "format_version": 1, "model": "resnet18", "model_kwargs": {},
                "recipe": 5, "state_dict": {}}, "bad_field.pt")
    return tmp_path


def listing(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def test_readme_table_is_complete():
    assert len(ROWS) >= 15
    assert all(r["exit"] in ("2", "143") for r in ROWS)
    assert sum(1 for r in ROWS if r["example"]) >= 12


@pytest.mark.parametrize("row", [r for r in ROWS if r["example"]], ids=lambda r: r["what"])
def test_readme_bad_input_rows(cli, bad_files, row):
    before = listing(bad_files)
    argv = shlex.split(row["example"])
    assert argv[0] == "attnsurgeon"
    user_error(cli(*argv[1:]), row["message"])
    assert listing(bad_files) == before  # nothing written, no temp file


# --- the machine fails: disk, memory -------------------------------------------------


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                 "data/3: file write failed"),
])
def test_full_disk_while_insert_writes(cli, tmp_path, monkeypatch, failure):
    def save(obj, f, *args, **kwargs):
        f.write(b"partial")  # half a file (checkpoint.save writes into a file object), then the disk is full
        raise failure

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "se.pt"
    user_error(cli("insert", "resnet18", "--attn", "se", "--input-size", "32", "-o", str(out)),
               f"cannot write {out}: ")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_message_is_the_readmes(tmp_path):
    out = tmp_path / "se.pt"

    def write(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UsageError) as e:
        files.atomic_write(out, write)
    assert str(e.value) == readme_message("disk full").replace("se.pt", str(out))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.heavy
def test_file_too_large_for_real(tmp_path):
    """A real failing write: torch.save under a 1 MB file-size limit (SIGXFSZ ignored)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    out = subprocess.run([sys.executable, "-m", "attnsurgeon", "insert", "resnet18", "--attn", "se",
                          "--input-size", "32", "-o", "se.pt"], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, preexec_fn=limit, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: cannot write se.pt: the write failed (disk full or file too large?); nothing was written"]
    assert list(tmp_path.iterdir()) == []


def test_export_onnx_full_disk(tmp_path, monkeypatch):
    from attnsurgeon import onnx_export

    def save(self, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", save)
    with pytest.raises(UsageError, match="cannot write .*m.onnx: No space left on device; nothing was written"):
        onnx_export.export_onnx(model, tmp_path / "m.onnx", input_size=32, verify=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 120000000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
])
def test_out_of_memory_is_one_line(cli, tmp_path, monkeypatch, failure):
    from attnsurgeon import report

    def measure(*args, **kwargs):
        raise failure

    monkeypatch.setattr(report, "measure", measure)
    out = tmp_path / "se.pt"
    user_error(cli("insert", "resnet18", "--attn", "se", "--input-size", "32", "-o", str(out)), "out of memory (")
    assert list(tmp_path.iterdir()) == []


def test_out_of_memory_message_is_the_readmes():
    error = foreign_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                       "120000000000 bytes. Error code 12 (Cannot allocate memory)"))
    assert str(error) == readme_message("out of memory")


def test_a_bug_keeps_its_traceback(cli, monkeypatch):
    from attnsurgeon import report

    def measure(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(report, "measure", measure)
    result = cli("summarize", "resnet18", "--attn", "se", "--input-size", "32")
    assert isinstance(result.exception, RuntimeError) and result.exit_code == 1


# --- SIGTERM -------------------------------------------------------------------------

@pytest.mark.heavy
def test_sigterm_during_export_leaves_nothing(tmp_path):
    """SIGTERM while the exporter runs (the temp .onnx file exists): it is removed."""
    code = ("import os, signal, sys, time, torch\n"
            "def export(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n"
            "torch.onnx.export = export\n"
            "from attnsurgeon.cli import main\n"
            "sys.argv = ['attnsurgeon', 'export-onnx', 'resnet18', '--attn', 'se', '--input-size', '32',"
            " '-o', 'se.onnx']\n"
            "main()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 143, out.stderr
    assert out.stderr.strip().splitlines() == [readme_message("SIGTERM")]  # no traceback
    assert list(tmp_path.iterdir()) == []


@pytest.mark.heavy
def test_sigterm_from_outside_while_insert_writes(tmp_path):
    """A real kill from another process, while the temp file beside se.pt exists."""
    code = ("import sys, time, torch\n"
            "real = torch.save\n"
            "def save(obj, f, *a, **k):\n"
            "    real(obj, f, *a, **k)\n"
            "    print('written', flush=True)\n"
            "    time.sleep(30)\n"
            "torch.save = save\n"
            "from attnsurgeon.cli import main\n"
            "sys.argv = ['attnsurgeon', 'insert', 'resnet18', '--attn', 'se', '--input-size', '32', '-o', 'se.pt']\n"
            "main()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # stdout goes to stderr while the work runs: the marker arrives there
        for line in proc.stderr:
            if line.strip() == "written":
                break
        assert [p.name.endswith(".tmp") for p in tmp_path.iterdir()] == [True]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == readme_message("SIGTERM") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# --- what is written -----------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_umasks_permissions(tmp_path, umask, mode):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    from attnsurgeon.onnx_export import export_onnx

    old = os.umask(umask)
    try:
        files.atomic_write(tmp_path / "a.pt", lambda tmp: torch.save({}, tmp))
        export_onnx(model, tmp_path / "a.onnx", input_size=32, verify=False)
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"a.pt": mode, "a.onnx": mode}


def test_json_stays_json_when_weights_download(cli, tmp_path, monkeypatch):
    """torch.hub writes "Downloading: ..." to stdout; --json output must not contain it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    state = torchvision.models.resnet18().state_dict()

    def download(url, dst, *args, **kwargs):
        torch.save(state, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    out = tmp_path / "se.pt"
    result = cli("insert", "resnet18", "--attn", "se", "--weights", "DEFAULT", "--input-size", "32",
                 "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"] == str(out)
    assert "Downloading" in result.stderr


def test_same_command_same_seed_same_file(cli, tmp_path):
    """The README's main job is reproducible: random base weights come from --seed too."""
    def run(name: str, *extra: str) -> dict[str, torch.Tensor]:
        result = cli("insert", "resnet18", "--attn", "se", "--layers", "layer3:", "--input-size", "32",
                     "-o", str(tmp_path / name), *extra)
        assert result.exit_code == 0, result.output
        return torch.load(tmp_path / name, weights_only=True)["state_dict"]

    torch.manual_seed(123)  # the global RNG's state must not matter
    a = run("a.pt")
    torch.manual_seed(456)
    b = run("b.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = run("c.pt", "--seed", "1")
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_a_pth_checkpoint_is_a_file_not_a_model_name(cli, tmp_path):
    out = tmp_path / "se.pth"
    assert cli("insert", "resnet18", "--attn", "se", "--input-size", "32", "-o", str(out)).exit_code == 0
    result = cli("summarize", str(out), "--input-size", "32", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoint"]["path"] == str(out)
    renamed = tmp_path / "se_checkpoint"  # no suffix at all: recognised by content
    out.rename(renamed)
    assert cli("summarize", str(renamed), "--input-size", "32").exit_code == 0


def test_a_folder_named_like_a_model_does_not_hide_it(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet18").mkdir()
    result = cli("summarize", "resnet18", "--attn", "se", "--input-size", "32", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "resnet18"


def malformed(**fields) -> dict:
    data = {"format": "attnsurgeon", "format_version": 1, "model": "resnet18", "model_kwargs": {},
            "recipe": {"model": "resnet18", "insert": [{"attn": "se"}]},
            "state_dict": {"w": torch.zeros(1)}}
    return {**data, **fields}


@pytest.mark.parametrize("fields, message", [
    ({"recipe": 5}, "checkpoint field 'recipe' must be a table, got 5"),
    ({"model_kwargs": "x"}, "checkpoint field 'model_kwargs' must be a table of str keys, got 'x'"),
    ({"model": 3}, "checkpoint field 'model' must be a string, got 3"),
    ({"state_dict": {"w": [1.0]}}, "checkpoint field 'state_dict' must be a dict of tensors, got a dict"),
    ({"format_version": True}, "format_version True is not supported"),
    ({"recipe": {"insert": [{"attn": "se", "params": {"reduction": 0}}]}}, "reduction must be >= 1"),
    ({"weights": 7}, "checkpoint field 'weights' must be a string, got 7"),
    # a forged file must not make the tool download (or unpickle) anything
    ({"model_kwargs": {"weights_backbone": "DEFAULT"}}, "checkpoint field 'model_kwargs' may not set 'weights_backbone'"),
    ({"model": "vit_b_16"}, "checkpoint is of model 'vit_b_16' but its recipe names 'resnet18'"),
    ({"preservation": {"max_abs": "x"}}, "checkpoint field 'preservation' must be a table of the preservation figures"),
    ({"versions": {"torch": torch.zeros(1)}}, "checkpoint field 'versions' must be a table of strings"),
])
def test_checkpoint_fields_are_checked(cli, tmp_path, fields, message):
    path = tmp_path / "m.pt"
    torch.save(malformed(**fields), path)
    with pytest.raises(UsageError, match=re.escape(message)):
        checkpoint.read(path)
    user_error(cli("summarize", str(path)), message)


def test_checkpoint_with_a_wrong_shaped_tensor(cli, tmp_path):
    path, out = tmp_path / "m.pt", tmp_path / "m.onnx"
    assert cli("insert", "resnet18", "--attn", "se", "--input-size", "32", "-o", str(path)).exit_code == 0
    data = torch.load(path, weights_only=True)
    data["state_dict"]["fc.weight"] = torch.zeros(10, 512)
    torch.save(data, path)
    message = "state_dict does not fit ResNet: shape of fc.weight: file (10, 512), model (1000, 512)"
    user_error(cli("summarize", str(path)), message)
    user_error(cli("export-onnx", str(path), "-o", str(out)), message)
    assert not out.exists()


@pytest.mark.parametrize("tensor, message", [
    (torch.empty(1000, 512, device="meta"), "fc.weight is a torch.strided torch.float32 tensor on meta"),
    (torch.zeros(1000, 512).to_sparse(), "fc.weight is a torch.sparse_coo torch.float32 tensor on cpu"),
    (torch.zeros(1000, 512, dtype=torch.complex64), "fc.weight is a torch.strided torch.complex64 tensor on cpu"),
])
def test_tensors_that_are_not_dense_real_cpu_tensors(cli, tmp_path, tensor, message):
    state = torchvision.models.resnet18().state_dict()
    state["fc.weight"] = tensor
    torch.save(state, tmp_path / "w.pth")
    user_error(cli("insert", "resnet18", "--attn", "se", "--weights-file", str(tmp_path / "w.pth"),
                   "-o", str(tmp_path / "m.pt")), message)
    assert not (tmp_path / "m.pt").exists()


def test_model_kwargs_a_builder_fails_on_name_the_file(cli, tmp_path):
    path = tmp_path / "m.pt"
    torch.save(malformed(model="mobilenet_v2", recipe={"model": "mobilenet_v2", "insert": [{"attn": "se"}]},
                         model_kwargs={"round_nearest": 0}), path)  # a ZeroDivisionError in torchvision
    user_error(cli("summarize", str(path)), f"{path}: mobilenet_v2: bad model arguments {{'round_nearest': 0}}")


def test_a_pickle_planted_in_the_hub_cache_never_runs(cli, tmp_path, monkeypatch):
    """torchvision loads pretrained weights with torch.hub's weights_only=False, and never
    checks the hash of a file already in the cache; --weights loads them weights_only."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    torch.save({"x": _Planted()}, cache / url.rsplit("/", 1)[-1])
    result = cli("summarize", "resnet18", "--attn", "se", "--weights", "DEFAULT", "--input-size", "32")
    user_error(result, readme_message("hub cache").replace("~/.cache/torch/hub/checkpoints", str(cache)))
    assert not (tmp_path / "PWNED").exists()


class _Planted:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["TORCH_HOME"]) / "PWNED",))


@pytest.mark.heavy
def test_figures_json_has_no_words_for_are_null(cli, tmp_path):
    """A zeroed classifier (a common fine-tuning start) has all-zero logits: the relative
    error has no scale, and NaN or Infinity would make --json invalid JSON."""
    state = torchvision.models.resnet18().state_dict()
    state["fc.weight"].zero_()
    state["fc.bias"].zero_()
    torch.save(state, tmp_path / "w.pth")
    out = tmp_path / "m.pt"
    result = cli("insert", "resnet18", "--attn", "se", "--weights-file", str(tmp_path / "w.pth"),
                 "--input-size", "32", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["preservation"]["relative"] is None
    exported = cli("export-onnx", str(out), "-o", str(tmp_path / "m.onnx"), "--input-size", "32", "--json")
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["verification"]["runs"][0]["max_rel"] == 0.0
    assert "no relative figure" in cli("summarize", str(out), "--input-size", "32").stdout


def test_weights_that_make_a_nan_model_are_refused(cli, tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["bn1.running_var"][:] = -1.0  # finite, but sqrt(var + eps) is NaN
    torch.save(state, tmp_path / "w.pth")
    user_error(cli("insert", "resnet18", "--attn", "se", "--weights-file", str(tmp_path / "w.pth"),
                   "--input-size", "32", "-o", str(tmp_path / "m.pt")), "outputs on the probe batch are not finite")
    assert not (tmp_path / "m.pt").exists()


def test_weights_saved_before_num_batches_tracked_load(cli, tmp_path):
    """A file from before PyTorch 0.4.1 (or converted) has no num_batches_tracked: torch's
    own load fills it in, and so do we; its norms stay trainable BatchNorm2d."""
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items()
             if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "w.pth")
    out = tmp_path / "m.pt"
    result = cli("insert", "resnet18", "--attn", "se", "--weights-file", str(tmp_path / "w.pth"),
                 "--input-size", "32", "-o", str(out))
    assert result.exit_code == 0, result.output
    model = attnsurgeon.load(out)
    assert sum(type(m) is nn.BatchNorm2d for m in model.modules()) == 20


def test_a_damaged_pickle_is_not_called_pickled_objects(cli, tmp_path):
    (tmp_path / "g.pt").write_bytes(b"\x80\x02garbagegarbage")
    user_error(cli("summarize", str(tmp_path / "g.pt")), "is not a loadable attnsurgeon checkpoint (a damaged pickle)")


def test_a_dangling_link_is_not_overwritten_without_force(cli, tmp_path):
    link = tmp_path / "m.pt"
    link.symlink_to(tmp_path / "missing" / "m.pt")
    user_error(cli("insert", "resnet18", "--attn", "se", "--input-size", "32", "-o", str(link)), "exists; use --force")
    assert link.is_symlink()


# --- command-line conventions ----------------------------------------------------------


@pytest.mark.parametrize("argv, expect", [
    (["--version"], "attnsurgeon 0.1.0\n"),
    (["-h"], "Usage: attnsurgeon"),
    (["insert", "-h"], "Usage: attnsurgeon insert"),
    (["--show-completion", "bash"], "complete "),
])
def test_conventions_without_torch(argv, expect):
    code = (
        "import sys\n"
        # typer finds the shell for --show-completion among the parent processes, and a job
        # started in the background has none: the shell is given, so the test does not depend on it
        "import shellingham\n"
        "shellingham.detect_shell = lambda *args, **kwargs: ('bash', '/bin/bash')\n"
        "from attnsurgeon.cli import app\n"
        f"try:\n    app({argv!r}, prog_name='attnsurgeon')\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout


@pytest.mark.parametrize("exc, writing, message", [
    (OSError(errno.ENOSPC, "No space left on device"), "a.pt", "cannot write a.pt: No space left on device; nothing was written"),
    (OSError(errno.EROFS, "Read-only file system"), "a.pt", "cannot write a.pt: Read-only file system; nothing was written"),
    (PermissionError(errno.EACCES, "Permission denied", "w.pth"), None, "w.pth: Permission denied"),
    (MemoryError(), None, "out of memory (allocation failed); try a smaller --input-size, --batch or --param value, or free some memory"),
    (OSError(errno.EPIPE, "Broken pipe"), None, None),  # a closed pipe is click's business
    (OSError(errno.ENOENT, "No such file"), "a.pt", None),  # not a write failure: a bug, keeps its traceback
    (RuntimeError("shape mismatch"), None, None),
    (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), None, None),
    (ValueError("out of memory"), None, None),
])
def test_foreign_error_mapping(exc, writing, message):
    error = foreign_error(exc, writing=writing)
    assert (None if error is None else str(error)) == message
