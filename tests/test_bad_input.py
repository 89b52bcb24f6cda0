"""Bad input and interruptions, as a user meets them: each case runs the real ``lit-longctx`` command in a fresh
process and checks the exit status, the one ``error:`` line (no traceback) and that existing checkpoints are
byte-identical afterwards; kill, disk-full and Ctrl-C tests check that the previous or current checkpoint loads and
that a resumed run equals an uninterrupted one."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from lit_longctx.callbacks.safety import NonFiniteGuard
from lit_longctx.checkpoint import read_checkpoint, save_checkpoint
from lit_longctx.hf import CheckpointError
from tests.cli_helpers import REPO, TINY_CONFIG, one_line_error, run

CHECKPOINT = """    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/checkpoints, save_last: true, every_n_train_steps: 2, save_top_k: -1}}
"""


def write_config(path: Path, root: Path, corpus: Path, callbacks: str = "", save_top_k: int = -1) -> Path:
    """TINY_CONFIG with extra callback entries (YAML list items) and the ModelCheckpoint's save_top_k."""
    text = TINY_CONFIG.format(root=root, corpus=corpus)
    checkpoint = CHECKPOINT.format(root=root)
    assert checkpoint in text
    text = text.replace(checkpoint, checkpoint.replace("save_top_k: -1", f"save_top_k: {save_top_k}") + callbacks)
    path.write_text(text)
    return path


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file below ``directory`` (to show that nothing existing was changed)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def lit_longctx(*args: str) -> subprocess.Popen:
    """``lit-longctx ARGS`` started in a fresh process; stderr goes to a file (a full pipe would stall the run)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("LIT_LONGCTX_DEBUG", None)
    err = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by finished())
    proc = subprocess.Popen([sys.executable, "-m", "lit_longctx.cli", *args], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=err)
    proc.err_file = err
    return proc


def finished(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """(exit status, stderr) of a process started by :func:`lit_longctx`."""
    proc.wait(timeout=timeout)
    proc.err_file.seek(0)
    err = proc.err_file.read()
    proc.err_file.close()
    return proc.returncode, err


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def all_finite(path: Path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    """A finished 3-step run (checkpoints at steps 2 and 3) whose files the error tests must leave untouched."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "tiny.yaml", root / "run", corpus)
    run("fit", "--config", str(config), "--trainer.max_steps=3")
    return root


@pytest.fixture(scope="module")
def fot_checkpoint(tmp_path_factory, corpus) -> Path:
    root = tmp_path_factory.mktemp("fot")
    config = write_config(root / "tiny.yaml", root / "run", corpus)
    run("fit", "--config", str(config), "--trainer.max_steps=1", "--model.class_path=lit_longctx.modules.FoT",
        "--model.init_args.mem_layers=[1]", "--model.init_args.last_context_length=16")
    return root / "run" / "checkpoints" / "last.ckpt"


def untouched_error(trained: Path, *args: str) -> str:
    """The one error line of ``lit-longctx ARGS``; the trained run's files are byte-identical afterwards."""
    before = snapshot(trained / "run" / "checkpoints")
    line = one_line_error(*args)
    assert snapshot(trained / "run" / "checkpoints") == before
    return line


# ------------------------------------------------------------------------------------------------------ security
class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@contextlib.contextmanager
def serve(directory: Path):
    """A loopback HTTP server for ``directory``; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_url_checkpoint_is_read_weights_only(trained, tmp_path):
    from lit_longctx.checkpoint_io import AtomicCheckpointIO

    served = tmp_path / "served"
    served.mkdir()
    marker = tmp_path / "code-ran"
    ckpt = torch.load(trained / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    torch.save({**ckpt, "payload": _Payload(marker)}, served / "evil.ckpt")
    shutil.copy(trained / "run" / "checkpoints" / "last.ckpt", served / "good.ckpt")
    with serve(served) as url:
        line = untouched_error(trained, "validate", "--config", str(trained / "tiny.yaml"), "--ckpt_path",
                               f"{url}/evil.ckpt")
        assert "evil.ckpt" in line and "not loaded" in line and not marker.exists()
        # Lightning's own loader (what the trainer calls) is weights-only for URLs too
        with pytest.raises(Exception, match="Weights only load failed"):
            AtomicCheckpointIO().load_checkpoint(f"{url}/evil.ckpt")
        assert not marker.exists()
        assert AtomicCheckpointIO().load_checkpoint(f"{url}/good.ckpt")["global_step"] == 3
        cli = run("validate", "--config", str(trained / "tiny.yaml"), "--ckpt_path", f"{url}/good.ckpt")
    assert cli.trainer.callback_metrics["val/loss"] > 0


def test_checkpoint_does_not_choose_the_class_or_override_the_command_line(trained, tmp_path, monkeypatch):
    """A checkpoint naming another class in its hyper-parameters: the config's class is built, nothing imported."""
    (tmp_path / "evil_module.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\nEvil = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = torch.load(trained / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"], "_class_path": "evil_module.Evil", "learning_rate": 9.0}
    torch.save(ckpt, tmp_path / "renamed.ckpt")
    cli = run("validate", "--config", str(trained / "tiny.yaml"), "--ckpt_path", str(tmp_path / "renamed.ckpt"),
              "--model.init_args.learning_rate=0.25")
    assert type(cli.model).__name__ == "CausalLM" and cli.model.hparams.learning_rate == 0.25
    assert not (tmp_path / "imported").exists()


