"""The training script end to end: every method runs, and a study resumes bit for bit.

One uninterrupted study (every method, one seed) is compared with the same study stopped in the
middle of an MKF run (model, optimiser, scheduler, bank, CompoundMix and DepthSampler all in
play) and resumed in a fresh Python process. Then broken checkpoints must be refused before
anything is written.
"""

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from _subprocess import script_environment
import torch

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
SCRIPT_ENVIRONMENT = script_environment()
import train  # noqa: E402

# The MKF run with the exact QP is last, so the final checkpoint holds its complete state.
METHODS = ["baseline", "kdatff", "dml", "one", "kdatff-noat", "kdatff-nofusion", "multibranch",
           "kdatff-mix", "mix-only", "st", "mkf-nomix", "mkf-nofraction", "mkf-opt2", "mkf-qp"]
# 192 images, batch 32: 6 steps per epoch, 12 per run; mixing starts after 1 warm-up step.
TINY = ["--device", "cpu", "--train-subset", "192", "--batch-size", "32", "--epochs", "2", "--seeds", "0",
        "--blocks", "2", "2", "2", "--widths", "8", "16", "16", "--no-progress",
        "--methods", *METHODS]
STEPS_PER_RUN = 12
STOP = (len(METHODS) - 1) * STEPS_PER_RUN + 9  # inside the second epoch of the last run (mkf-qp)


def run_script(*arguments, cwd):
    """``benchmarks/train.py`` in a fresh Python process (single-threaded: bitwise repeatable)."""
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / "train.py"), *TINY, *arguments],
        cwd=cwd, env=SCRIPT_ENVIRONMENT, capture_output=True, text=True, timeout=300,
    )


def equal(a, b):
    """Exact equality of nested state dicts (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """The uninterrupted study and the stopped-then-resumed one (checkpoints and outputs)."""
    root = tmp_path_factory.mktemp("studies")
    whole = run_script("--checkpoint", "whole.pt", "--out", "whole", cwd=root)
    assert whole.returncode == 0, whole.stderr
    stopped = run_script("--checkpoint", "resumed.pt", "--out", "resumed", "--stop-after",
                         str(STOP), cwd=root)
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped after {STOP} steps" in stopped.stdout
    assert not (root / "resumed").exists()  # no results before the study is complete
    (root / "interrupted.pt").write_bytes((root / "resumed.pt").read_bytes())  # as it was mid-study
    resumed = run_script("--checkpoint", "resumed.pt", "--out", "resumed", "--resume", cwd=root)
    assert resumed.returncode == 0, resumed.stderr
    return root, whole, resumed


def load(path):
    args = train.parse_args(TINY + ["--device", "cpu"])
    return train.load_checkpoint(str(path), args)


def test_smoke_every_method_trains_and_reports(studies):
    root, whole, _ = studies
    for method in METHODS:
        assert any(line.startswith(method) for line in whole.stdout.splitlines()), method
    assert "top-1 (%)" in whole.stdout and "x baseline" in whole.stdout
    report = json.loads((root / "whole" / "train_digits.json").read_text())
    assert [row["method"] for row in report["summary"]] == METHODS
    for run in report["runs"]:
        assert len(run["history"]) == 2 and 0 <= run["top1"] <= 100
        assert run["seconds_per_epoch"] > 0
    kdatff = next(run for run in report["runs"] if run["method"] == "kdatff")
    assert "ensemble_top1" in kdatff["history"][-1]
    assert (root / "whole" / "train_digits.png").read_bytes().startswith(b"\x89PNG")


def test_resume_in_a_fresh_process_is_bitwise_identical(studies):
    root, *_ = studies
    whole, resumed = load(root / "whole.pt"), load(root / "resumed.pt")
    final = whole["current"]
    assert final["method"] == "mkf-qp" and final["epoch"] == 2
    for name in ("model", "bank", "optimizer", "scheduler", "mix", "sampler"):
        assert equal(final[name], resumed["current"][name]), name
    assert equal(final["data_generator"], resumed["current"]["data_generator"])
    # every run's accuracy and loss curve, before and after the interruption
    histories = {key: run["history"] for key, run in whole["results"].items()}
    assert histories == {key: run["history"] for key, run in resumed["results"].items()}

    # The interruption really was in the middle of the MKF run, with mixing and banking going on.
    middle = load(root / "interrupted.pt")["current"]
    assert middle["method"] == "mkf-qp" and (middle["epoch"], middle["batch_in_epoch"]) == (1, 3)
    assert middle["mix"]["step"] == 9 and bool(middle["bank"]["seen"].any())
    assert not equal(middle["model"], final["model"])
    assert not equal(middle["bank"]["knowledge"], final["bank"]["knowledge"])


def rewrite_checkpoint(path, change):
    """Apply ``change`` to a checkpoint's content and save it with a valid digest."""
    raw = path.read_bytes()
    payload = raw[len(train.CHECKPOINT_MAGIC) + 65 :]
    study = torch.load(io.BytesIO(payload), weights_only=True)
    change(study)
    train.save_checkpoint(str(path), study)


