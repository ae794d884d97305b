"""Segment Anything (SAM) in Flax, in the layout of transformers' `SamModel`.

Module and parameter names follow `transformers.models.sam.modeling_sam`, so a `facebook/sam-vit-base`
checkpoint converts key by key (`msd_jax.convert.sam`). Differences from the PyTorch layout:
- NHWC: `pixel_values` are (B, S, S, 3) and image embeddings (B, S/16, S/16, C); low-resolution
  masks stay (B, point_batch, num_masks, 4*S/16, 4*S/16) as in transformers.
- The two 2x2/stride-2 transposed convolutions of the mask decoder (`SamUpscaleConv`) hold their
  kernel as (kh, kw, in, out); the converter reorders PyTorch's (in, out, kh, kw) to match.
- The prompt encoder reads the positional embedding of `SamModel.shared_image_embedding` (tied in
  transformers), so it has no copy of its own.
- The input must have the configured size (transformers raises otherwise), so relative positions
  are used at their stored length and never interpolated.
"""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# SAM's pixel statistics (0..255 scale).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclasses.dataclass(frozen=True)
class SamVisionConfig:
  hidden_size: int = 768
  output_channels: int = 256  # neck width = image embedding channels
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 1024
  patch_size: int = 16
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True
  mlp_dim: int = 3072
  use_abs_pos: bool = True
  use_rel_pos: bool = True
  window_size: int = 14
  global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
  num_pos_feats: int = 128  # = prompt encoder hidden size / 2


@dataclasses.dataclass(frozen=True)
class SamPromptEncoderConfig:
  hidden_size: int = 256
  image_size: int = 1024
  patch_size: int = 16
  mask_input_channels: int = 16
  num_point_embeddings: int = 4
  layer_norm_eps: float = 1e-6

  @property
  def image_embedding_size(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class SamMaskDecoderConfig:
  hidden_size: int = 256
  mlp_dim: int = 2048
  num_hidden_layers: int = 2
  num_attention_heads: int = 8
  attention_downsample_rate: int = 2
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  layer_norm_eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class SamConfig:
  vision_config: SamVisionConfig = SamVisionConfig()
  prompt_encoder_config: SamPromptEncoderConfig = SamPromptEncoderConfig()
  mask_decoder_config: SamMaskDecoderConfig = SamMaskDecoderConfig()

  def to_dict(self) -> dict:
    """transformers `SamConfig(**d)` keywords."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "SamConfig":
    """Builds from a transformers `config.json` dict (unknown keys are ignored)."""
    def sub(klass, values):
      names = {f.name for f in dataclasses.fields(klass)}
      kept = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (values or {}).items() if k in names}
      return klass(**kept)
    vision = dict(d.get("vision_config") or {})
    if vision.get("mlp_dim") is None:
      vision["mlp_dim"] = int(vision.get("hidden_size", 768) * vision.get("mlp_ratio", 4.0))
    return cls(sub(SamVisionConfig, vision), sub(SamPromptEncoderConfig, d.get("prompt_encoder_config")),
               sub(SamMaskDecoderConfig, d.get("mask_decoder_config")))


def vit_b() -> SamConfig:
  """SAM ViT-B (`facebook/sam-vit-base`): transformers' `SamConfig()` defaults."""
  return SamConfig()


def tiny(image_size: int = 64) -> SamConfig:
  """A small SAM for tests: 2 blocks (windowed + global), 2x2 windows that need padding."""
  return SamConfig(
      SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                      image_size=image_size, patch_size=8, mlp_dim=64, window_size=3,
                      global_attn_indexes=(1,), num_pos_feats=16),
      SamPromptEncoderConfig(hidden_size=32, image_size=image_size, patch_size=8, mask_input_channels=8),
      SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                           iou_head_hidden_dim=32),
  )


CONFIGS = {"vit_b": vit_b, "tiny": tiny}