def test_command_line_inference_options_win_over_the_checkpoint(fot_checkpoint):
    config = fot_checkpoint.parents[2] / "tiny.yaml"
    cli = run("validate", "--config", str(config), "--ckpt_path", str(fot_checkpoint), "--trainer.limit_val_batches=1",
              "--model.class_path=lit_longctx.modules.FoT", "--model.init_args.mem_layers=[1]",
              "--model.init_args.top_k=1", "--model.init_args.last_context_length=8")
    saved = read_checkpoint(fot_checkpoint, with_weights=False).model_config.attention_options["fot"]
    used = cli.model.model_config.attention_options["fot"]
    assert saved["last_context_length"] == 16 and saved.get("top_k") is None
    assert used["last_context_length"] == 8 and used["top_k"] == 1
    layer = cli.model.model.layers[1].self_attn
    assert layer.last_context_length == 8 and layer.top_k == 1


@pytest.mark.slow
def test_fot_checkpoint_given_to_the_landmark_module_names_the_class_to_use(trained, fot_checkpoint):
    line = untouched_error(trained, "validate", "--config", str(trained / "tiny.yaml"), "--ckpt_path",
                           str(fot_checkpoint), "--model.class_path=lit_longctx.modules.Landmark")
    assert "method 'fot'" in line and "--model.class_path lit_longctx.modules.FoT" in line


@pytest.mark.parametrize("ckpt_path", ["explicit", "last"])
def test_fot_checkpoint_given_to_causal_lm_is_refused_the_same_way_explicit_or_last(fot_checkpoint, ckpt_path):
    config = fot_checkpoint.parents[2] / "tiny.yaml"
    given = str(fot_checkpoint) if ckpt_path == "explicit" else "last"
    with pytest.raises(CheckpointError, match="method 'fot'.*--model.class_path lit_longctx.modules.FoT"):
        run("validate", "--config", str(config), "--ckpt_path", given)


# ------------------------------------------------------------------------------------------- nothing lost silently
def test_end_of_training_is_checkpointed(config, tmp_path):
    cli = run("fit", "--config", str(config), "--trainer.max_steps=5")  # interval 2: saves at 2, 4 and the end
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt_step(last) == 5
    saved = read_checkpoint(last).state_dict
    for k, v in cli.model.model.state_dict().items():
        assert torch.equal(saved[k], v), k


def test_two_runs_that_start_together_claim_different_run_directories(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from lit_longctx.runs import claim_run_directories

    class Trainer:  # what claim_run_directories reads of a trainer
        def __init__(self) -> None:
            self.loggers = [CSVLogger(tmp_path, name="logs")]

    a, b = Trainer(), Trainer()  # both created before either wrote: Lightning alone gives both version 0
    assert CSVLogger(tmp_path, name="logs").version == CSVLogger(tmp_path, name="logs").version == 0
    claim_run_directories(a)
    claim_run_directories(b)
    assert {a.loggers[0].version, b.loggers[0].version} == {0, 1}
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["version_0", "version_1"]


def test_skip_mode_drops_a_non_finite_step(tmp_path, corpus):
    callbacks = ("    - class_path: lit_longctx.callbacks.NonFiniteGuard\n      init_args: {action: skip}\n"
                 "    - class_path: tests.safety_helpers.RecordWeights\n")
    config = write_config(tmp_path / "skip.yaml", tmp_path / "run", corpus, callbacks)
    cli = run("fit", "--config", str(config), "--model.class_path=tests.safety_helpers.LossSpikeLM",
              "--model.init_args.nan_step=3")
    (guard,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, NonFiniteGuard)]  # the config's, not a default
    (record,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "RecordWeights"]
    assert cli.trainer.global_step == 4 and guard.skipped_steps == 1
    after2, after3, after4 = record.weights[1:4]
    for k in after2:
        assert torch.equal(after2[k], after3[k]), k  # the NaN step changed nothing
    assert any(not torch.equal(after3[k], after4[k]) for k in after3)  # training went on
    assert all_finite(tmp_path / "run" / "checkpoints" / "last.ckpt")


