"""MSD experiment configs.

Use as `--config=configs/msd.py:VARIANT` with VARIANT in
  full   paper sizes: SD-1.5-shaped UNet and VAE, 256 px, batch 12, Adam lr 1e-5
  small  one GPU: the full layout at narrower widths
  tiny   tests: seconds on a CPU
  demo   CPU, minutes: the embedded synthetic stone data, every stage
Overrides: `--config.train.batch_size=4`. Unknown keys fail (ml_collections locks the dict).
"""
import ml_collections

VARIANTS = ("full", "small", "tiny", "demo")


def _vae(variant):
  """diffusers `AutoencoderKL` config keys."""
  c = ml_collections.ConfigDict()
  c.in_channels = 3
  c.out_channels = 3
  c.latent_channels = 4
  c.scaling_factor = 0.18215
  c.layers_per_block = {"full": 2, "small": 2, "tiny": 1, "demo": 1}[variant]
  c.block_out_channels = {
      "full": (128, 256, 512, 512),
      "small": (64, 128, 256, 256),
      "tiny": (8, 16, 16, 16),
      "demo": (32, 64, 64, 64),
  }[variant]
  c.norm_num_groups = {"full": 32, "small": 32, "tiny": 4, "demo": 16}[variant]
  return c


def _unet(variant):
  """diffusers `UNet2DConditionModel` config keys."""
  c = ml_collections.ConfigDict()
  c.in_channels = 4
  c.out_channels = 4
  c.layers_per_block = {"full": 2, "small": 2, "tiny": 1, "demo": 1}[variant]
  c.block_out_channels = {
      "full": (320, 640, 1280, 1280),
      "small": (128, 256, 512, 512),
      "tiny": (16, 32),
      "demo": (64, 128, 128),
  }[variant]
  n = len(c.block_out_channels)
  c.down_block_types = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
  c.up_block_types = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
  c.cross_attention_dim = {"full": 768, "small": 256, "tiny": 24, "demo": 64}[variant]
  c.attention_head_dim = {"full": 8, "small": 8, "tiny": 8, "demo": 8}[variant]
  c.norm_num_groups = {"full": 32, "small": 32, "tiny": 8, "demo": 32}[variant]
  return c


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  variant = arg or "demo"
  if variant not in VARIANTS:
    raise ValueError(f"unknown config variant {variant!r}; choose one of {VARIANTS}")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.kind = "synthetic"  # synthetic | stonedd | mvtec | magnetic_tile
  config.data.root = ""  # synthetic: generated here (default: <workdir>/data)
  config.data.image_size = {"full": 256, "small": 256, "tiny": 32, "demo": 128}[variant]
  config.data.skip_bad = False

  config.model = ml_collections.ConfigDict()
  config.model.vae = _vae(variant)
  config.model.unet = _unet(variant)

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = {"full": 12, "small": 8, "tiny": 2, "demo": 8}[variant]
  config.train.learning_rate = {"full": 1e-5, "small": 1e-4, "tiny": 1e-3, "demo": 2e-4}[variant]

  config.lock()
  return config
