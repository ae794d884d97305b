"""XLA:CPU settings that msd-jax's programs run faster with; applied on `import msd_jax`.

jaxlib 0.10 hands several kinds of CPU work to the YNNPACK library by default, convolutions
among them. Its convolutions and their gradients are 2-4x slower than XLA's own on the Intel Xeon
of BENCHMARKS.md (a 3x3 convolution of 16 x 256 x 256 x 32: 240 ms forward against 112 ms; its
gradients 1645 against 443 ms), while its reductions are 5-20x faster than XLA's (the sum of
8 x 32 x 32 x 384 over all but the channels: 0.5 against 14.5 ms). So we keep YNNPACK for
reductions and single matrix products (`--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce`;
without the products, attention over 4096 tokens is 25% slower). BENCHMARKS.md has the
end-to-end effect. The flag only reaches XLA if it is set before JAX starts its CPU backend,
and it is left alone when XLA_FLAGS already names it, so a user's choice wins.
"""
import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_KINDS = "individual_dot,reduce"


def _jaxlib_knows_flag() -> bool:
  """Older jaxlibs reject unknown XLA flags at start-up; the flag exists from 0.10 on."""
  try:
    from importlib.metadata import version
    major, minor = (int(part) for part in version("jaxlib").split(".")[:2])
  except Exception:  # noqa: BLE001 - no jaxlib or an unusual version string: leave XLA alone
    return False
  return (major, minor) >= (0, 10)


def configure(environ=os.environ) -> bool:
  """Add msd-jax's XLA:CPU flags to `environ['XLA_FLAGS']`; True if anything was added."""
  flags = environ.get("XLA_FLAGS", "")
  if YNN_FLAG in flags or not _jaxlib_knows_flag():
    return False
  environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}={YNN_KINDS}".strip()
  return True