@pytest.mark.parametrize(
    "damage, extra, message",
    [
        ("flip", [], "corrupted \\(SHA-256 mismatch\\)"),
        ("truncate", [], "corrupted \\(SHA-256 mismatch\\)"),
        ("garbage", [], "not a checkpoint of benchmarks/train.py"),
        (None, ["--beta", "1.0"], "saved with other settings: --beta 0.5 \\(saved\\) vs 1.0"),
        ("bank", [], "the saved run does not fit this configuration"),
        ("model", [], "the saved run does not fit this configuration"),
    ],
)
def test_a_bad_checkpoint_is_refused_before_anything_is_written(
    studies, tmp_path, damage, extra, message, capsys
):
    root, *_ = studies
    path = tmp_path / "study.pt"
    path.write_bytes((root / "interrupted.pt").read_bytes())
    if damage == "flip":
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "garbage":
        path.write_bytes(b"PK\x03\x04 something else")
    elif damage == "bank":
        rewrite_checkpoint(path, lambda s: s["current"]["bank"].update(
            knowledge=s["current"]["bank"]["knowledge"][:, :10]))
    elif damage == "model":
        rewrite_checkpoint(path, lambda s: s["current"]["model"].pop("fc.weight"))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp_path / "out"
    with pytest.raises(train.CheckpointError, match=message):
        train.main(TINY + extra + ["--checkpoint", str(path), "--resume", "--out", str(out),
                                   "--device", "cpu"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert not out.exists()
    assert not Path(f"{path}.tmp").exists()


def test_script_exit_code_and_message_for_bad_inputs(tmp_path):
    with pytest.raises(train.CheckpointError, match="none.pt: cannot read the checkpoint"):
        train.main(TINY + ["--checkpoint", str(tmp_path / "none.pt"), "--resume"])
    no_data = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train.py"), "--dataset", "fashion-mnist",
         "--data-dir", str(tmp_path / "nowhere")],
        env=SCRIPT_ENVIRONMENT, capture_output=True, text=True, timeout=120,
    )
    assert no_data.returncode == 2 and "Traceback" not in no_data.stderr
    assert no_data.stderr.startswith("error: ")
    assert "expected train-images-idx3-ubyte or train-images-idx3-ubyte.gz" in no_data.stderr


def test_existing_checkpoint_is_not_overwritten_without_resume(studies, tmp_path):
    root, *_ = studies
    path = tmp_path / "study.pt"
    path.write_bytes((root / "whole.pt").read_bytes())
    with pytest.raises(train.CheckpointError, match="exists: pass --resume to continue it"):
        train.main(TINY + ["--checkpoint", str(path), "--out", str(tmp_path / "out")])