def test_non_finite_weights_are_never_checkpointed(tmp_path, corpus):
    from lit_longctx.callbacks.safety import NonFiniteError

    callbacks = "    - class_path: tests.safety_helpers.PoisonWeights\n      init_args: {step: 4}\n"
    config = write_config(tmp_path / "poison.yaml", tmp_path / "run", corpus, callbacks)
    with pytest.raises(NonFiniteError, match="step 4: the weights are not finite"):
        run("fit", "--config", str(config), "--trainer.max_steps=6")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt_step(last) == 2 and all_finite(last)
    assert not (tmp_path / "run" / "checkpoints" / "epoch=0-step=4.ckpt").exists()


@pytest.mark.slow
def test_nan_loss_stops_at_its_step_and_keeps_last_ckpt_finite(tmp_path, corpus):
    config = write_config(tmp_path / "nan.yaml", tmp_path / "run", corpus)
    proc = lit_longctx("fit", "--config", str(config), "--trainer.max_steps=6",
                       "--model.class_path=tests.safety_helpers.LossSpikeLM", "--model.init_args.nan_step=4")
    code, err = finished(proc)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: training stopped at step 4: the training loss is nan")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt_step(last) == 2 and all_finite(last)


# ---------------------------------------------------------------------------------------------- kills and Ctrl-C
@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_last_ckpt(tmp_path, corpus):
    callbacks = "    - class_path: tests.safety_helpers.KillDuringSave\n      init_args: {step: 4}\n"
    config = write_config(tmp_path / "kill.yaml", tmp_path / "run", corpus, callbacks, save_top_k=0)
    code, err = finished(lit_longctx("fit", "--config", str(config), "--trainer.max_steps=6"))
    assert code == -signal.SIGKILL, err[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    partial = list(checkpoints.glob(".last.ckpt.*.tmp"))
    assert len(partial) == 1  # the save of step 4 was cut half-way, beside the intact last.ckpt
    assert ckpt_step(checkpoints / "last.ckpt") == 2
    assert read_checkpoint(tmp_path / "run").source == str(checkpoints / "last.ckpt")


@pytest.mark.slow
def test_disk_full_during_a_save_leaves_the_previous_last_ckpt(tmp_path, corpus):
    probe = tmp_path / "probe"
    config = write_config(tmp_path / "probe.yaml", probe, corpus, save_top_k=0)
    run("fit", "--config", str(config), "--trainer.max_steps=2")
    size = (probe / "checkpoints" / "last.ckpt").stat().st_size
    mount = tmp_path / "small"
    mount.mkdir()
    # room for one checkpoint and a half: the first save fits, the second (beside the first) does not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        config = write_config(tmp_path / "full.yaml", tmp_path / "run", corpus, save_top_k=0)
        config.write_text(config.read_text().replace(f"{tmp_path / 'run'}/checkpoints", str(mount)))
        code, err = finished(lit_longctx("fit", "--config", str(config), "--trainer.max_steps=6"))
        assert code == 2 and "Traceback" not in err, err[-3000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: could not save the checkpoint") and "disk is full" in line, line
        assert ckpt_step(mount / "last.ckpt") == 2 and all_finite(mount / "last.ckpt")
        assert not list(mount.glob(".*.tmp"))  # the failed temporary file was removed
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_and_the_resumed_run_is_bit_equal(tmp_path, corpus):
    marker = tmp_path / "step3-done"
    callbacks = ("    - class_path: tests.safety_helpers.PaceAfter\n"
                 f"      init_args: {{step: 3, marker: {marker}, seconds: 0.5}}\n")
    config = write_config(tmp_path / "pace.yaml", tmp_path / "run", corpus, callbacks)
    args = ["fit", "--config", str(config), "--trainer.max_steps=10", "--trainer.val_check_interval=5"]
    proc = lit_longctx(*args)
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    code, err = finished(proc)
    assert code == 130 and "Traceback" not in err, err[-3000:]
    stopped = int(err.split("training interrupted at step ")[1].split(";")[0])
    assert 3 <= stopped < 10
    resume = err.split("resume with: ")[1].splitlines()[0]
    path = Path(shlex.split(resume)[-1])
    assert path == tmp_path / "run" / "checkpoints" / "last.ckpt" and ckpt_step(path) == stopped
    assert shlex.split(resume)[:-2] == ["lit-longctx", *args]
    code, err = finished(lit_longctx(*shlex.split(resume)[1:]))
    assert code == 0, err[-3000:]
    resumed = read_checkpoint(path).state_dict
    straight_config = write_config(tmp_path / "straight.yaml", tmp_path / "straight", corpus)
    straight = run("fit", "--config", str(straight_config), *args[3:])
    for k, v in straight.model.model.state_dict().items():
        assert torch.equal(resumed[k], v), k


def test_ctrl_c_during_start_up_is_one_line_and_status_130(tmp_path, corpus):
    """Interrupted while it imports and parses (half a second in: torch alone takes longer to import), nothing has
    trained, so nothing is saved: one line, exit status 130, no traceback."""
    config = write_config(tmp_path / "tiny.yaml", tmp_path / "run", corpus)
    proc = lit_longctx("fit", "--config", str(config), "--trainer.max_steps=2")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    code, err = finished(proc)
    assert code == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "lit-longctx: interrupted"
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------- one-line errors
@pytest.mark.slow
def test_negative_max_steps(trained):
    line = untouched_error(trained, "fit", "--config", str(trained / "tiny.yaml"), "--trainer.max_steps=-5")
    assert "trainer.max_steps" in line and "-5" in line


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_a_gpu(trained):
    line = untouched_error(trained, "fit", "--config", str(trained / "tiny.yaml"), "--trainer.accelerator=gpu")
    assert "invalid trainer settings" in line and "gpu" in line.lower()


def test_ckpt_path_may_be_a_run_directory(trained):
    cli = run("validate", "--config", str(trained / "tiny.yaml"), "--ckpt_path", str(trained / "run"))
    assert cli.model.ckpt_path_hint == str(trained / "run" / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_truncated_ckpt_given_directly(trained, tmp_path):
    data = (trained / "run" / "checkpoints" / "last.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    line = untouched_error(trained, "validate", "--config", str(trained / "tiny.yaml"), "--ckpt_path",
                           str(tmp_path / "truncated.ckpt"))
    assert "truncated.ckpt" in line and "not a readable checkpoint" in line


def test_ckpt_path_to_a_file_that_is_no_checkpoint(trained, tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.ckpt")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint written by `lit-longctx fit`"):
        run("validate", "--config", str(trained / "tiny.yaml"), "--ckpt_path", str(tmp_path / "foreign.ckpt"))
    with pytest.raises(CheckpointError, match="notes.ckpt' is not a readable checkpoint"):
        run("validate", "--config", str(trained / "tiny.yaml"), "--ckpt_path", str(tmp_path / "notes.ckpt"))


@pytest.mark.slow
def test_truncated_last_ckpt_found_by_last(trained, tmp_path, corpus):
    config = write_config(tmp_path / "tiny.yaml", tmp_path / "run", corpus)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    data = (trained / "run" / "checkpoints" / "last.ckpt").read_bytes()
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(data[:1000])
    before = snapshot(tmp_path / "run")
    line = one_line_error("fit", "--config", str(config), "--ckpt_path", "last")
    assert "last.ckpt" in line and "not a readable checkpoint" in line
    assert snapshot(tmp_path / "run") == before


@pytest.mark.slow
def test_converted_weights_file_given_to_ckpt_path(trained, tmp_path):
    model = read_checkpoint(trained / "run")
    from lit_longctx.nn import Transformer

    with torch.device("meta"):
        net = Transformer(model.model_config)
    net.load_state_dict(model.state_dict, assign=True)
    save_checkpoint(tmp_path / "weights.ckpt", net)
    line = untouched_error(trained, "fit", "--config", str(trained / "tiny.yaml"), "--ckpt_path",
                           str(tmp_path / "weights.ckpt"))
    assert "weights file" in line and f"--model.init_args.init_from {tmp_path / 'weights.ckpt'}" in line


@pytest.mark.slow
def test_run_directory_that_is_not_writable(trained, tmp_path):
    (tmp_path / "a-file").write_text("")
    line = untouched_error(trained, "fit", "--config", str(trained / "tiny.yaml"), "--trainer.default_root_dir",
                           str(tmp_path / "a-file" / "run"))
    assert "not writable" in line and "a-file" in line


@pytest.mark.slow
def test_convert_to_hf_into_a_directory_that_is_not_writable(trained, tmp_path):
    (tmp_path / "a-file").write_text("")
    line = untouched_error(trained, "convert", "to-hf", "--checkpoint", str(trained / "run"), "--output",
                           str(tmp_path / "a-file" / "hf"))
    assert "not writable" in line and "--output" in line


def test_last_context_length_beyond_the_window_is_refused_at_fit(config):
    from lit_longctx.nn.config import ConfigError

    with pytest.raises(ConfigError, match="last_context_length=128 is larger than .* max_seq_len = 64"):
        run("fit", "--config", str(config), "--model.class_path=lit_longctx.modules.FoT",
            "--model.init_args.mem_layers=[1]", "--model.init_args.last_context_length=128")


@pytest.mark.slow
def test_generate_leaves_no_temporary_files(trained, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)}
    proc = subprocess.run([sys.executable, "-m", "lit_longctx.cli", "generate", "--checkpoint", str(trained / "run"),
                           "--prompt", "The ", "--max_new_tokens", "3"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("The "), proc.stderr[-3000:]
    assert list(tmp.iterdir()) == []
