"""MSD training step, msd-jax vs the PyTorch reference (diffusers), side by side.

  python benchmarks/train_step.py --config=demo [--rounds=6 --steps=2 --warmup=2]

The step: student context c from the mask-weighted latent, ControlNet residuals from the hint
image and z_t, the UNet's eps prediction with those residuals, loss = MSE(eps) + kd_weight * L_KD
(MSE + channel-softmax KL between student and teacher embeddings), backward, Adam. Trained, as
DiAD: the control network, the UNet decoder (up blocks, conv_norm_out, conv_out) and the student;
frozen: the UNet's conv_in, time embedding, down blocks and mid block.

- PyTorch: diffusers `UNet2DConditionModel` + `ControlNetModel.from_unet` (eager, float32,
  `torch.set_num_threads(os.cpu_count())`), `torch.optim.Adam` over the trained parameters.
- msd-jax: `UNet2DConditionModel` + `SGEN` with DiAD's plain hint encoder and SFF off, so it is
  exactly a ControlNet; the weights are the PyTorch ones, converted. One jitted step that
  differentiates only the trained parameters, with the parameters and Adam state donated.
- Both: the same small conv student (conv_in, conv_mid, conv_out to the teacher channels; the
  context is its output average-pooled to a k x k grid and projected to cross_attention_dim),
  the same inputs (numpy, seed 0) and the same batch every step (the data pipeline is not timed).

Configs: tiny and demo are `configs/msd.py`'s; mid is demo with UNet widths 128/256/512, batch 8,
latent 32 x 32 (256 px hint images). Each framework runs in its own process (own peak RSS); their
timed rounds alternate. Utilisation = XLA's FLOP count of the compiled step / median step time /
the measured float32 matmul rate of this machine.
"""
import argparse
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from configs.msd import get_config  # noqa: E402

CONFIGS = ("tiny", "demo", "mid")
TEACHER_CHANNELS = 152  # the EfficientNet-Lite0 stand-in teacher's embedding width (40 + 112)


def spec(name: str) -> dict:
  """Sizes of benchmark config `name`, from configs/msd.py."""
  if name not in CONFIGS:
    raise ValueError(f"unknown config {name!r}; choose one of {CONFIGS}")
  config = get_config("tiny" if name == "tiny" else "demo")
  u = config.model.unet
  widths = (128, 256, 512) if name == "mid" else tuple(u.block_out_channels)
  # Image pixels per latent pixel: the VAE's (mid: 8, the SD VAE's); the plain hint encoder
  # downsamples by as much (one stride-2 per level after the first).
  factor = 8 if name == "mid" else 2 ** (len(config.model.vae.block_out_channels) - 1)
  latent = 32 if name == "mid" else config.data.image_size // factor
  hint_levels = factor.bit_length()
  unet = dict(in_channels=u.in_channels, out_channels=u.out_channels, layers_per_block=u.layers_per_block,
              block_out_channels=widths, down_block_types=tuple(u.down_block_types),
              up_block_types=tuple(u.up_block_types), cross_attention_dim=u.cross_attention_dim,
              attention_head_dim=u.attention_head_dim, norm_num_groups=u.norm_num_groups)
  m = config.model.mgkd
  return dict(unet=unet, hint_channels=tuple(config.model.sgen.hint_block_out_channels)[:hint_levels],
              factor=factor, batch=8 if name == "mid" else config.train.batch_size, latent=latent,
              student_width=m.student_width, tokens=m.num_context_tokens,
              learning_rate=config.train.learning_rate, kd_weight=config.stages.msd.kd_weight,
              alphas_cumprod=_alphas_cumprod(config.diffusion))


def _alphas_cumprod(d) -> np.ndarray:
  if d.beta_schedule != "scaled_linear":
    raise ValueError("the benchmark builds the scaled_linear schedule only")
  betas = np.linspace(d.beta_start**0.5, d.beta_end**0.5, d.num_train_timesteps, dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas)


