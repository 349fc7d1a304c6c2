"""Training speed and peak memory on this machine's CPU, per backbone and image size.

Each configuration (backbone:size[:batch], batch 2 by default) trains in a fresh process on a
generated sample (float32, from scratch, no validation); the first step (graph tracing) is
reported apart from the steady seconds per step. Peak memory is the child's max RSS; with several
batch sizes of one backbone and size, the memory per image is the slope between them (the figure
behind the GPU batch default, docs/training.md).

    .venv/bin/python benchmarks/bench_train.py [--steps 5] [--configs resnet50:256,resnet152:640]
    .venv/bin/python benchmarks/bench_train.py --steps 3 --configs resnet152:640:1,resnet152:640:2,resnet152:640:4

``--precision`` compares the GPU code paths run on the CPU (two logical CPU replicas under
MirroredStrategy, mixed float16 with a dynamic loss scale, XLA: ``--cpu-replicas 2``) with the
plain float32 single-replica run, on the same records, seed, steps and global batch (2 per
replica x 2 against 4 on one), so that the losses of the two are comparable step by step:

    .venv/bin/python benchmarks/bench_train.py --precision --steps 10

``--vs-model-garden`` times this project's loop (``personcar train``'s ``tasks.train.train``)
against Model Garden's own driver (``official.core.train_lib.run_experiment``, mode train, one
step a loop) on the same experiment (``tasks.train.build_experiment``), records, seed and steps,
each in a fresh process on one float32 CPU replica:

    .venv/bin/python benchmarks/bench_train.py --vs-model-garden --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time, logging
from pathlib import Path
from tasks.config import RunConfig
from tasks import train as t
backbone, size, steps, data, model_dir, batch = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                                                sys.argv[5], int(sys.argv[6]))
stamps = []
class Clock(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("train: step"):
            stamps.append(time.monotonic())
logging.getLogger("personcar").addHandler(Clock()); logging.getLogger("personcar").setLevel(logging.INFO)
start = time.monotonic()
s = t.train(Path(data), Path(model_dir), RunConfig(backbone=backbone, image_size=size, batch_size=batch, steps=steps,
                                                   init_checkpoint="scratch", warm_start="none", validate_every=0),
            log_every=1, export=False, checkpoint_every=10**6, gpus=0)
first = stamps[0] - start
steady = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
import resource
print(json.dumps({"first_step_s": first, "steady_s_per_step": steady,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


COMPARE = r"""
import json, sys, time, logging, re, resource
from pathlib import Path
from tasks.config import RunConfig
from tasks import train as t
model, size, steps, data, model_dir, batch, replicas = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                                                       sys.argv[5], int(sys.argv[6]), int(sys.argv[7]))
stamps, losses = [], []
class Clock(logging.Handler):
    def emit(self, record):
        m = re.match(r"train: step \d+/\d+ loss (\S+)", record.getMessage())
        if m:
            stamps.append(time.monotonic()); losses.append(float(m.group(1)))
logging.getLogger("personcar").addHandler(Clock()); logging.getLogger("personcar").setLevel(logging.INFO)
start = time.monotonic()
s = t.train(Path(data), Path(model_dir), RunConfig(model=model, image_size=size, batch_size=batch, steps=steps,
                                                   init_checkpoint="scratch", warm_start="none", validate_every=0,
                                                   seed=1),
            log_every=1, export=False, checkpoint_every=10**6, gpus=0, cpu_replicas=replicas or None)
