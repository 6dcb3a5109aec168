"""Tables of finished and running experiments, laid out like the seed README's.

    python -m cktf_jax.report RUN_DIRS... [--format markdown|csv] [--plot out.png]

RUN_DIRS are run directories (a ``config.json`` written by ``launch.py``) or
folders holding them at any depth. It prints one table per dataset: a column
per teacher -> student pair with its compression ratio (teacher / student
parameters), the rows Teacher and Student (w/o KD) (``train_teacher`` runs of
those architectures, or the teacher checkpoint's ``meta.json``), then a row
per method: KD, FitNet, ..., CRD, CKTF, "X+KD" (``weights.alpha`` > 0 on a
method that is not KD, the seed's CRD+KD and CKTF+KD) and "X + Y"
(``method2``, the seed's "X + CKTF"). ``mode='transfer'`` runs get their own
table (the seed's Figure 2): the fine-tuned classifier's test top-1.

A cell is the best-epoch test top-1 and, in brackets, the last epoch's; runs
that differ only in ``seed`` are trials of one cell: mean ± sample std, with
``n=``. A run without ``summary.json`` counts with its best epoch so far and
says ``running e/E``; "—" is a cell no run fills. Runs that differ in other
fields get one row each, named by those fields. Runs that fit no table are
listed under "Other runs", unreadable ones under "Skipped".
"""

import argparse
import collections
import csv
import dataclasses
import functools
import io
import json
import math
import os
import statistics
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from cktf_jax import methods, models
from cktf_jax.models import convert
from cktf_jax.train import loop, transfer

TEACHER_ROW = "Teacher"
STUDENT_ROW = "Student (w/o KD)"
MISSING = "—"
# The seed README's names of the reference's --distill values.
DISPLAY_NAMES = {
    "kd": "KD", "hint": "FitNet", "attention": "AT", "similarity": "SP", "correlation": "CC",
    "vid": "VID", "rkd": "RKD", "pkt": "PKT", "abound": "AB", "factor": "FT", "fsp": "FSP",
    "nst": "NST", "kdsvd": "KDSVD", "crd": "CRD", "crdst": "CKTF",
}
# The tables' method order (the seed README's), then any other registered method.
METHOD_ORDER = tuple(DISPLAY_NAMES) + tuple(n for n in methods.method_names()
                                            if n not in DISPLAY_NAMES)
# Fields that do not change what a run computes (or, for 'seed', make it a trial).
IGNORED_FIELDS = ("seed", "progress", "dataset.data_dir", "dataset.source", "train.tensorboard",
                  "train.checkpoint_every_epochs", "profile.", "eval.", "quickstart.",
                  "teacher.checkpoint", "fine_tune.checkpoint")
# ... and those a mode does not read.
IGNORED_BY_MODE = {"train_teacher": ("student.", "method.", "method2.", "weights.",
                                     "teacher.num_classes")}
NO_METHOD2_FIELDS = ("method2.", "weights.kd2weights")
CSV_HEADER = ("table", "dataset", "row", "teacher", "student", "compression_ratio",
              "best_top1", "best_std", "last_top1", "last_std", "n", "status", "runs")


class ReportError(Exception):
  """A user mistake (bad path, nothing to report); printed without a traceback."""


class RunError(Exception):
  """A run directory that cannot be read; the message says why."""


@dataclasses.dataclass
class Run:
  """One run directory: its config (flattened) and its test top-1 so far."""

  path: str
  config: Dict[str, Any]  # 'dataset.name' -> value
  best: Optional[float]
  last: Optional[float]
  curve: List[Tuple[int, float]]  # (epoch, test top-1)
  status: str  # '' when finished, else e.g. 'running 12/240'

  def get(self, key: str, default=None):
    return self.config.get(key, default)


@dataclasses.dataclass
class Cell:
  """The runs (trials) of one table cell, or the teacher checkpoints it comes from."""

  runs: List[Run] = dataclasses.field(default_factory=list)
  checkpoints: List[Tuple[str, Optional[float]]] = dataclasses.field(default_factory=list)

  @property
  def best(self) -> List[float]:
    if self.checkpoints:
      return [top1 for _, top1 in self.checkpoints if top1 is not None]
    return [r.best for r in self.runs if r.best is not None]

  @property
  def last(self) -> List[float]:
    return [r.last for r in self.runs if r.last is not None]

  @property
  def n(self) -> int:
    return len(self.checkpoints) or len(self.runs)

  @property
  def unfinished(self) -> List[str]:
    return [r.status for r in self.runs if r.status]

  @property
  def paths(self) -> List[str]:
    return [p for p, _ in self.checkpoints] or [r.path for r in self.runs]