def test_diagnostics_are_logged_per_epoch(studies):
    root, *_ = studies
    report = json.loads((root / "whole" / "train_digits.json").read_text())
    runs = {run["method"]: run for run in report["runs"]}
    for method in METHODS:
        assert 0 <= runs[method]["history"][-1]["train_top1"] <= 100
    for method in ("mkf-opt2", "mkf-qp", "mkf-nofraction"):
        last = runs[method]["history"][-1]
        assert last["ce"] > 0 and last["kd"] >= 0 and last["knowledge_age"] >= 0
        assert 0 <= last["fraction_l1"] <= 1  # half the L1 distance of two probability rows
    assert runs["st"]["history"][-1]["kd"] > 0  # the sub-network learns from the full one
    assert "fraction_l1" not in runs["mkf-nomix"]["history"][-1]  # nothing mixed, no fraction


MULTI_NETWORK = ["kdatff", "dml", "one", "kdatff-noat", "kdatff-nofusion", "multibranch",
                 "kdatff-mix"]


def test_multi_network_methods_report_branches_ensemble_and_their_terms(studies):
    root, *_ = studies
    report = json.loads((root / "whole" / "train_digits.json").read_text())
    runs = {run["method"]: run for run in report["runs"]}
    for method in MULTI_NETWORK:
        last = runs[method]["history"][-1]
        branches = [last["branch0_top1"], last["branch1_top1"]]
        assert last["top1"] == last["branch0_top1"]  # the deployed network is branch 0
        assert last["ensemble_minus_best_branch"] == pytest.approx(last["ensemble_top1"] - max(branches))
        assert last["ce"] > 0 and 0 <= last["disagreement_top1"] <= 1 and last["disagreement_kl"] >= 0
        assert ("kd" in last) == (method != "multibranch"), method
        assert ("teacher_ce" in last) == (method not in ("multibranch", "dml")), method
        assert ("attention" in last) == (method in ("kdatff", "kdatff-nofusion", "kdatff-mix")), method
    # What is deployed: branch 0 alone costs what the baseline costs; the ensemble more.
    baseline = runs["baseline"]["deployment"]
    assert baseline["single"] == baseline["ensemble"] and baseline["single"]["flops"] > 0
    for method in MULTI_NETWORK:
        cost = runs[method]["deployment"]
        assert cost["single"] == baseline["single"], method
        assert cost["ensemble"]["parameters"] > cost["single"]["parameters"], method
        assert cost["ensemble"]["flops"] > cost["single"]["flops"], method
    # DML's networks share nothing: twice the baseline exactly.
    assert runs["dml"]["deployment"]["ensemble"] == {
        key: 2 * value for key, value in baseline["single"].items()}


@pytest.mark.parametrize("options", [
    ["--groups", "3", "--mkf-loop", "joint", "--full-teacher", "none", "--beta-ramp", "1"],
    ["--groups", "2", "--knowledge-from", "full", "--max-age", "3", "--temperature", "2"],
])
def test_validation_split_never_touches_the_test_set(tmp_path, monkeypatch, options):
    """With ``--evaluate validation`` the runs train on the subset less its last images and are
    evaluated on those; the test images are never fed to the model."""
    data = train.load_dataset("digits")
    poisoned = data._replace(test_images=torch.full_like(data.test_images, float("nan")))
    monkeypatch.setattr(train, "load_dataset", lambda name, data_dir=None: poisoned)
    args = ["--train-subset", "160", "--validation-size", "64", "--evaluate", "validation",
            "--methods", "mkf-qp", "--out", str(tmp_path), *options]
    assert train.main(TINY[:-len(METHODS) - 1] + args) == 0
    report = json.loads((tmp_path / "train_digits.json").read_text())
    history = report["runs"][0]["history"]
    # 96 training images at batch 32: 3 steps per epoch
    assert report["config"]["validation_size"] == 64 and len(history) == 2
    assert all(0 <= entry["top1"] <= 100 for entry in history)  # NaN images would give 10-ish
    split = train.split(data, train.parse_args(["--train-subset", "160", "--validation-size", "64",
                                                "--evaluate", "validation"]))
    assert torch.equal(split.train_images, data.train_images[:96])
    assert torch.equal(split.test_labels, data.train_labels[96:160])


