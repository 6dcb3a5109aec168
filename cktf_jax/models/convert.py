"""Convert a reference PyTorch checkpoint into an orbax checkpoint (e.g. a teacher).

    python -m cktf_jax.models.convert --model resnet32x4 --num_classes 100 IN.pth OUT_DIR

writes ``OUT_DIR/variables`` (an orbax ``StandardCheckpointer`` checkpoint of
``{'params', 'batch_stats'}``) and ``OUT_DIR/meta.json`` (model, num_classes,
source file and format, and the reference's epoch/accuracy when present).
``restore_converted(OUT_DIR)`` reads both back.
"""

import argparse
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import orbax.checkpoint as ocp

from cktf_jax import checksums, distributed
from cktf_jax.models.registry import abstract_variables, check_model_name
from cktf_jax.models.torch_checkpoint import CheckpointError, read_torch_file, split_checkpoint
from cktf_jax.models.torch_import import state_dict_to_variables

VARIABLES_DIR = "variables"
META_FILE = "meta.json"


def save_model_dir(out_dir: str, model_name: str, num_classes: int, variables: Dict[str, Any],
                   extra_meta: Optional[Dict[str, Any]] = None,
                   overwrite: bool = False) -> Dict[str, Any]:
  """Write ``out_dir/variables`` (orbax) and ``out_dir/meta.json``; return the meta.

  The layout a teacher is read from (``restore_converted``), whether the
  variables came from a PyTorch file or from our own training. With several
  processes every one calls it (the orbax save is collective); process 0
  writes ``meta.json``.
  """
  out_dir = os.path.abspath(out_dir)
  ckpt_dir = os.path.join(out_dir, VARIABLES_DIR)
  if os.path.exists(ckpt_dir) and not overwrite:
    raise FileExistsError(f"{ckpt_dir} already exists; pass --overwrite to replace it")
  os.makedirs(out_dir, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(ckpt_dir, variables, force=overwrite)
  meta = {
      "model": model_name,
      "num_classes": num_classes,
      "num_params": sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(variables["params"])),
      **(extra_meta or {}),
      "crc32": checksums.tree_checksums(variables),
  }
  if distributed.is_writer():
    with open(os.path.join(out_dir, META_FILE), "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
      f.write("\n")
  return meta


def convert(in_path: str, out_dir: str, model_name: str, num_classes: int,
            overwrite: bool = False) -> Dict[str, Any]:
  """Convert ``in_path`` into ``save_model_dir``'s layout; return the meta dict."""
  check_model_name(model_name)
  obj, fmt = read_torch_file(in_path, with_format=True)
  state, reference = split_checkpoint(obj, str(in_path))
  template = abstract_variables(model_name, num_classes)
  variables = state_dict_to_variables(state, template, what=str(in_path))
  # reference: epoch / accuracy / best_acc, when the checkpoint has them
  extra = {"source": os.path.abspath(str(in_path)), "source_format": fmt, **reference}
  return save_model_dir(out_dir, model_name, num_classes, variables, extra, overwrite)


def restore_converted(out_dir: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """``(meta, {'params', 'batch_stats'})`` of a directory written by
  ``save_model_dir``; ``CheckpointError`` naming the directory when it is
  damaged (unreadable meta or variables, or variables that do not match the
  checksums saved with them)."""
  out_dir = os.path.abspath(out_dir)
  meta_path = os.path.join(out_dir, META_FILE)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{out_dir} is not a converted checkpoint (no {META_FILE})")
  damaged = (f"the model directory {out_dir} is damaged; write it again (rerun the run that "
             f"made it, or `python -m cktf_jax.models.convert`)")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    template = abstract_variables(meta["model"], int(meta["num_classes"]))
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{damaged}: {META_FILE} is unreadable ({type(e).__name__}: {e})") from None
  try:
    with ocp.StandardCheckpointer() as ckptr:
      variables = ckptr.restore(os.path.join(out_dir, VARIABLES_DIR), template)
  except Exception as e:  # orbax/tensorstore raise many types for damaged files
    raise CheckpointError(f"{damaged}: {VARIABLES_DIR}/ cannot be restored "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
  bad = checksums.mismatches(variables, meta["crc32"]) if "crc32" in meta else []
  if bad:
    raise CheckpointError(f"{damaged}: {len(bad)} arrays differ from their saved checksums "
                          f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
  return meta, variables


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m cktf_jax.models.convert",
      description="Convert a RepDistiller/CKTF PyTorch checkpoint (.pth, zip or legacy "
                  "format, or an .npz state dict) into an orbax checkpoint.")
  parser.add_argument("--model", required=True, help="model name, e.g. resnet32x4")
  parser.add_argument("--num_classes", type=int, required=True, help="e.g. 100 for CIFAR-100")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR/variables")
  parser.add_argument("in_path", metavar="IN.pth")
  parser.add_argument("out_dir", metavar="OUT_DIR")
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI entry point; ``argv`` excludes the program name (``None``: ``sys.argv[1:]``).

  Returns 0, or 1 after printing the error for a bad input (unknown model, not a
  checkpoint, keys that do not match, existing output).
  """
  args = _parse(argv)
  try:
    meta = convert(args.in_path, args.out_dir, args.model, args.num_classes, args.overwrite)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  out_dir = os.path.abspath(args.out_dir)
  extra = ", ".join(f"{k} {meta[k]}" for k in ("epoch", "accuracy", "best_acc") if k in meta)
  print(f"wrote {os.path.join(out_dir, VARIABLES_DIR)} ({meta['model']}, "
        f"{meta['num_classes']} classes, {meta['num_params']} parameters) and "
        f"{os.path.join(out_dir, META_FILE)}" + (f" [{extra}]" if extra else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
