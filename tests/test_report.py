"""cktf_jax.report on fake run directories (no training): tables, CSV, plot, errors."""

import csv
import io
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from configs import cifar100_distill  # noqa: E402
from cktf_jax import report  # noqa: E402

PAIR = "resnet32x4 / resnet8x4"
PAIR2 = "wrn_40_2 / wrn_16_2"


def _config(**fields):
  """cifar100_distill's config as a run's config.json dict, ``fields`` ('a.b': v) changed."""
  config = cifar100_distill.get_config()
  for key, value in fields.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _write_run(run_dir, config, log=(), summary=None):
  """A run directory: config.json, ``log`` as (epoch, test top-1) lines, summary.json."""
  run_dir.mkdir(parents=True)
  (run_dir / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
  with open(run_dir / "log.jsonl", "w") as f:
    for epoch, top1 in log:
      f.write(json.dumps({"epoch": epoch, "lr": 0.05, "train_loss": 1.0, "train_top1": top1,
                          "test_loss": 1.0, "test_top1": top1, "test_top5": top1}) + "\n")
  if summary is not None:
    best, last = summary
    (run_dir / "summary.json").write_text(json.dumps(
        {"model": "m", "best_top1": best, "best_epoch": 2, "last_top1": last,
         "best_model": str(run_dir / "best_model"), "last_model": str(run_dir / "last_model")}))
  return run_dir


def _finished(run_dir, config, best, last):
  return _write_run(run_dir, config, [(1, best - 5), (2, best), (3, last)], (best, last))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("report")
  runs = root / "runs"
  c100 = runs / "cifar100"
  _finished(c100 / "vanilla/resnet32x4/trial0",
            _config(mode="train_teacher", **{"teacher.model": "resnet32x4"}), 79.42, 79.10)
  _finished(c100 / "vanilla/resnet8x4/trial0",
            _config(mode="train_teacher", **{"teacher.model": "resnet8x4"}), 72.50, 72.30)
  # A train_teacher run of a model in no pair.
  _finished(c100 / "vanilla/vgg8/trial0",
            _config(mode="train_teacher", **{"teacher.model": "vgg8"}), 70.00, 69.50)
  pair = c100 / "resnet32x4_resnet8x4"
  _finished(pair / "kd/trial0", _config(seed=0), 73.00, 72.80)
  _finished(pair / "kd/trial1", _config(seed=1), 74.00, 73.60)
  _write_run(pair / "crdst/trial0", _config(**{"method.name": "crdst"}), [(1, 41.0), (2, 40.0)])
  _finished(pair / "attention+crdst/trial0",
            _config(**{"method.name": "attention", "method2.name": "crdst"}), 74.80, 74.50)
  _finished(pair / "crd_alpha1/trial0", _config(**{"method.name": "crd", "weights.alpha": 1.0}),
            75.46, 75.20)
  # The second pair: only KD, its teacher known from the checkpoint's meta.json.
  teacher_dir = root / "teachers/wrn_40_2/best_model"
  teacher_dir.mkdir(parents=True)
  (teacher_dir / "meta.json").write_text(json.dumps(
      {"model": "wrn_40_2", "num_classes": 100, "test_top1": 75.61, "test_top5": 93.0,
       "epoch": 240}))
  _finished(c100 / "wrn_40_2_wrn_16_2/kd/trial0",
            _config(**{"teacher.model": "wrn_40_2", "student.model": "wrn_16_2",
                       "teacher.checkpoint": str(teacher_dir)}), 74.92, 74.70)
  # Transfer runs: one finished (transfer.json), one still fine-tuning.
  transfer = dict(mode="transfer", **{"dataset.name": "stl10", "dataset.num_classes": 10,
                                      "teacher.num_classes": 200, "teacher.model": "vgg19",
                                      "student.model": "vgg8"})
  done = runs / "stl10/vgg19_vgg8/crdst/trial0"
  _write_run(done, _config(**transfer, **{"method.name": "crdst"}))
  _finished(done / "distill", _config(**{**transfer, "mode": "distill"}), 10.0, 9.0)
  _finished(done / "fine_tune", _config(**{**transfer, "mode": "fine_tune"}), 60.50, 60.10)
  (done / "transfer.json").write_text(json.dumps(
      {"method": "crdst", "teacher": "vgg19", "student": "vgg8", "test_top1": 60.50,
       "last_top1": 60.10}))
  partial = runs / "stl10/vgg19_vgg8/kd/trial0"
  _write_run(partial, _config(**transfer, **{"method.name": "kd"}))
  _finished(partial / "distill", _config(**{**transfer, "mode": "distill"}), 10.0, 9.0)
  _write_run(partial / "fine_tune", _config(**{**transfer, "mode": "fine_tune"}),
             [(1, 50.0), (2, 55.0), (3, 54.0)])
  # Unreadable run directories.
  (c100 / "broken").mkdir()
  (c100 / "broken/config.json").write_text("{not json")
  _write_run(c100 / "eval", _config(mode="evaluate"))
  return runs


def _main(capsys, *args):
  code = report.main([str(a) for a in args])
  out, err = capsys.readouterr()
  return code, out, err


def _tables(markdown):
  """{title: {row: {column header: cell}}} of every markdown table printed."""
  tables, title, lines = {}, None, markdown.splitlines()
  for i, line in enumerate(lines):
    if line.startswith("## "):
      title = line[3:]
    if line.startswith("| ") and lines[i + 1].startswith("|:"):
      header = [c.strip() for c in line.strip("|").split(" | ")]
      table = {}
      for row_line in lines[i + 2:]:
        if not row_line.startswith("| "):
          break
        cells = [c.strip() for c in row_line.strip("|").split(" | ")]
        table[cells[0]] = dict(zip(header[1:], cells[1:]))
      tables[title] = table
  return tables


def test_markdown_tables_cell_by_cell(runs, capsys):
  code, out, err = _main(capsys, runs)
  assert code == 0, err
  tables = _tables(out)
  assert set(tables) == {"cifar100", "stl10: transfer"}
  c100 = tables["cifar100"]
  assert list(c100) == ["Compression Ratio", "Teacher", "Student (w/o KD)", "KD", "CKTF", "CRD+KD",
                        "AT + CKTF"]
  assert c100["Compression Ratio"] == {PAIR: "6.03", PAIR2: "3.21"}
  assert c100["Teacher"] == {PAIR: "79.42 (last 79.10)", PAIR2: "75.61 (teacher checkpoint)"}
  assert c100["Student (w/o KD)"] == {PAIR: "72.50 (last 72.30)", PAIR2: "—"}
  assert c100["KD"] == {PAIR: "73.50 ± 0.71 (last 73.20 ± 0.57, n=2)",
                        PAIR2: "74.92 (last 74.70)"}
  assert c100["CKTF"] == {PAIR: "41.00 (last 40.00, running 2/240)", PAIR2: "—"}
  assert c100["CRD+KD"] == {PAIR: "75.46 (last 75.20)", PAIR2: "—"}
  assert c100["AT + CKTF"] == {PAIR: "74.80 (last 74.50)", PAIR2: "—"}
  stl10 = tables["stl10: transfer"]
  assert list(stl10) == ["Compression Ratio", "KD", "CKTF"]
  assert stl10["CKTF"] == {"vgg19 / vgg8": "60.50 (last 60.10)"}
  assert stl10["KD"] == {"vgg19 / vgg8": "55.00 (last 54.00, partial: fine_tune 3/240)"}


def test_markdown_lists_other_and_skipped_runs(runs, capsys):
  _, out, _ = _main(capsys, runs)
  other = out[out.index("## Other runs"):out.index("## Skipped")]
  assert "vanilla/vgg8/trial0: train_teacher vgg8 on cifar100: 70.00 (last 69.50)" in other
  skipped = out[out.index("## Skipped"):]
  assert "broken: config.json unreadable: Expecting property name" in skipped
  assert "eval: mode 'evaluate' is not a training run" in skipped
  # A transfer's steps belong to it: never reported on their own.
  assert "fine_tune" not in other and "distill:" not in other


def test_csv_has_the_same_cells(runs, capsys):
  code, out, _ = _main(capsys, runs, "--format", "csv")
  assert code == 0
  rows = list(csv.DictReader(io.StringIO(out)))
  assert tuple(rows[0]) == report.CSV_HEADER
  cell = lambda row, teacher: next(r for r in rows if r["row"] == row and r["teacher"] == teacher)
  kd = cell("KD", "resnet32x4")
  assert (kd["table"], kd["dataset"], kd["student"], kd["n"], kd["status"]) == (
      "distill", "cifar100", "resnet8x4", "2", "done")
  assert float(kd["best_top1"]) == pytest.approx(73.5)
  assert float(kd["best_std"]) == pytest.approx(0.7071, abs=1e-4)
  assert float(kd["last_top1"]) == pytest.approx(73.2)
  assert kd["runs"].count(";") == 1
  assert float(kd["compression_ratio"]) == pytest.approx(6.03, abs=0.005)
  assert cell("CKTF", "resnet32x4")["status"] == "running 2/240"
  missing = cell("CKTF", "wrn_40_2")
  assert (missing["status"], missing["n"], missing["best_top1"]) == ("missing", "0", "")
  assert cell("Teacher", "wrn_40_2")["status"] == "teacher checkpoint"
  transfer = cell("KD", "vgg19")
  assert (transfer["table"], transfer["status"]) == ("transfer", "partial: fine_tune 3/240")
  assert [r["status"][:24] for r in rows if r["table"] == "skipped"] == [
      "config.json unreadable: ", "mode 'evaluate' is not a"]
  assert [r["row"] for r in rows if r["table"] == "other"] == ["train_teacher"]


def test_plot_writes_a_png(runs, tmp_path, capsys):
  out = tmp_path / "report.png"
  code, _, err = _main(capsys, runs, "--plot", out)
  assert code == 0, err
  data = out.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_runs_differing_beyond_seed_get_a_row_each(tmp_path, capsys):
  pair = tmp_path / "resnet32x4_resnet8x4"
  _finished(pair / "long", _config(), 73.0, 72.0)
  _finished(pair / "short", _config(**{"train.epochs": 120}), 70.0, 69.0)
  _, out, _ = _main(capsys, tmp_path)
  table = _tables(out)["cifar100"]
  assert table["KD [train.epochs=120]"] == {PAIR: "70.00 (last 69.00)"}
  assert table["KD [train.epochs=240]"] == {PAIR: "73.00 (last 72.00)"}
  assert table["Teacher"] == {PAIR: "—"}


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nowhere", "is not a directory"),
    (lambda p: p, "no run directory"),
])
def test_bad_paths_fail_with_a_message(tmp_path, capsys, make, message):
  code, out, err = _main(capsys, make(tmp_path))
  assert code == 2 and out == ""
  assert err.startswith("error: ") and message in err