def get_sam_config(name: str) -> SamConfig:
  if name not in CONFIGS:
    raise ValueError(f"unknown SAM config {name!r}; choose one of {tuple(CONFIGS)}")
  return CONFIGS[name]()


def preprocess(images: jax.Array, image_size: int) -> jax.Array:
  """Images in [-1, 1] (B, H, W, 3) -> SAM input (B, S, S, 3).

  Square inputs are resized to S (bilinear); non-square inputs are resized so the longest side is S
  and zero-padded bottom/right after normalisation, as SAM's processor does.
  """
  b, h, w, c = images.shape
  scale = image_size / max(h, w)
  nh, nw = int(round(h * scale)), int(round(w * scale))
  x = (images + 1.0) * 127.5
  x = jax.image.resize(x, (b, nh, nw, c), "bilinear", antialias=True)
  x = (x - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)
  return jnp.pad(x, ((0, 0), (0, image_size - nh), (0, image_size - nw), (0, 0)))


def _gelu(x):
  return nn.gelu(x, approximate=False)


class SamMLPBlock(nn.Module):
  hidden_size: int
  mlp_dim: int
  act: str = "gelu"  # vision encoder: gelu; mask decoder: relu

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.mlp_dim, name="lin1")(x)
    x = _gelu(x) if self.act == "gelu" else nn.relu(x)
    return nn.Dense(self.hidden_size, name="lin2")(x)


# ----------------------------------------------------------------------------- vision encoder


class SamPatchEmbeddings(nn.Module):
  config: SamVisionConfig

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    if pixel_values.shape[1:3] != (c.image_size, c.image_size):
      raise ValueError(f"input size {pixel_values.shape[1:3]} does not match the model ({c.image_size})")
    p = c.patch_size
    return nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", name="projection")(pixel_values)


class SamVisionAttention(nn.Module):
  """Multi-head self-attention with decomposed relative positions (MViTv2) over an (H, W) grid."""
  config: SamVisionConfig
  input_size: tuple[int, int]

  @nn.compact
  def __call__(self, x):
    c = self.config
    b, h, w, _ = x.shape
    heads = c.num_attention_heads
    head_dim = c.hidden_size // heads
    qkv = nn.Dense(3 * c.hidden_size, use_bias=c.qkv_bias, name="qkv")(x)
    q, k, v = jnp.moveaxis(qkv.reshape(b, h * w, 3, heads, head_dim), 2, 0)  # (B, HW, heads, d)
    attn = jnp.einsum("bqnd,bknd->bnqk", q * head_dim**-0.5, k)
    if c.use_rel_pos:
      rel_pos_h = self.param("rel_pos_h", nn.initializers.zeros, (2 * self.input_size[0] - 1, head_dim))
      rel_pos_w = self.param("rel_pos_w", nn.initializers.zeros, (2 * self.input_size[1] - 1, head_dim))
      rh = rel_pos_h[jnp.arange(h)[:, None] - jnp.arange(h)[None, :] + h - 1]  # (h, h, d)
      rw = rel_pos_w[jnp.arange(w)[:, None] - jnp.arange(w)[None, :] + w - 1]
      q_grid = q.reshape(b, h, w, heads, head_dim)
      rel_h = jnp.einsum("bhwnc,hkc->bnhwk", q_grid, rh)
      rel_w = jnp.einsum("bhwnc,wkc->bnhwk", q_grid, rw)
      attn = attn.reshape(b, heads, h, w, h, w) + rel_h[..., :, None] + rel_w[..., None, :]
      attn = attn.reshape(b, heads, h * w, h * w)
    attn = jax.nn.softmax(attn, axis=-1)
    out = jnp.einsum("bnqk,bknd->bqnd", attn, v).reshape(b, h, w, c.hidden_size)
    return nn.Dense(c.hidden_size, name="proj")(out)