@pytest.mark.parametrize("arguments, message", [
    (["--epochs", "0"], "--epochs must be >= 1, but got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, but got 0"),
    (["--train-subset", "0"], "--train-subset must be >= 1, but got 0"),
    (["--train-offset", "-1"], "--train-offset must be >= 0, but got -1"),
    (["--validation-size", "-5"], "--validation-size must be >= 0, but got -5"),
    (["--blocks", "2", "0", "2"], "--blocks must be >= 1, but got 0"),
    (["--widths", "8", "-1", "8"], "--widths must be >= 1, but got -1"),
    (["--blocks", "2", "2"], "--blocks and --widths need one value per stage each, but got 2 and 3"),
    (["--threads", "0"], "--threads must be >= 1, but got 0"),
    (["--eval-every", "0"], "--eval-every must be >= 1, but got 0"),
    (["--max-age", "-1"], "--max-age must be >= 0, but got -1"),
    (["--groups", "0"], "--groups must be >= 1, but got 0"),
    (["--lr", "0"], "--lr must be > 0, but got 0.0"),
    (["--lr", "nan"], "--lr must be > 0, but got nan"),
    (["--temperature", "0"], "--temperature must be > 0, but got 0.0"),
    (["--collective-timeout", "0"], "--collective-timeout must be > 0, but got 0.0"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0, but got -1.0"),
    (["--beta", "-1"], "--beta must be >= 0, but got -1.0"),
    (["--beta-ramp", "-1"], "--beta-ramp must be >= 0, but got -1.0"),
    (["--bank-momentum", "0"], "--bank-momentum must lie in (0, 1], but got 0.0"),
    (["--warmup", "1.5"], "--warmup must lie in [0, 1] (a fraction of the steps), but got 1.5"),
    (["--attention-warmup", "-0.1"],
     "--attention-warmup must lie in [0, 1] (a fraction of the steps), but got -0.1"),
    (["--online-temperature", "0"], "--online-temperature must be > 0, but got 0.0"),
    (["--theta", "-1"], "--theta must be >= 0, but got -1.0"),
    (["--attention-weight", "-2"], "--attention-weight must be >= 0, but got -2.0"),
    (["--methods", "kdatff", "dml", "--branches", "1"],
     "--branches must be >= 2 for kdatff, dml, but got 1"),
    (["--methods", "kdatff-mix", "one", "--blocks", "2", "2", "1"],
     "kdatff-mix transfer attention between consecutive blocks of a branch, but with --blocks "
     "2 2 1 and --shared-stages 2 each branch has 1 block: give the unshared stages 2 blocks"),
    (["--shared-stages", "3"],
     "--shared-stages must lie in [0, 2] (fewer than the 3 stages of --blocks), but got 3"),
    (["--methods", "st", "baseline", "st"], "--methods names st more than once"),
    (["--seeds", "1", "1"], "--seeds names 1 more than once"),
    (["--data-dir", "/nonexistent"], "--data-dir has no effect with --dataset digits"),
    (["--evaluate", "validation"], "--evaluate validation needs --validation-size N > 0"),
    (["--resume"], "--resume needs --checkpoint PATH"),
    (["--stop-after", "5"], "--stop-after needs --checkpoint PATH"),
    (["--checkpoint-every", "5"], "--checkpoint-every needs --checkpoint PATH"),
    (["--checkpoint", "nowhere/study.pt"], "--checkpoint nowhere/study.pt: the folder "),
    (["--groups", "4"], "--groups 4 does not fit --blocks 2 2 2: `num_groups` must be at most "
                        "1 + floor(max_drop_fraction * len(blocks)) = 3"),
    (["--mkf-loop", "joint", "--groups", "1"], "--mkf-loop joint trains a sub-network besides "
                                               "the full one: it needs --groups >= 2"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, but got 'gpu'"),
    (["--device", "cpu:1"], "--device must be auto, cpu, cuda or cuda:N, but got 'cpu:1'"),
    (["--device", "cuda:99"], "--device cuda:99: "),  # no CUDA here, or fewer than 100 GPUs
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["--methods", "mkf"], "argument --methods: invalid choice: 'mkf'"),
])
def test_argument_errors_exit_with_one_line(capsys, tmp_path, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(arguments)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    assert message in error


def test_cuda_on_a_machine_without_it_is_refused(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit):
        train.parse_args(["--device", "cuda"])
    assert capsys.readouterr().err.startswith("error: --device cuda: ")


def test_out_must_be_a_folder(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path / "file")])
    assert "is a file; expected a folder" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--train-subset", "5000"], "--train-offset 0 with --train-subset 5000 needs 5000 "
                                 "training images, but digits has 1438"),
    (["--train-offset", "1438"], "--train-offset 1438 skips every training image: digits has 1438"),
    (["--train-subset", "64", "--validation-size", "64"], "--validation-size 64 leaves no "
                                                          "training images of the 64 selected"),
])
def test_data_dependent_errors_are_one_line_from_the_script(tmp_path, arguments, message):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "train.py"), *arguments,
                           "--out", str(tmp_path)], env=SCRIPT_ENVIRONMENT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == f"error: {message}\n"
    assert not any(tmp_path.iterdir())


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    options = [action for action in train.build_parser()._actions if action.dest != "help"]
    assert text.count("(default: ") == len(options)
    # those of issue 17 (textwrap may break the list of methods after a hyphen)
    for default in ("--methods METHOD [METHOD ...]", "(default: ['baseline', 'mkf-",
                    "(default: [0, 1, 2])", "(default: 20)", "(default: 64)", "(default: 0.05)"):
        assert default in text, default