print(json.dumps({"first_step_s": stamps[0] - start,
                  "steady_s_per_step": (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1), "losses": losses,
                  "precision": s["precision"], "replicas": s["replicas"], "xla": s["xla"],
                  "loss_scale_value": s["loss_scale_value"], "skipped_steps": s["skipped_steps"],
                  "global_batch_size": s["global_batch_size"], "learning_rate": s["learning_rate"],
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


MODEL_GARDEN = r"""
import json, sys, time, resource
from pathlib import Path
from tasks.config import RunConfig
from tasks import train as t
tf = t._setup_tf()
from official.core import task_factory, train_lib
model, size, steps, data, model_dir, batch = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                                              sys.argv[5], int(sys.argv[6]))
start = time.monotonic()
run = RunConfig(model=model, image_size=size, batch_size=batch, steps=steps, init_checkpoint="scratch",
                warm_start="none", validate_every=0, seed=1)
exp = t.build_experiment(run, Path(data), gpus=0)
exp.override({"trainer": {"steps_per_loop": 1, "summary_interval": 1, "checkpoint_interval": 10**6,
                          "validation_interval": 10**6}}, is_strict=True)
tf.keras.utils.set_random_seed(1)
strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
with strategy.scope():
    task = task_factory.get_task(exp.task, logging_dir=model_dir)
stamps, losses = [], []
def stamp(outputs):
    stamps.append(time.monotonic()); losses.append(float(outputs["total_loss"]))
train_lib.run_experiment(distribution_strategy=strategy, task=task, mode="train", params=exp, model_dir=model_dir,
                         train_actions=[stamp])
print(json.dumps({"first_step_s": stamps[0] - start,
                  "steady_s_per_step": (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1), "losses": losses,
                  "steps": len(stamps), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def vs_model_garden(data: Path, root: Path, steps: int, model: str, size: int) -> None:
    """This project's loop against Model Garden's run_experiment (mode train), same experiment and steps."""
    runs = {}
    env = {k: v for k, v in os.environ.items() if k != "PERSONCAR_CPU_REPLICAS"}
    for name, child, extra in (("personcar train", COMPARE, ["0"]), ("Model Garden run_experiment", MODEL_GARDEN, [])):
        out = subprocess.run([sys.executable, "-c", child, model, str(size), str(steps), str(data),
                              str(root / f"m-{len(runs)}"), "2", *extra], capture_output=True, text=True,
                             env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"})
        if out.returncode:
            raise SystemExit(f"{name}: failed: {out.stderr.strip().splitlines()[-1]}")
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{model} at {size}, {steps} steps, batch 2, float32, one CPU replica, same experiment and records")
    print(f"{'loop':28s} {'first step s':>12s} {'s/step':>7s} {'peak RSS GB':>11s} {'last loss':>9s}")
    for name, r in runs.items():
        print(f"{name:28s} {r['first_step_s']:12.1f} {r['steady_s_per_step']:7.3f} {r['peak_rss_gb']:11.2f} "
              f"{r['losses'][-1]:9.4f}")
    (_, ours), (_, mg) = runs.items()
    print(f"s/step, personcar train / Model Garden: {ours['steady_s_per_step'] / mg['steady_s_per_step']:.3f}; "
          f"peak RSS: {ours['peak_rss_gb'] / mg['peak_rss_gb']:.3f}")
    print(json.dumps(runs))


def compare_precision(data: Path, root: Path, steps: int, model: str, size: int) -> None:
    """Two CPU replicas in mixed float16 with XLA against one in float32, same global batch and steps."""
    runs = {}
    for name, batch, replicas in (("float32, 1 replica", 4, 0), ("mixed_float16 + XLA, 2 replicas", 2, 2)):
        env = {k: v for k, v in os.environ.items() if k != "PERSONCAR_CPU_REPLICAS"}
        out = subprocess.run([sys.executable, "-c", COMPARE, model, str(size), str(steps), str(data),
                              str(root / f"m-{replicas}"), str(batch), str(replicas)], capture_output=True, text=True,
                             env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"})
        if out.returncode:
            raise SystemExit(f"{name}: failed: {out.stderr.strip().splitlines()[-1]}")
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{model} at {size}, {steps} steps, global batch 4, same seed and records")
    print(f"{'run':34s} {'first step s':>12s} {'s/step':>7s} {'steps/s':>7s} {'peak RSS GB':>11s} "
          f"{'loss step 1':>11s} {'last loss':>9s} {'mean loss':>9s} {'skipped':>7s}")
    for name, r in runs.items():
        losses = r["losses"]
        print(f"{name:34s} {r['first_step_s']:12.1f} {r['steady_s_per_step']:7.2f} {1 / r['steady_s_per_step']:7.2f} "
              f"{r['peak_rss_gb']:11.2f} {losses[0]:11.4f} {losses[-1]:9.4f} {sum(losses) / len(losses):9.4f} "
              f"{r['skipped_steps']:7d}")
    (a, ra), (b, rb) = runs.items()
    diffs = [abs(x - y) / abs(x) for x, y in zip(ra["losses"], rb["losses"], strict=True)]
    print(f"total loss, {b} vs {a}: largest relative difference over the steps {max(diffs):.2%}, "
          f"at the last step {diffs[-1]:.2%}; final loss scale {rb['loss_scale_value']}")
    print(json.dumps(runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--configs", default="resnet50:256,resnet152:256,resnet50:640,resnet152:640")
    ap.add_argument("--precision", action="store_true",
                    help="compare 2 CPU replicas in mixed float16 + XLA with 1 in float32 (same global batch)")
    ap.add_argument("--vs-model-garden", action="store_true",
                    help="time personcar train against Model Garden's train_lib.run_experiment (mode train)")
    ap.add_argument("--model", default="ssd_resnet26_v1_fpn_256x256_tiny", help="with --precision/--vs-model-garden")
    ap.add_argument("--image-size", type=int, default=128, help="with --precision/--vs-model-garden")
    args = ap.parse_args()
    from tasks.sample import make_sample
    from tasks.tfrecords import build_tfrecords

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import pixel_area_copy

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_sample(root / "s", images=8, seed=0)
        clean = pixel_area_copy(root / "s/trainval/annotations/bbox-annotations.json", root / "clean.json")
        build_tfrecords(clean, root / "s/trainval/images", root / "tfr", val_fraction=0.0)
        if args.precision:
            compare_precision(root / "tfr", root, args.steps, args.model, args.image_size)
            return
        if args.vs_model_garden:
            vs_model_garden(root / "tfr", root, args.steps, args.model, args.image_size)
            return
        print(f"{'backbone':10s} {'size':>5s} {'batch':>5s} {'first step s':>13s} {'s/step':>8s} {'peak RSS GB':>12s}")
        peaks: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for item in args.configs.split(","):
            backbone, size, *rest = item.split(":")
            batch = rest[0] if rest else "2"
            out = subprocess.run([sys.executable, "-c", CHILD, backbone, size, str(args.steps), str(root / "tfr"),
                                  str(root / f"m-{backbone}-{size}-{batch}"), batch], capture_output=True, text=True,
                                 env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            if out.returncode:
                print(f"{backbone:10s} {size:>5s} {batch:>5s} failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            peaks.setdefault((backbone, size), []).append((int(batch), r["peak_rss_gb"]))
            print(f"{backbone:10s} {size:>5s} {batch:>5s} {r['first_step_s']:13.1f} {r['steady_s_per_step']:8.2f} "
                  f"{r['peak_rss_gb']:12.2f}", flush=True)
        for (backbone, size), pts in peaks.items():
            if len(pts) > 1:
                (b0, m0), (b1, m1) = min(pts), max(pts)
                slope = (m1 - m0) / (b1 - b0)
                print(f"{backbone} at {size}: {slope:.2f} GB per image (float32, CPU), {m0 - b0 * slope:.2f} GB fixed")


if __name__ == "__main__":
    main()