@dataclasses.dataclass
class Column:
  teacher: str
  student: str
  ratio: Optional[float]


@dataclasses.dataclass
class Table:
  """One dataset's table: ``kind`` 'distill' (Tables 1-2) or 'transfer' (Figure 2)."""

  kind: str
  dataset: str
  columns: List[Column]
  rows: List[str]
  cells: Dict[Tuple[str, int], Cell]  # (row, column index) -> cell


@dataclasses.dataclass
class Report:
  tables: List[Table]
  other: List[Run]
  skipped: List[Tuple[str, str]]  # (path, reason)


# ----------------------------------------------------------------------------- reading runs


def discover(paths: Sequence[str]) -> List[str]:
  """Every run directory (holding a config.json) at or under ``paths``; a run's
  own sub-directories (models, checkpoints, a transfer's steps) are its own."""
  found = []
  for root in paths:
    if not os.path.isdir(root):
      raise ReportError(f"{root} is not a directory")
    for dirpath, dirnames, filenames in os.walk(root):
      if loop.CONFIG_FILE in filenames:
        found.append(os.path.normpath(dirpath))
        dirnames[:] = []
      else:
        dirnames.sort()
  return list(dict.fromkeys(found))


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _read_json(path: str, what: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise RunError(f"{what} unreadable: {e}") from None


def _read_config(run_dir: str) -> Dict[str, Any]:
  config = _read_json(os.path.join(run_dir, loop.CONFIG_FILE), loop.CONFIG_FILE)
  if not isinstance(config, dict):
    raise RunError(f"{loop.CONFIG_FILE} holds a {type(config).__name__}, not a config")
  flat = _flatten(config)
  mode = flat.get("mode")
  if mode not in ("train_teacher", "distill", "fine_tune", "transfer"):
    raise RunError(f"mode {mode!r} is not a training run")
  needed = ["dataset.name", "dataset.num_classes", "teacher.model", "train.epochs"]
  if mode != "train_teacher":
    needed += ["student.model", "method.name"]
  absent = [key for key in needed if key not in flat]
  if absent:
    raise RunError(f"{loop.CONFIG_FILE} lacks {', '.join(absent)}")
  for key in ("dataset.num_classes", "train.epochs"):
    if not isinstance(flat[key], int):
      raise RunError(f"{loop.CONFIG_FILE}: {key} is {flat[key]!r}, not an int")
  return flat


def _read_log(path: str) -> List[Tuple[int, float]]:
  """(epoch, test top-1) per logged epoch; the last record of an epoch wins (a
  resumed run logs again the epochs after its last checkpoint), and a line
  that does not parse (being written) is left out."""
  by_epoch = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
          by_epoch[int(record["epoch"])] = float(record["test_top1"])
        except (ValueError, KeyError, TypeError):
          continue
  return sorted(by_epoch.items())


def _stage(run_dir: str) -> Tuple[Optional[float], Optional[float], List[Tuple[int, float]], bool]:
  """(best, last, curve, finished) of one train_and_evaluate directory."""
  curve = _read_log(os.path.join(run_dir, loop.LOG_FILE))
  summary_path = os.path.join(run_dir, loop.SUMMARY_FILE)
  if os.path.exists(summary_path):
    summary = _read_json(summary_path, loop.SUMMARY_FILE)
    try:
      return float(summary["best_top1"]), float(summary["last_top1"]), curve, True
    except (KeyError, TypeError, ValueError):
      raise RunError(f"{loop.SUMMARY_FILE} lacks best_top1/last_top1") from None
  best = max(top1 for _, top1 in curve) if curve else None
  return best, (curve[-1][1] if curve else None), curve, False


def _epochs(run_dir: str, default: int) -> int:
  """``train.epochs`` of a (step) directory's config, else ``default``."""
  try:
    return _read_config(run_dir)["train.epochs"]
  except RunError:
    return default


def _read_transfer(run_dir: str, config: Dict[str, Any]) -> Run:
  """A transfer run: transfer.json when it finished, else its steps' progress."""
  fine_tune_dir = os.path.join(run_dir, transfer.FINE_TUNE)
  best, last, curve, finished = _stage(fine_tune_dir)
  result_path = os.path.join(run_dir, transfer.TRANSFER_FILE)
  if os.path.exists(result_path):
    result = _read_json(result_path, transfer.TRANSFER_FILE)
    try:
      return Run(run_dir, config, float(result["test_top1"]), float(result["last_top1"]), curve,
                 "")
    except (KeyError, TypeError, ValueError):
      raise RunError(f"{transfer.TRANSFER_FILE} lacks test_top1/last_top1") from None
  epochs = int(config["train.epochs"])
  if finished:
    status = f"partial: no {transfer.TRANSFER_FILE}"
  elif curve:
    status = f"partial: {transfer.FINE_TUNE} {curve[-1][0]}/{_epochs(fine_tune_dir, epochs)}"
  else:
    distill_dir = os.path.join(run_dir, transfer.DISTILL)
    distill_curve = _read_log(os.path.join(distill_dir, loop.LOG_FILE))
    done = distill_curve[-1][0] if distill_curve else 0
    status = f"partial: {transfer.DISTILL} {done}/{_epochs(distill_dir, epochs)}"
  return Run(run_dir, config, best, last, curve, status)


def read_run(run_dir: str) -> Run:
  """The run in ``run_dir``; ``RunError`` says why it cannot be read."""
  config = _read_config(run_dir)
  if config["mode"] == "transfer":
    return _read_transfer(run_dir, config)
  best, last, curve, finished = _stage(run_dir)
  status = "" if finished else f"running {curve[-1][0] if curve else 0}/{config['train.epochs']}"
  return Run(run_dir, config, best, last, curve, status)


# ----------------------------------------------------------------------------- building tables


@functools.lru_cache(maxsize=None)
def compression_ratio(teacher: str, student: str, num_classes: int,
                      image_size: int) -> Optional[float]:
  """Teacher / student parameters (the seed's ratio); None for a model that
  cannot be built at that size."""
  try:
    return (models.parameter_count(teacher, num_classes, image_size)
            / models.parameter_count(student, num_classes, image_size))
  except ValueError:
    return None


def _pair(run: Run) -> Tuple[str, str]:
  return run.get("teacher.model"), run.get("student.model")


def _column(run: Run) -> Column:
  num_classes = run.get("teacher.num_classes") or run.get("dataset.num_classes")
  image_size = run.get("dataset.image_size") or 32
  teacher, student = _pair(run)
  return Column(teacher, student,
                compression_ratio(teacher, student, int(num_classes), int(image_size)))


def _method_index(name: str) -> int:
  return METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER)