def test_the_plot_zooms_on_the_last_epochs_and_says_what_the_bands_are():
    import matplotlib.pyplot as plt

    methods = ["baseline", "mkf-qp", "st"]
    results = {}
    for position, method in enumerate(methods):
        for seed in range(3):
            # evaluated every other epoch (--eval-every 2) and after the last, 11 epochs
            history = [{"epoch": epoch, "train_loss": 1.0} for epoch in range(1, 12)]
            for entry in history:
                if entry["epoch"] % 2 == 0 or entry["epoch"] == 11:
                    entry["top1"] = 60 + 3 * entry["epoch"] + 0.5 * position + 0.1 * seed
            results[f"{method}/seed{seed}"] = {"method": method, "seed": seed, "history": history}
    figure = train.accuracy_figure(results, methods, "digits: top-1 on the test images")
    try:
        whole, zoom = figure.axes
        lines = zoom.get_lines()
        assert [line.get_label() for line in lines] == methods
        assert len({(line.get_linestyle(), line.get_marker()) for line in lines}) == len(methods)
        assert list(whole.get_lines()[0].get_xdata()) == [2, 4, 6, 8, 10, 11]  # evaluated only
        assert list(lines[0].get_xdata()) == [8, 10, 11]  # the last third
        # The zoomed range fits the curves and bands there (84 .. 94.2), not the whole run's.
        low, high = zoom.get_ylim()
        assert low < 84 < 94.2 < high and high - low < 1.3 * (94.2 - 84)
        legend = zoom.get_legend().get_title().get_text()
        assert "mean over 3 seeds" in legend and "± 1 sample standard deviation" in legend
    finally:
        plt.close(figure)


def test_a_torchrun_launch_writes_beside_the_single_process_results(monkeypatch):
    """README's two commands, one process and torchrun, must not write over each other's JSON
    and PNG: without --out, a launch of P processes writes to benchmarks/out/torchrun-P."""
    single = Path(train.parse_args([]).out)
    assert single == BENCHMARKS / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert Path(train.parse_args([]).out) == BENCHMARKS / "out" / "torchrun-2"
    assert train.parse_args(["--out", "mine"]).out == "mine"