def inputs(s: dict) -> dict:
  """One training batch, NHWC float32 numpy (seed 0)."""
  rng = np.random.default_rng(0)
  b, h = s["batch"], s["latent"]
  c = s["unet"]["in_channels"]
  z0 = rng.standard_normal((b, h, h, c)).astype(np.float32)
  noise = rng.standard_normal((b, h, h, c)).astype(np.float32)
  t = rng.integers(0, len(s["alphas_cumprod"]), b).astype(np.int32)
  a = s["alphas_cumprod"][t][:, None, None, None]
  return dict(
      z0=z0, noise=noise, t=t, z_t=(np.sqrt(a) * z0 + np.sqrt(1 - a) * noise).astype(np.float32),
      grid=rng.uniform(0, 1, (b, h, h)).astype(np.float32),
      teacher=rng.standard_normal((b, h, h, TEACHER_CHANNELS)).astype(np.float32),
      image=rng.uniform(-1, 1, (b, s["factor"] * h, s["factor"] * h, 3)).astype(np.float32))


def _pool(s: dict) -> int:
  k = math.isqrt(s["tokens"])
  if k * k != s["tokens"] or s["latent"] % k:
    raise ValueError(f"{s['tokens']} context tokens do not tile a {s['latent']}^2 latent")
  return s["latent"] // k


def torch_student(s: dict):
  """The benchmark's student in PyTorch: z -> (teacher-shaped embedding, context tokens)."""
  from torch import nn  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: PLC0415

  class Student(nn.Module):

    def __init__(self):
      super().__init__()
      w = s["student_width"]
      self.conv_in = nn.Conv2d(s["unet"]["in_channels"], w, 3, padding=1)
      self.conv_mid = nn.Conv2d(w, w, 3, padding=1)
      self.conv_out = nn.Conv2d(w, TEACHER_CHANNELS, 3, padding=1)
      self.context_proj = nn.Linear(TEACHER_CHANNELS, s["unet"]["cross_attention_dim"])

    def forward(self, x):
      z = self.conv_out(F.silu(self.conv_mid(F.silu(self.conv_in(x)))))
      c = F.avg_pool2d(z, _pool(s)).flatten(2).transpose(1, 2)
      return z, self.context_proj(c)

  return Student()


def jax_student_cls():
  """The same student as a Flax module class `(width, pool, context_dim)`."""
  import flax.linen as nn  # noqa: PLC0415

  class Student(nn.Module):
    width: int
    pool: int
    context_dim: int

    @nn.compact
    def __call__(self, x):
      z = nn.silu(nn.Conv(self.width, (3, 3), padding=1, name="conv_in")(x))
      z = nn.silu(nn.Conv(self.width, (3, 3), padding=1, name="conv_mid")(z))
      z = nn.Conv(TEACHER_CHANNELS, (3, 3), padding=1, name="conv_out")(z)
      c = nn.avg_pool(z, (self.pool, self.pool), (self.pool, self.pool)).reshape(z.shape[0], -1, z.shape[-1])
      return z, nn.Dense(self.context_dim, name="context_proj")(c)

  return Student


# ----------------------------------------------------------------------------- PyTorch worker