def method_row(run: Run) -> Tuple[str, Tuple[int, ...]]:
  """The row's name ("CKTF", "CRD+KD", "AT + CKTF") and its place in the table."""
  name, second = run.get("method.name"), run.get("method2.name") or ""
  with_kd = name != "kd" and bool(run.get("weights.alpha"))
  label = DISPLAY_NAMES.get(name, name) + ("+KD" if with_kd else "")
  if second:
    label += " + " + DISPLAY_NAMES.get(second, second)
  order = (1, bool(second), _method_index(second) if second else 0, with_kd, _method_index(name))
  return label, order


def _signature(run: Run) -> Dict[str, str]:
  """The fields that make two runs different experiments rather than trials."""
  ignored = IGNORED_FIELDS + IGNORED_BY_MODE.get(run.get("mode"), ())
  if not run.get("method2.name"):
    ignored += NO_METHOD2_FIELDS
  return {key: json.dumps(value, sort_keys=True) for key, value in run.config.items()
          if not any(key == f or (f.endswith(".") and key.startswith(f)) for f in ignored)}


def _differing_fields(signatures: List[Dict[str, str]]) -> List[str]:
  keys = sorted(set().union(*signatures))
  return [k for k in keys if len({s.get(k) for s in signatures}) > 1]


def _split_variants(entries):
  """``(row, order, column, run)`` entries -> same, with the row named by the
  fields that tell apart the experiments sharing one of its cells."""
  by_row = collections.defaultdict(list)
  for entry in entries:
    by_row[entry[0]].append(entry)
  result = []
  for row, row_entries in by_row.items():
    by_cell = collections.defaultdict(dict)
    for _, _, column, run in row_entries:
      signature = _signature(run)
      by_cell[column][json.dumps(signature, sort_keys=True)] = signature
    fields = set()
    for signatures in by_cell.values():
      if len(signatures) > 1:
        fields.update(_differing_fields(list(signatures.values())))
    for _, order, column, run in row_entries:
      if fields:
        signature = _signature(run)
        values = ", ".join(f"{k}={signature.get(k, 'unset')}" for k in sorted(fields))
        result.append((f"{row} [{values}]", order, column, run))
      else:
        result.append((row, order, column, run))
  return result


