"""Training input pipeline throughput: 256 px PNG decode + resize + augment + batch, images/s.

Generates a synthetic stone set in a temporary folder, then times the tf.data training stream
(the part that runs per step; the hand-off to device arrays is excluded).
Usage: python benchmarks/input_pipeline.py [--images 128] [--batch 32] [--steps 40]
"""
import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs.msd import get_config  # noqa: E402
from data_pipeline import datasets, input_pipeline, synthetic  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=128)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=40)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as root:
    synthetic.generate(root, args.images, 0, size=args.size, seed=0)
    records = datasets.validate_records(datasets.read_stonedd(root))
    ds = input_pipeline.train_dataset(records, image_size=args.size,
                                      global_batch_size=args.batch, seed=0,
                                      augment_config=get_config("full").data.augment)
    it = ds.as_numpy_iterator()
    for _ in range(3):  # warm-up: graph tracing and thread pools
      next(it)
    start = time.perf_counter()
    for _ in range(args.steps):
      next(it)
    seconds = time.perf_counter() - start
  rate = args.steps * args.batch / seconds
  print(f"input pipeline: {rate:.0f} images/s ({args.size} px decode + augment + batch of "
        f"{args.batch}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
  main()
