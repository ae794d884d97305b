"""SAM: parity with transformers' SamModel, vit_b parameter count, automatic mask generation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import SamConfig as HFSamConfig
from transformers import SamModel as HFSamModel

from msd_jax.convert.sam import load_sam
from msd_jax.models import sam, sam_amg


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A tiny random transformers SamModel (every tensor perturbed, incl. zero-initialised positions)."""
  cfg = sam.tiny()
  assert cfg.vision_config.num_pos_feats * 2 == cfg.prompt_encoder_config.hidden_size
  torch.manual_seed(0)
  hf = HFSamModel(HFSamConfig(**cfg.to_dict())).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.1 * torch.randn_like(p))
    hf.prompt_encoder.shared_embedding.positional_embedding.copy_(hf.shared_image_embedding.positional_embedding)
  path = tmp_path_factory.mktemp("sam_tiny")
  hf.save_pretrained(path)
  model, variables = load_sam(str(path))
  return hf, model, variables, cfg


def _pixels(cfg, seed=0):
  s = cfg.vision_config.image_size
  return np.random.RandomState(seed).randn(2, 3, s, s).astype(np.float32)


def test_image_embeddings_parity(converted):
  hf, model, variables, cfg = converted
  x = _pixels(cfg)
  with torch.no_grad():
    ref = hf.get_image_embeddings(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  embed = jax.jit(lambda v, x: model.apply(v, x, method=sam.SamModel.get_image_embeddings))
  out = embed(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert out.shape == ref.shape == (2, 8, 8, cfg.vision_config.output_channels)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4 * max(1.0, np.abs(ref).max()))


@pytest.fixture(scope="module")
def decode(converted):
  _, model, _, _ = converted
  return jax.jit(lambda v, emb, kw: model.apply(v, emb, **kw, method=sam.SamModel.decode))


@pytest.mark.parametrize("prompt", ["points", "boxes", "points_and_boxes", "mask"])
def test_decoder_parity(converted, decode, prompt):
  """Prompt encoder + mask decoder on the reference image embeddings."""
  hf, _, variables, cfg = converted
  s = cfg.vision_config.image_size
  rng = np.random.RandomState(1)
  with torch.no_grad():
    emb = hf.get_image_embeddings(torch.from_numpy(_pixels(cfg)))
  points = rng.uniform(0, s, (2, 3, 2, 2)).astype(np.float32)
  labels = np.array([[[1, 0], [1, -1], [0, -10]]] * 2, np.int64)
  x1y1 = rng.uniform(0, s / 2, (2, 3, 2))
  boxes = np.concatenate([x1y1, x1y1 + rng.uniform(4, s / 2, (2, 3, 2))], -1).astype(np.float32)
  m = 4 * cfg.prompt_encoder_config.image_embedding_size
  masks = rng.randn(2, 1, m, m).astype(np.float32)
  kw = {}
  if prompt in ("points", "points_and_boxes", "mask"):
    kw.update(input_points=points, input_labels=labels)
  if prompt in ("boxes", "points_and_boxes"):
    kw["input_boxes"] = boxes
  if prompt == "mask":
    kw["input_masks"] = masks
  with torch.no_grad():
    ref = hf(image_embeddings=emb, **{k: torch.from_numpy(v) for k, v in kw.items()})
  jkw = {k: jnp.asarray(v) for k, v in kw.items()}
  if "input_masks" in jkw:
    jkw["input_masks"] = jkw["input_masks"].transpose(0, 2, 3, 1)
  low_res, iou = decode(variables, jnp.asarray(emb.numpy().transpose(0, 2, 3, 1)), jkw)
  ref_masks, ref_iou = ref.pred_masks.numpy(), ref.iou_scores.numpy()
  assert low_res.shape == ref_masks.shape == (2, 3, 3, s // 2, s // 2)
  np.testing.assert_allclose(np.asarray(low_res), ref_masks, atol=1e-3 * max(1.0, np.abs(ref_masks).max()))
  np.testing.assert_allclose(np.asarray(iou), ref_iou, atol=1e-3 * max(1.0, np.abs(ref_iou).max()))


def test_vit_b_parameter_count():
  with torch.device("meta"):
    hf = HFSamModel(HFSamConfig())
  expected = sum(p.numel() for p in hf.vision_encoder.parameters())
  expected_all = sum(p.numel() for p in hf.parameters())  # the tied prompt-encoder copy is not listed twice
  assert sam.SamConfig.from_dict(HFSamConfig().to_dict()) == sam.vit_b()
  shapes = sam.init_shapes(sam.vit_b())["params"]
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
  assert count(shapes["vision_encoder"]) == expected
  assert count(shapes) == expected_all
  assert shapes["vision_encoder"]["layers_2"]["attn"]["rel_pos_h"].shape == (127, 64)
  assert shapes["vision_encoder"]["layers_0"]["attn"]["rel_pos_h"].shape == (27, 64)


# Stubbed decoder for AMG: point i (prompted at x = i) -> three masks. Entries: mask index ->
# (rectangle x0, y0, x1, y1 inclusive, pixels set to 0.5 = inside the mask but not its stable core,
# predicted IoU). Everything else has logit -5.
_RING = [(x, 10) for x in range(11)] + [(10, y) for y in range(10)]
_STUB = {
    0: [((0, 0, 9, 9), [], 0.95),                     # kept
        ((0, 0, 9, 9), _RING, 0.99),                  # stability 100/121 < 0.95
        ((10, 10, 19, 19), [], 0.88)],                # IoU not > 0.88
    1: [((0, 0, 9, 9), [], 0.93),                     # duplicate of (0, 0): NMS
        ((0, 0, 9, 8), [], 0.90),                     # box IoU 72/81 > 0.7: NMS
        ((0, 0, 9, 4), [], 0.91)],                    # box IoU 36/81: kept
    2: [((10, 0, 19, 9), [(10 + k, 0) for k in range(5)], 0.97),  # stability exactly 95/100: passes, then NMS
        ((10, 0, 19, 9), [(10 + k, 0) for k in range(6)], 0.99),  # stability 0.94
        ((12, 12, 19, 19), [], 0.89)],                # kept
    3: [(None, [], 0.99)] * 3,                        # empty masks: stability 0
    4: [((10, 0, 19, 9), [], 0.96),                   # NMS by (4, 1)
        ((10, 0, 19, 7), [], 0.98),                   # kept, suppresses (2, 0) and (4, 0): IoU 63/81
        ((0, 0, 5, 5), [], 0.5)],
    5: [((0, 12, 5, 19), [], 0.92),                   # kept; the last batch is padded with this point
        ((0, 12, 5, 19), [], 0.1),
        ((0, 12, 5, 19), [], 0.1)],
}


def _stub_predict(points):
  logits = np.full((len(points), 3, 20, 20), -5.0, np.float32)
  iou = np.zeros((len(points), 3), np.float32)
  for p, (x, _) in enumerate(np.asarray(points)):
    for m, (rect, half, score) in enumerate(_STUB[int(x)]):
      iou[p, m] = score
      if rect is not None:
        x0, y0, x1, y1 = rect
        logits[p, m, y0:y1 + 1, x0:x1 + 1] = 5.0
      for hx, hy in half:
        logits[p, m, hy, hx] = 0.5
  return jnp.asarray(logits), jnp.asarray(iou)


def _run_stub(nms):
  points = np.stack([np.arange(6), np.zeros(6)], -1).astype(np.float32)
  return sam_amg.generate_masks(_stub_predict, points, points_per_batch=4, pred_iou_thresh=0.88,
                                stability_score_thresh=0.95, stability_score_offset=1.0,
                                box_nms_thresh=nms)


def test_amg_filters_by_iou_and_stability():
  out = _run_stub(nms=1.0)  # IoU is never > 1: no suppression
  got = [(int(p[0]), round(float(s), 2)) for p, s in zip(out["points"], out["iou_preds"])]
  assert got == [(4, 0.98), (2, 0.97), (4, 0.96), (0, 0.95), (1, 0.93), (5, 0.92), (1, 0.91), (1, 0.90),
                 (2, 0.89)]
  np.testing.assert_allclose(out["stability_scores"], [1, 0.95, 1, 1, 1, 1, 1, 1, 1], atol=1e-6)
  np.testing.assert_array_equal(out["boxes"][1], [10, 0, 19, 9])
  assert out["masks"].shape == (9, 20, 20) and out["masks"].dtype == bool
  assert out["masks"][1].sum() == 100  # 0.5 logits are inside the binary mask


def test_amg_box_nms():
  out = _run_stub(nms=0.7)
  got = [(int(p[0]), round(float(s), 2)) for p, s in zip(out["points"], out["iou_preds"])]
  assert got == [(4, 0.98), (0, 0.95), (5, 0.92), (1, 0.91), (2, 0.89)]
  np.testing.assert_array_equal(out["boxes"], [[10, 0, 19, 7], [0, 0, 9, 9], [0, 12, 5, 19], [0, 0, 9, 4],
                                               [12, 12, 19, 19]])
  expected = np.zeros((20, 20), bool)
  expected[12:20, 0:6] = True
  np.testing.assert_array_equal(out["masks"][2], expected)


def test_box_nms_matches_torchvision_rule():
  rng = np.random.RandomState(0)
  xy = rng.uniform(0, 50, (40, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (40, 2))], -1).astype(np.float32)
  scores = rng.uniform(size=40).astype(np.float32)
  keep = sam_amg.box_nms(boxes, scores, 0.5)
  iou = sam_amg.box_iou(boxes[keep], boxes[keep])
  assert (iou[np.triu_indices(len(keep), 1)] <= 0.5).all()
  assert list(scores[keep]) == sorted(scores[keep], reverse=True)
  dropped = np.setdiff1d(np.arange(40), keep)
  for d in dropped:  # every dropped box overlaps a kept, higher-scored box by more than the threshold
    assert ((sam_amg.box_iou(boxes[d:d + 1], boxes[keep])[0] > 0.5) & (scores[keep] >= scores[d])).any()


def test_point_grid():
  g = sam_amg.build_point_grid(4)
  assert g.shape == (16, 2)
  np.testing.assert_allclose(g[:4, 0], [0.125, 0.375, 0.625, 0.875])
  np.testing.assert_allclose(g[::4, 1], [0.125, 0.375, 0.625, 0.875])


def test_automatic_masks_tiny_model(converted):
  _, model, variables, cfg = converted
  yy, xx = np.mgrid[0:64, 0:64] / 64.0
  image = np.stack([np.sin(6 * xx) * np.cos(4 * yy), (xx > 0.5) * 1.0 - 0.5, yy - 0.5], -1)[None]
  embed = jax.jit(lambda v, x: model.apply(v, sam.preprocess(x, cfg.vision_config.image_size),
                                           method=sam.SamModel.get_image_embeddings))
  emb = embed(variables, jnp.asarray(image, jnp.float32))
  decode = sam_amg.point_decoder(model)
  logits, _ = decode(variables, emb, jnp.full((8, 2), 32.0))
  offset = 0.1 * float(jnp.abs(logits).mean())  # random weights: logits on an arbitrary scale
  thresholds = dict(pred_iou_thresh=-1e9, stability_score_thresh=0.3, box_nms_thresh=0.7,
                    stability_score_offset=offset)
  s = cfg.vision_config.image_size
  out = sam_amg.automatic_masks(decode, variables, emb, s, points_per_side=4, points_per_batch=8, **thresholds)
  k = len(out["masks"])
  assert k > 0 and out["masks"].shape == (k, 32, 32)
  assert (out["stability_scores"] >= 0.3).all()
  iou = sam_amg.box_iou(out["boxes"], out["boxes"])
  assert (iou[np.triu_indices(k, 1)] <= 0.7).all()
  strict = sam_amg.automatic_masks(decode, variables, emb, s, points_per_side=4, points_per_batch=8,
                                   pred_iou_thresh=float(np.median(out["iou_preds"])),
                                   stability_score_thresh=0.3, box_nms_thresh=0.7,
                                   stability_score_offset=offset)
  assert len(strict["masks"]) < k and (strict["iou_preds"] > np.median(out["iou_preds"])).all()
  g = sam_amg.mask_grid(out["masks"], (4, 4))
  assert g.shape == (4, 4) and g.min() >= 0 and g.max() <= 1


def test_mask_grid_interior_coverage():
  masks = np.zeros((2, 8, 8), bool)
  masks[0, :, :4] = True  # left half: interior = columns 0..2
  masks[1, :4, 4:] = True  # top-right quadrant: interior = rows 0..2, columns 5..7
  g = sam_amg.mask_grid(masks, (2, 2))
  np.testing.assert_allclose(g, [[12 / 16, 9 / 16], [12 / 16, 0.0]])
  assert sam_amg.mask_grid(np.zeros((0, 8, 8), bool), (2, 2)).sum() == 0
  with pytest.raises(ValueError, match="multiple"):
    sam_amg.mask_grid(masks, (3, 3))