def _find_model_dir(path: str, run: Run) -> Optional[str]:
  """``path`` (a run's teacher.checkpoint) as given, or relative to one of the
  run's parent folders (launch.py was run from one of them)."""
  candidates = [path]
  if not os.path.isabs(path):
    parent = os.path.abspath(run.path)
    while os.path.dirname(parent) != parent:
      parent = os.path.dirname(parent)
      candidates.append(os.path.join(parent, path))
  for candidate in candidates:
    if os.path.exists(os.path.join(candidate, convert.META_FILE)):
      return os.path.normpath(candidate)
  return None


def _teacher_checkpoints(runs: Iterable[Run]) -> List[Tuple[str, Optional[float]]]:
  """(meta.json path, its test top-1) of the distinct teacher checkpoints found."""
  found = {}
  for run in runs:
    model_dir = _find_model_dir(run.get("teacher.checkpoint") or "", run)
    if model_dir is None or model_dir in found:
      continue
    meta_path = os.path.join(model_dir, convert.META_FILE)
    try:
      meta = _read_json(meta_path, meta_path)
    except RunError:
      meta = None
    top1 = meta.get("test_top1") if isinstance(meta, dict) else None
    found[model_dir] = float(top1) if isinstance(top1, (int, float)) else None
  return [(os.path.join(d, convert.META_FILE), top1) for d, top1 in found.items()]


def _make_table(kind: str, dataset: str, method_runs: List[Run],
                vanilla: Dict[str, List[Run]], used: set) -> Table:
  """One table from its method runs and the dataset's train_teacher runs by model."""
  columns, column_of = [], {}
  for run in sorted(method_runs, key=_pair):
    if _pair(run) not in column_of:
      column_of[_pair(run)] = len(columns)
      columns.append(_column(run))
  entries = [(*method_row(run), column_of[_pair(run)], run) for run in method_runs]
  if kind == "distill":
    for index, column in enumerate(columns):
      for row, model, order in ((TEACHER_ROW, column.teacher, (-2,)),
                                (STUDENT_ROW, column.student, (-1,))):
        for run in vanilla.get(model, []):
          entries.append((row, order, index, run))
          used.add(run.path)
  bases = {(row, column) for row, _, column, _ in entries}
  cells: Dict[Tuple[str, int], Cell] = {}
  orders = {}
  for row, order, column, run in _split_variants(entries):
    cells.setdefault((row, column), Cell()).runs.append(run)
    orders[row] = (order, row)
  if kind == "distill":
    for index, column in enumerate(columns):
      if (TEACHER_ROW, index) not in bases:
        checkpoints = _teacher_checkpoints(r for r in method_runs if column_of[_pair(r)] == index)
        if checkpoints:
          cells[(TEACHER_ROW, index)] = Cell(checkpoints=checkpoints)
          orders[TEACHER_ROW] = ((-2,), TEACHER_ROW)
    for row, order in ((TEACHER_ROW, (-2,)), (STUDENT_ROW, (-1,))):
      if not any(base == row for base, _ in bases):
        orders[row] = (order, row)
  rows = sorted(orders, key=orders.get)
  return Table(kind, dataset, columns, rows, cells)


def build_report(paths: Sequence[str]) -> Report:
  """Read every run under ``paths`` and lay them out in tables."""
  runs, skipped = [], []
  run_dirs = discover(paths)
  if not run_dirs:
    raise ReportError(f"no run directory (one holding {loop.CONFIG_FILE}) under "
                      f"{', '.join(paths)}")
  for run_dir in run_dirs:
    try:
      runs.append(read_run(run_dir))
    except RunError as e:
      skipped.append((run_dir, str(e)))
  distill, transfers, vanilla = (collections.defaultdict(list) for _ in range(3))
  other = []
  for run in runs:
    mode, dataset = run.get("mode"), run.get("dataset.name")
    if mode == "distill" and run.get("dataset.train_split", "train") == "train":
      distill[dataset].append(run)
    elif mode == "transfer":
      transfers[dataset].append(run)
    elif mode == "train_teacher":
      vanilla[dataset].append(run)
    else:
      other.append(run)
  used: set = set()
  tables = []
  for dataset in sorted(distill):
    by_model = collections.defaultdict(list)
    for run in vanilla.get(dataset, []):
      by_model[run.get("teacher.model")].append(run)
    tables.append(_make_table("distill", dataset, distill[dataset], by_model, used))
  for dataset in sorted(transfers):
    tables.append(_make_table("transfer", dataset, transfers[dataset], {}, used))
  other += [r for runs_ in vanilla.values() for r in runs_ if r.path not in used]
  other.sort(key=lambda r: r.path)
  return Report(tables, other, skipped)