def torch_worker(s: dict, weights: str) -> None:
  import diffusers  # noqa: PLC0415
  import safetensors.torch  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: PLC0415

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)

  unet = diffusers.UNet2DConditionModel(sample_size=s["latent"], **s["unet"])
  controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=s["hint_channels"])
  student = torch_student(s)
  for name, module in (("unet", unet), ("control", controlnet), ("student", student)):
    sd = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    safetensors.torch.save_file(sd, os.path.join(weights, f"{name}.safetensors"))
  for part in (unet.conv_in, unet.time_embedding, unet.down_blocks, unet.mid_block):
    part.requires_grad_(False)
  trained = [p for m in (controlnet, unet, student) for p in m.parameters() if p.requires_grad]
  opt = torch.optim.Adam(trained, lr=s["learning_rate"])
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  x = inputs(s)
  z0, noise, z_t, teacher, image = (nchw(x[k]) for k in ("z0", "noise", "z_t", "teacher", "image"))
  grid, t = torch.from_numpy(x["grid"])[:, None], torch.from_numpy(x["t"]).long()

  def loss_fn():
    z_s, c = student(z0 * grid)
    down, mid = controlnet(z_t, t, encoder_hidden_states=c, controlnet_cond=image, return_dict=False)
    eps = unet(z_t, t, c, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    log_p_t, log_p_s = F.log_softmax(teacher, 1), F.log_softmax(z_s, 1)
    kd = F.mse_loss(z_s, teacher) + (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()
    return F.mse_loss(eps, noise) + s["kd_weight"] * kd

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    opt.step()
    return loss.item()

  def warmup(steps):
    times, losses = common.timed(step, steps)
    common.reset_peak_rss()
    return {"losses": losses, "first_step_s": times[0]}

  def run(steps):
    return {"times": common.timed(step, steps)[0]}

  common.serve({"warmup": warmup, "run": run, "stats": common.rss_stats})


# ----------------------------------------------------------------------------- msd-jax worker


def jax_worker(s: dict, weights: str) -> None:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415
  from safetensors.numpy import load_file  # noqa: PLC0415

  from msd_jax.convert.common import convert_state_dict  # noqa: PLC0415
  from msd_jax.models import sgen as sgen_lib  # noqa: PLC0415
  from msd_jax.models import unet as unet_lib  # noqa: PLC0415

  unet = unet_lib.from_config(s["unet"])
  control = sgen_lib.from_config(s["unet"], {"use_bpnet": False, "use_sff": False,
                                             "hint_block_out_channels": s["hint_channels"]})
  student = jax_student_cls()(s["student_width"], _pool(s), s["unet"]["cross_attention_dim"])
  x = {k: jnp.asarray(v) for k, v in inputs(s).items()}
  one = {k: v[:1] for k, v in x.items()}
  c1 = jnp.zeros((1, s["tokens"], s["unet"]["cross_attention_dim"]))
  targets = {
      "unet": jax.eval_shape(unet.init, jax.random.key(0), one["z_t"], one["t"], c1),
      "control": jax.eval_shape(control.init, jax.random.key(0), one["image"], one["z_t"], one["t"], c1),
      "student": jax.eval_shape(student.init, jax.random.key(0), one["z0"]),
  }
  params = {k: jax.tree.map(jnp.asarray, convert_state_dict(load_file(os.path.join(weights, f"{k}.safetensors")),
                                                            target)["params"])
            for k, target in targets.items()}
  decoder = lambda k: k.startswith("up_blocks_") or k in ("conv_norm_out", "conv_out")
  trained = {"control": params["control"], "student": params["student"],
             "unet": {k: v for k, v in params["unet"].items() if decoder(k)}}
  frozen = {k: v for k, v in params["unet"].items() if not decoder(k)}
  tx = optax.adam(s["learning_rate"])
  opt_state = tx.init(trained)

  def loss_fn(trained, frozen, x):
    z_s, c = student.apply({"params": trained["student"]}, x["z0"] * x["grid"][..., None])
    down, mid = control.apply({"params": trained["control"]}, x["image"], x["z_t"], x["t"], c)
    eps = unet.apply({"params": {**frozen, **trained["unet"]}}, x["z_t"], x["t"], c, down, mid)
    log_p_t, log_p_s = jax.nn.log_softmax(x["teacher"]), jax.nn.log_softmax(z_s)
    kd = jnp.mean(jnp.square(z_s - x["teacher"])) + jnp.mean(jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), -1))
    return jnp.mean(jnp.square(eps - x["noise"])) + s["kd_weight"] * kd

  def train_step(trained, opt_state, frozen, x):
    loss, grads = jax.value_and_grad(loss_fn)(trained, frozen, x)
    updates, opt_state = tx.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, loss

  start = time.perf_counter()
  compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(trained, opt_state, frozen, x).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state = [trained, opt_state]

  def step():
    state[0], state[1], loss = compiled(state[0], state[1], frozen, x)
    return float(loss)  # blocks until the step is done

  def warmup(steps):
    times, losses = common.timed(step, steps)
    common.reset_peak_rss()
    return {"losses": losses, "first_step_s": times[0], "compile_s": compile_s, "flops": float(cost["flops"])}

  def run(steps):
    return {"times": common.timed(step, steps)[0]}

  common.serve({"warmup": warmup, "run": run, "stats": common.rss_stats})