class SamVisionLayer(nn.Module):
  config: SamVisionConfig
  window_size: int  # 0 = global attention

  @nn.compact
  def __call__(self, x):
    c = self.config
    b, h, w, ch = x.shape
    grid = c.image_size // c.patch_size
    ws = self.window_size
    y = nn.LayerNorm(epsilon=c.layer_norm_eps, name="layer_norm1")(x)
    attn = SamVisionAttention(c, (ws, ws) if ws else (grid, grid), name="attn")
    if ws:
      ph, pw = -h % ws, -w % ws
      y = jnp.pad(y, ((0, 0), (0, ph), (0, pw), (0, 0)))
      hp, wp = h + ph, w + pw
      y = y.reshape(b, hp // ws, ws, wp // ws, ws, ch).transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, ch)
      y = attn(y)
      y = y.reshape(b, hp // ws, wp // ws, ws, ws, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, ch)
      y = y[:, :h, :w]
    else:
      y = attn(y)
    x = x + y
    y = nn.LayerNorm(epsilon=c.layer_norm_eps, name="layer_norm2")(x)
    return x + SamMLPBlock(c.hidden_size, c.mlp_dim, name="mlp")(y)


class SamVisionNeck(nn.Module):
  config: SamVisionConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = nn.Conv(c.output_channels, (1, 1), use_bias=False, name="conv1")(x)
    x = nn.LayerNorm(epsilon=1e-6, name="layer_norm1")(x)
    x = nn.Conv(c.output_channels, (3, 3), padding=1, use_bias=False, name="conv2")(x)
    return nn.LayerNorm(epsilon=1e-6, name="layer_norm2")(x)


class SamVisionEncoder(nn.Module):
  """(B, S, S, 3) normalised pixels -> (B, S/p, S/p, output_channels) image embeddings."""
  config: SamVisionConfig

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    x = SamPatchEmbeddings(c, name="patch_embed")(pixel_values)
    if c.use_abs_pos:
      grid = c.image_size // c.patch_size
      x = x + self.param("pos_embed", nn.initializers.zeros, (1, grid, grid, c.hidden_size))
    for i in range(c.num_hidden_layers):
      ws = 0 if i in c.global_attn_indexes else c.window_size
      x = SamVisionLayer(c, ws, name=f"layers_{i}")(x)
    return SamVisionNeck(c, name="neck")(x)


# ----------------------------------------------------------------------------- prompt encoder


class SamPositionalEmbedding(nn.Module):
  """Random Fourier features of (x, y) coordinates in [0, 1]."""
  num_pos_feats: int
  scale: float

  @nn.compact
  def __call__(self, coords):
    pe = self.param("positional_embedding", nn.initializers.normal(self.scale), (2, self.num_pos_feats))
    x = (2 * coords - 1) @ pe * (2 * math.pi)
    return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)


class SamMaskEmbedding(nn.Module):
  config: SamPromptEncoderConfig

  @nn.compact
  def __call__(self, masks):
    c = self.config
    ch = c.mask_input_channels // 4
    x = nn.Conv(ch, (2, 2), strides=2, padding="VALID", name="conv1")(masks)
    x = _gelu(nn.LayerNorm(epsilon=c.layer_norm_eps, name="layer_norm1")(x))
    x = nn.Conv(c.mask_input_channels, (2, 2), strides=2, padding="VALID", name="conv2")(x)
    x = _gelu(nn.LayerNorm(epsilon=c.layer_norm_eps, name="layer_norm2")(x))
    return nn.Conv(c.hidden_size, (1, 1), name="conv3")(x)


class SamPromptEncoder(nn.Module):
  """Points, boxes and dense masks -> sparse (B, P, N, C) and dense (B, h, w, C) prompt embeddings.

  Points are (B, P, N, 2) as (x, y) pixels of the S x S model input with labels (B, P, N):
  1 foreground, 0 background, -1 not-a-point, -10 padding. Boxes are (B, P, 4) as x1, y1, x2, y2.
  """
  config: SamPromptEncoderConfig

  def setup(self):
    c = self.config
    self.mask_embed = SamMaskEmbedding(c)
    self.no_mask_embed = nn.Embed(1, c.hidden_size)
    self.point_embed = [nn.Embed(1, c.hidden_size) for _ in range(c.num_point_embeddings)]
    self.not_a_point_embed = nn.Embed(1, c.hidden_size)

  def _embed_points(self, pos_embed, points, labels, pad):
    points = points + 0.5
    if pad:
      points = jnp.concatenate([points, jnp.zeros(points.shape[:2] + (1, 2), points.dtype)], axis=2)
      labels = jnp.concatenate([labels, -jnp.ones(labels.shape[:2] + (1,), labels.dtype)], axis=2)
    emb = pos_embed(points / self.config.image_size)
    lab = labels[..., None]
    emb = jnp.where(lab == -1, self.not_a_point_embed.embedding[0], emb)
    emb = jnp.where(lab == -10, 0.0, emb)
    emb = jnp.where(lab == 0, emb + self.point_embed[0].embedding[0], emb)
    return jnp.where(lab == 1, emb + self.point_embed[1].embedding[0], emb)

  def _embed_boxes(self, pos_embed, boxes):
    coords = (boxes + 0.5).reshape(boxes.shape[:2] + (2, 2))
    emb = pos_embed(coords / self.config.image_size)
    corner = jnp.stack([self.point_embed[2].embedding[0], self.point_embed[3].embedding[0]])
    return emb + corner

  def __call__(self, pos_embed, input_points=None, input_labels=None, input_boxes=None, input_masks=None):
    c = self.config
    sparse = None
    batch = 1
    if input_points is not None:
      batch = input_points.shape[0]
      sparse = self._embed_points(pos_embed, input_points, input_labels, pad=input_boxes is None)
    if input_boxes is not None:
      batch = input_boxes.shape[0]
      boxes = self._embed_boxes(pos_embed, input_boxes)
      sparse = boxes if sparse is None else jnp.concatenate([sparse, boxes], axis=2)
    if input_masks is not None:
      dense = self.mask_embed(input_masks[..., None] if input_masks.ndim == 3 else input_masks)
    else:
      n = c.image_embedding_size
      dense = jnp.broadcast_to(self.no_mask_embed.embedding[0], (batch, n, n, c.hidden_size))
    return sparse, dense


# ----------------------------------------------------------------------------- mask decoder


class SamAttention(nn.Module):
  """Attention with q/k/v projected down to hidden_size / downsample_rate. Inputs (B, N, C)."""
  config: SamMaskDecoderConfig
  downsample_rate: int

  @nn.compact
  def __call__(self, query, key, value):
    c = self.config
    internal = c.hidden_size // self.downsample_rate
    heads = c.num_attention_heads
    split = lambda t: t.reshape(t.shape[:-1] + (heads, internal // heads))
    q = split(nn.Dense(internal, name="q_proj")(query))
    k = split(nn.Dense(internal, name="k_proj")(key))
    v = split(nn.Dense(internal, name="v_proj")(value))
    attn = jax.nn.softmax(jnp.einsum("bqnd,bknd->bnqk", q, k) * (internal // heads) ** -0.5, axis=-1)
    out = jnp.einsum("bnqk,bknd->bqnd", attn, v).reshape(q.shape[:-2] + (internal,))
    return nn.Dense(c.hidden_size, name="out_proj")(out)


class SamTwoWayAttentionBlock(nn.Module):
  config: SamMaskDecoderConfig
  skip_first_layer_pe: bool

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe):
    c = self.config
    ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, name=name)
    if self.skip_first_layer_pe:
      queries = SamAttention(c, 1, name="self_attn")(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + SamAttention(c, 1, name="self_attn")(q, q, queries)
    queries = ln("layer_norm1")(queries)
    q, k = queries + query_pe, keys + key_pe
    queries = queries + SamAttention(c, c.attention_downsample_rate, name="cross_attn_token_to_image")(q, k, keys)
    queries = ln("layer_norm2")(queries)
    queries = ln("layer_norm3")(queries + SamMLPBlock(c.hidden_size, c.mlp_dim, "relu", name="mlp")(queries))
    q, k = queries + query_pe, keys + key_pe
    keys = keys + SamAttention(c, c.attention_downsample_rate, name="cross_attn_image_to_token")(k, q, queries)
    return queries, ln("layer_norm4")(keys)


class SamTwoWayTransformer(nn.Module):
  config: SamMaskDecoderConfig

  @nn.compact
  def __call__(self, point_embeddings, image_embeddings, image_pe):
    c = self.config
    queries, keys = point_embeddings, image_embeddings
    for i in range(c.num_hidden_layers):
      queries, keys = SamTwoWayAttentionBlock(c, i == 0, name=f"layers_{i}")(
          queries, keys, point_embeddings, image_pe)
    attn = SamAttention(c, c.attention_downsample_rate, name="final_attn_token_to_image")
    queries = queries + attn(queries + point_embeddings, keys + image_pe, keys)
    return nn.LayerNorm(epsilon=1e-5, name="layer_norm_final_attn")(queries), keys


class SamFeedForward(nn.Module):
  hidden_dim: int
  output_dim: int
  num_layers: int

  def setup(self):
    self.proj_in = nn.Dense(self.hidden_dim)
    self.layers = [nn.Dense(self.hidden_dim) for _ in range(self.num_layers - 2)]
    self.proj_out = nn.Dense(self.output_dim)

  def __call__(self, x):
    x = nn.relu(self.proj_in(x))
    for layer in self.layers:
      x = nn.relu(layer(x))
    return self.proj_out(x)


class SamUpscaleConv(nn.Module):
  """ConvTranspose2d(kernel 2, stride 2): each input pixel paints a 2x2 output block."""
  features: int

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, c, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    y = jnp.einsum("bijc,xyco->bixjyo", x, kernel)
    return y.reshape(b, 2 * h, 2 * w, self.features) + bias


class SamMaskDecoder(nn.Module):
  """Image embeddings (B, h, w, C) + prompts (B, P, N, C) -> masks (B, P, M, 4h, 4w), IoU (B, P, M)."""
  config: SamMaskDecoderConfig

  def setup(self):
    c = self.config
    n = c.num_multimask_outputs + 1
    self.iou_token = nn.Embed(1, c.hidden_size)
    self.mask_tokens = nn.Embed(n, c.hidden_size)
    self.transformer = SamTwoWayTransformer(c)
    self.upscale_conv1 = SamUpscaleConv(c.hidden_size // 4)
    self.upscale_conv2 = SamUpscaleConv(c.hidden_size // 8)
    self.upscale_layer_norm = nn.LayerNorm(epsilon=1e-6)
    self.output_hypernetworks_mlps = [SamFeedForward(c.hidden_size, c.hidden_size // 8, 3) for _ in range(n)]
    self.iou_prediction_head = SamFeedForward(c.iou_head_hidden_dim, n, c.iou_head_depth)

  def __call__(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
               multimask_output: bool = True):
    c = self.config
    b, h, w, ch = image_embeddings.shape
    n_mask = c.num_multimask_outputs + 1
    tokens = jnp.concatenate([self.iou_token.embedding, self.mask_tokens.embedding], axis=0)
    p = 1 if sparse_prompt_embeddings is None else sparse_prompt_embeddings.shape[1]
    tokens = jnp.broadcast_to(tokens, (b, p) + tokens.shape)
    if sparse_prompt_embeddings is not None:
      tokens = jnp.concatenate([tokens, sparse_prompt_embeddings.astype(tokens.dtype)], axis=2)
    tokens = tokens.reshape((b * p,) + tokens.shape[2:])
    src = jnp.repeat((image_embeddings + dense_prompt_embeddings).reshape(b, 1, h * w, ch), p, axis=1)
    pos = jnp.broadcast_to(image_pe.reshape(-1, 1, h * w, ch), (b, p, h * w, ch))
    hs, src = self.transformer(tokens, src.reshape(b * p, h * w, ch), pos.reshape(b * p, h * w, ch))
    iou_token_out = hs[:, 0]
    mask_tokens_out = hs[:, 1:1 + n_mask]

    up = _gelu(self.upscale_layer_norm(self.upscale_conv1(src.reshape(b * p, h, w, ch))))
    up = _gelu(self.upscale_conv2(up))
    hyper_in = jnp.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
    masks = jnp.einsum("nmc,nhwc->nmhw", hyper_in, up).reshape((b, p, n_mask) + up.shape[1:3])
    iou_pred = self.iou_prediction_head(iou_token_out).reshape(b, p, n_mask)
    sl = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, :, sl], iou_pred[:, :, sl]


# ----------------------------------------------------------------------------- full model


class SamModel(nn.Module):
  config: SamConfig = SamConfig()

  def setup(self):
    c = self.config
    self.shared_image_embedding = SamPositionalEmbedding(
        c.vision_config.num_pos_feats, c.vision_config.hidden_size // 2)
    self.vision_encoder = SamVisionEncoder(c.vision_config)
    self.prompt_encoder = SamPromptEncoder(c.prompt_encoder_config)
    self.mask_decoder = SamMaskDecoder(c.mask_decoder_config)

  def get_image_embeddings(self, pixel_values):
    """(B, S, S, 3) SAM-normalised pixels (see `preprocess`) -> (B, S/p, S/p, C)."""
    return self.vision_encoder(pixel_values)

  def get_image_wide_positional_embeddings(self):
    n = self.config.prompt_encoder_config.image_embedding_size
    centers = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n
    grid = jnp.stack(jnp.meshgrid(centers, centers, indexing="xy"), axis=-1)  # (y, x, [x, y])
    return self.shared_image_embedding(grid)[None]  # (1, n, n, C)

  def decode(self, image_embeddings, input_points=None, input_labels=None, input_boxes=None,
             input_masks=None, multimask_output: bool = True):
    """Prompt encoder + mask decoder on precomputed image embeddings -> (low-res masks, IoU)."""
    if input_points is not None and input_labels is None:
      input_labels = jnp.ones(input_points.shape[:-1], jnp.int32)
    sparse, dense = self.prompt_encoder(self.shared_image_embedding, input_points, input_labels,
                                        input_boxes, input_masks)
    return self.mask_decoder(image_embeddings, self.get_image_wide_positional_embeddings(), sparse, dense,
                             multimask_output)

  def __call__(self, pixel_values=None, input_points=None, input_labels=None, input_boxes=None,
               input_masks=None, image_embeddings=None, multimask_output: bool = True):
    if (pixel_values is None) == (image_embeddings is None):
      raise ValueError("give exactly one of pixel_values and image_embeddings")
    if image_embeddings is None:
      image_embeddings = self.get_image_embeddings(pixel_values)
    return self.decode(image_embeddings, input_points, input_labels, input_boxes, input_masks,
                       multimask_output)


def init_shapes(config: SamConfig, batch: int = 1):
  """Parameter shapes (`jax.eval_shape`) for `config`, initialised through every prompt path."""
  s = config.vision_config.image_size
  n = 4 * config.prompt_encoder_config.image_embedding_size

  def all_paths(module, pixels):
    emb = module.get_image_embeddings(pixels)
    module.decode(emb, jnp.zeros((batch, 1, 1, 2)), None, jnp.zeros((batch, 1, 4)))
    return module.decode(emb, input_masks=jnp.zeros((batch, n, n, 1)))

  model = SamModel(config)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, s, s, 3)), method=all_paths))