# ----------------------------------------------------------------------------- output


def _mean_std(values: List[float]) -> Tuple[Optional[float], Optional[float]]:
  if not values:
    return None, None
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _number(values: List[float]) -> str:
  mean, std = _mean_std(values)
  if mean is None:
    return MISSING
  return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def cell_text(cell: Optional[Cell]) -> str:
  """'75.85 (last 75.60)', '75.85 ± 0.12 (last 75.60 ± 0.10, n=3)',
  '40.10 (last 39.00, running 12/240)', '79.42 (teacher checkpoint)' or '—'."""
  if cell is None:
    return MISSING
  notes = []
  if cell.checkpoints:
    notes.append("teacher checkpoint" if cell.best else "teacher checkpoint without test_top1")
  elif cell.last:
    notes.append(f"last {_number(cell.last)}")
  if cell.n > 1:
    notes.append(f"n={cell.n}")
  notes += cell.unfinished
  return f"{_number(cell.best)} ({', '.join(notes)})" if notes else _number(cell.best)


def _cell_status(cell: Optional[Cell]) -> str:
  if cell is None:
    return "missing"
  if cell.checkpoints:
    return "teacher checkpoint"
  return "; ".join(cell.unfinished) or "done"


def _title(table: Table) -> str:
  if table.kind == "transfer":
    return (f"## {table.dataset}: transfer\n\nTop-1 test accuracy (%) on {table.dataset} of the "
            f"classifier fine-tuned on the distilled student's frozen features: best epoch (last "
            f"epoch); mean ± std over n trials.")
  return (f"## {table.dataset}\n\nTop-1 test accuracy (%) on {table.dataset}: best epoch (last "
          f"epoch); mean ± std over n trials.")


def _ratio_text(ratio: Optional[float]) -> str:
  return "?" if ratio is None else f"{ratio:.2f}"


def _markdown_table(table: Table) -> List[str]:
  header = ["Teacher / Student"] + [f"{c.teacher} / {c.student}" for c in table.columns]
  body = [["Compression Ratio"] + [_ratio_text(c.ratio) for c in table.columns]]
  for row in table.rows:
    body.append([row] + [cell_text(table.cells.get((row, i))) for i in range(len(table.columns))])
  widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
  pad = lambda line: "| " + " | ".join(f"{v:<{w}}" for v, w in zip(line, widths)) + " |"
  return ([pad(header), "|" + "|".join(f":{'-' * w}:" for w in widths) + "|"]
          + [pad(line) for line in body])


def _run_summary(run: Run) -> str:
  model = run.get("teacher.model") if run.get("mode") == "train_teacher" else run.get(
      "student.model")
  what = f"{run.get('mode')} {model} on {run.get('dataset.name')}"
  if run.get("mode") == "distill":
    what += (f" ({method_row(run)[0]} from {run.get('teacher.model')}, "
             f"{run.get('dataset.train_split')} split)")
  return f"{what}: {cell_text(Cell(runs=[run]))}"


def format_markdown(report: Report) -> str:
  lines = []
  for table in report.tables:
    lines += [_title(table), ""] + _markdown_table(table) + [""]
  lines.append(f"{MISSING}: no run; running e/E: no {loop.SUMMARY_FILE} yet, e of E epochs "
               f"logged; partial: a transfer without {transfer.TRANSFER_FILE}.")
  if report.other:
    lines += ["", "## Other runs (in no table)", ""]
    lines += [f"- {run.path}: {_run_summary(run)}" for run in report.other]
  if report.skipped:
    lines += ["", "## Skipped", ""]
    lines += [f"- {path}: {reason}" for path, reason in report.skipped]
  return "\n".join(lines) + "\n"


def _csv_number(value: Optional[float]) -> str:
  return "" if value is None else f"{value:.4f}"