# ----------------------------------------------------------------------------- driver


def benchmark(config: str, rounds: int, steps: int, warmup: int) -> dict:
  """Runs both workers on `config`; returns the measurements (also printed)."""
  s = spec(config)
  peak = common.matmul_peak_flops()
  with tempfile.TemporaryDirectory() as weights:
    args = [f"--config={config}", f"--weights={weights}"]
    warm, times, rss = common.run_side_by_side(__file__, args, rounds, steps, warmup)
  jx_warm, pt_warm = warm["jax"], warm["torch"]
  jt, tt = common.summary(times["jax"]), common.summary(times["torch"])
  result = dict(config=config, batch=s["batch"], latent=s["latent"], widths=s["unet"]["block_out_channels"],
                jax=jt, torch=tt, speedup=tt["median"] / jt["median"], rss=rss, compile_s=jx_warm["compile_s"],
                flops=jx_warm["flops"], peak_flops=peak, utilisation=jx_warm["flops"] / jt["median"] / peak,
                losses={"jax": jx_warm["losses"], "torch": pt_warm["losses"]})
  report(result)
  return result


def report(r: dict) -> None:
  lj, lt = r["losses"]["jax"], r["losses"]["torch"]
  print(f"\nconfig {r['config']}: UNet widths {r['widths']}, batch {r['batch']}, latent {r['latent']}^2; "
        f"{r['jax']['n']} timed steps each, alternating")
  print("loss at warm-up steps  msd-jax " + " ".join(f"{v:.6f}" for v in lj)
        + "  PyTorch " + " ".join(f"{v:.6f}" for v in lt)
        + f"  (step 1 rel. diff {abs(lj[0] - lt[0]) / abs(lt[0]):.1e})")
  rows = [[name, common.fmt_time(r[key]), f"{r['rss'][key]['steps_peak_rss_mib']:.0f}",
           f"{r['rss'][key]['peak_rss_mib']:.0f}"] for name, key in (("msd-jax", "jax"), ("PyTorch", "torch"))]
  print(common.markdown_table(["framework", "step time (median +- IQR/2)", "peak RSS, steps (MiB)",
                               "peak RSS, whole run (MiB)"], rows))
  ratio = lambda k: r["rss"]["jax"][k] / r["rss"]["torch"][k]
  print(f"speed-up msd-jax vs PyTorch: {r['speedup']:.2f}x; peak RSS msd-jax/PyTorch: steps "
        f"{ratio('steps_peak_rss_mib'):.2f}, whole run {ratio('peak_rss_mib'):.2f}; XLA compile {r['compile_s']:.1f} s")
  print(f"utilisation: {r['flops'] / 1e9:.2f} GFLOP/step (XLA cost analysis) / {1e3 * r['jax']['median']:.1f} ms "
        f"= {r['flops'] / r['jax']['median'] / 1e9:.1f} GFLOP/s of a measured {r['peak_flops'] / 1e9:.1f} GFLOP/s "
        f"float32 matmul peak = {100 * r['utilisation']:.1f}%")


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="demo", help=f"comma-separated, from {CONFIGS}")
  parser.add_argument("--rounds", type=int, default=6, help="alternating timed rounds")
  parser.add_argument("--steps", type=int, default=2, help="timed steps per framework per round")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (JAX: after compiling)")
  parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  parser.add_argument("--weights", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    (jax_worker if args.worker == "jax" else torch_worker)(spec(args.config), args.weights)
    return []
  print(common.machine())
  return [benchmark(c, args.rounds, args.steps, args.warmup) for c in args.config.split(",")]


if __name__ == "__main__":
  main()