def _csv_cell(cell: Optional[Cell]) -> List[str]:
  best, best_std = _mean_std(cell.best if cell else [])
  last, last_std = _mean_std(cell.last if cell else [])
  return ([_csv_number(v) for v in (best, best_std, last, last_std)]
          + [str(cell.n if cell else 0), _cell_status(cell), ";".join(cell.paths if cell else [])])


def format_csv(report: Report) -> str:
  """The same content, one CSV row per cell (4 decimals), other run and skipped directory."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(CSV_HEADER)
  for table in report.tables:
    for row in table.rows:
      for i, column in enumerate(table.columns):
        writer.writerow([table.kind, table.dataset, row, column.teacher, column.student,
                         _csv_number(column.ratio)] + _csv_cell(table.cells.get((row, i))))
  for run in report.other:
    mode = run.get("mode")
    writer.writerow(["other", run.get("dataset.name"), mode,
                     run.get("teacher.model") if mode != "fine_tune" else "",
                     run.get("student.model") if mode != "train_teacher" else "", ""]
                    + _csv_cell(Cell(runs=[run])))
  for path, reason in report.skipped:
    writer.writerow(["skipped", "", "", "", "", "", "", "", "", "", "0", reason, path])
  return out.getvalue()


def plot_report(report: Report, path: str) -> None:
  """One PNG: per table column, test top-1 curves per row and a bar chart of best top-1."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  from matplotlib.ticker import MaxNLocator

  panels = [(table, i) for table in report.tables for i in range(len(table.columns))]
  if not panels:
    raise ReportError("nothing to plot: no table")
  tab20 = plt.get_cmap("tab20").colors
  palette = tab20[0::2] + tab20[1::2]  # the 10 strong colours first
  rows = list(dict.fromkeys(row for table in report.tables for row in table.rows))
  color = {row: palette[i % len(palette)] for i, row in enumerate(rows)}  # one per row name
  fig, axes = plt.subplots(len(panels), 2, figsize=(14, 4.5 * len(panels)), squeeze=False)
  for (table, index), (curve_ax, bar_ax) in zip(panels, axes):
    column = table.columns[index]
    kind = " transfer" if table.kind == "transfer" else ""
    title = f"{table.dataset}{kind}: {column.teacher} -> {column.student}"
    bars = []  # (row, mean, std)
    for row in table.rows:
      cell = table.cells.get((row, index))
      if cell is None:
        continue
      for k, run in enumerate(cell.runs):
        if run.curve:
          epochs, top1 = zip(*run.curve)
          curve_ax.plot(epochs, top1, color=color[row], linewidth=1,
                        label=row if k == 0 else None)
      mean, std = _mean_std(cell.best)
      if mean is not None:
        bars.append((row, mean, std))
    curve_ax.set(title=f"{title}: test top-1 per epoch", xlabel="epoch", ylabel="test top-1 (%)")
    curve_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if curve_ax.lines:
      curve_ax.legend(fontsize=7, loc="lower right")
    bar_ax.set(title=f"{title}: best test top-1", ylabel="test top-1 (%)")
    if bars:
      labels, means, stds = zip(*bars)
      stds = [s or 0.0 for s in stds]
      bar_ax.bar(range(len(bars)), means, color=[color[r] for r in labels])
      for x, (mean, std) in enumerate(zip(means, stds)):
        if std:
          bar_ax.errorbar(x, mean, yerr=std, color="black", capsize=3)
        bar_ax.text(x, mean + std, f"{mean:.2f}", ha="center", va="bottom", fontsize=7)
      bar_ax.set_xticks(range(len(bars)), labels, rotation=45, ha="right", fontsize=8)
      low = min(m - s for m, s in zip(means, stds))
      high = max(m + s for m, s in zip(means, stds))
      bar_ax.set_ylim(max(0.0, math.floor(low) - 2), min(100.0, high + 2))
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m cktf_jax.report",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                      help="run directories, or folders holding them at any depth")
  parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
  parser.add_argument("--plot", metavar="OUT.png",
                      help="also write accuracy curves and bar charts to this PNG")
  args = parser.parse_args(argv)
  try:
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
      raise ReportError(f"--plot {args.plot}: its folder does not exist")
    report = build_report(args.run_dirs)
    if args.plot:
      plot_report(report, args.plot)
  except ReportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sys.stdout.write(format_markdown(report) if args.format == "markdown" else format_csv(report))
  if args.plot:
    print(f"plot written to {args.plot}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
