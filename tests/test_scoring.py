"""Anomaly maps, smoothing, image scores and the jitted score function."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from configs.msd import get_config
from msd_jax import scoring
from msd_jax.models import scorer


@pytest.fixture(scope="module")
def backbone():
  module = scorer.resnet_tiny()
  return module, scorer.init_variables(module, seed=0)


def _config(**overrides):
  config = get_config("tiny").model.scorer
  config.layers = ("s4", "s8", "s16")
  config.local_contrast = 0.0
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


def _images(seed=0, n=2, hw=64):
  rng = np.random.default_rng(seed)
  x = ndimage.gaussian_filter(rng.uniform(-1, 1, (n, hw, hw, 3)), (0, 2, 2, 0)) * 3
  return np.clip(x, -1, 1).astype(np.float32)


def test_identical_images_give_zero_map_and_a_changed_patch_lights_up(backbone):
  module, variables = backbone
  score = scoring.make_score_fn(module, variables, _config())
  x = _images()
  maps, scores = score(x, x)
  assert maps.shape == (2, 64, 64) and scores.shape == (2,)
  assert np.abs(np.asarray(maps)).max() < 1e-6 and np.abs(np.asarray(scores)).max() < 1e-6

  x_hat = x.copy()
  x_hat[1, 20:36, 36:52] = -x_hat[1, 20:36, 36:52]  # only image 1 changes, in this patch
  maps, scores = map(np.asarray, score(x, x_hat))
  assert np.abs(maps[0]).max() < 1e-6 and scores[1] > 0
  r, c = np.unravel_index(np.argmax(maps[1]), maps[1].shape)
  assert 16 <= r < 40 and 32 <= c < 56
  inside = maps[1, 20:36, 36:52].mean()
  far = np.concatenate([maps[1, :8].ravel(), maps[1, :, :16].ravel()]).mean()
  assert inside > 5 * far


def test_anomaly_map_is_one_minus_cosine_summed_over_layers():
  a = np.ones((1, 2, 2, 3), np.float32)
  b = a.copy()
  b[0, 0, 1] = [1.0, -1.0, 0.0]  # orthogonal to (1, 1, 1): cos 0
  b[0, 1, 0] = [-2.0, -2.0, -2.0]  # opposite: cos -1
  m = np.asarray(scoring.anomaly_map({"s4": a, "s8": a}, {"s4": b, "s8": a}, ["s4", "s8"], (2, 2)))
  np.testing.assert_allclose(m[0], [[0.0, 1.0], [2.0, 0.0]], atol=1e-6)
  m2 = np.asarray(scoring.anomaly_map({"s4": a, "s8": b}, {"s4": b, "s8": a}, ["s4", "s8"], (2, 2)))
  np.testing.assert_allclose(m2, 2 * m, atol=1e-6)
  up = scoring.anomaly_map({"s4": a}, {"s4": b}, ["s4"], (8, 8))
  assert up.shape == (1, 8, 8) and float(up.max()) <= 2.0 + 1e-6


def test_feature_loss_is_mean_cosine_distance_and_differentiates_only_x_hat(backbone):
  module, variables = backbone
  config = _config()
  x, y = _images(0), _images(1)
  assert float(scoring.feature_loss(module, variables, x, x, config)) == pytest.approx(0, abs=1e-6)
  fx, fy = scoring.paired_features(module, variables, x, y, config)
  want = np.mean([np.mean(scoring.cosine_distance(fx[n], fy[n])) for n in config.layers])
  assert float(scoring.feature_loss(module, variables, x, y, config)) == pytest.approx(want, rel=1e-5)
  gx, gy = jax.grad(lambda a, b: scoring.feature_loss(module, variables, a, b, config),
                    argnums=(0, 1))(x, y)
  assert float(jnp.abs(gx).max()) == 0 and float(jnp.abs(gy).max()) > 0


def test_smooth_matches_scipy_gaussian_filter():
  m = np.random.default_rng(0).random((2, 40, 53)).astype(np.float32)
  for sigma in (1.0, 4.0):
    want = ndimage.gaussian_filter(m, (0, sigma, sigma), mode="reflect", truncate=4.0)
    np.testing.assert_allclose(scoring.smooth(jnp.asarray(m), sigma), want, atol=1e-5)
  np.testing.assert_array_equal(scoring.smooth(jnp.asarray(m), 0.0), m)


def test_local_contrast_scores_the_maps_local_peaks_z_scored_on_normal_maps():
  """The second image score is that of the map minus its Gaussian background (as scipy's
  reflect-mode filter); z-scored on texture-like normal maps, a single small peak on a quiet
  map outranks a uniformly high texture map, which the plain score ranks first."""
  rng = np.random.default_rng(0)
  config = _config(local_contrast=4.0, pool_size=2)
  m = rng.random((2, 32, 32)).astype(np.float32)
  parts = np.asarray(scoring.score_parts(jnp.asarray(m), config))
  peaks = m - ndimage.gaussian_filter(m, (0, 4, 4), mode="reflect")
  np.testing.assert_allclose(parts[:, 0], scoring.image_score(jnp.asarray(m), 2), rtol=1e-6)
  np.testing.assert_allclose(parts[:, 1], scoring.image_score(jnp.asarray(peaks), 2), rtol=1e-5,
                             atol=1e-6)
  assert scoring.score_parts(jnp.asarray(m), _config(pool_size=2)).shape == (2, 1)

  level = rng.uniform(0.5, 1.5, (16, 1, 1))  # defect-free maps: texture residual of any level
  normal = (level * (1 + 0.2 * rng.standard_normal((16, 32, 32)))).astype(np.float32)
  norm = scoring.fit_score_norm(lambda maps: (scoring.score_parts(maps, config), np.ones(16)),
                                [(jnp.asarray(normal),)])
  quiet_with_peak = np.full((32, 32), 0.5, np.float32)
  quiet_with_peak[10:12, 20:22] = 2.0
  textured = (2.0 * (1 + 0.2 * rng.standard_normal((32, 32)))).astype(np.float32)
  both = jnp.asarray(np.stack([quiet_with_peak, textured]))
  plain = np.asarray(scoring.image_score(both, 2))
  combined = np.asarray(scoring.combine_scores(scoring.score_parts(both, config), norm))
  assert plain[0] < plain[1] and combined[0] > combined[1]
  with pytest.raises(ValueError, match="at least 2 images"):
    scoring.fit_score_norm(lambda maps: (scoring.score_parts(maps, config), np.ones(1)),
                           [(both[:1],)])
  restored = scoring.score_norm_from_json(scoring.score_norm_to_json(norm))
  np.testing.assert_array_equal(restored["std"], norm["std"])


def test_score_fn_combines_parts_with_the_fitted_norm(backbone):
  module, variables = backbone
  config = _config(local_contrast=2.0)
  x = _images()
  x_hat = _images(seed=1)
  maps, parts = scoring.make_score_fn(module, variables, config, parts=True)(x, x_hat)
  norm = {"mean": np.array([0.1, 0.0], np.float32), "std": np.array([2.0, 0.5], np.float32)}
  maps2, scores = scoring.make_score_fn(module, variables, config)(x, x_hat, None, norm)
  np.testing.assert_allclose(maps2, maps)
  np.testing.assert_allclose(scores, np.max((np.asarray(parts) - norm["mean"]) / norm["std"], -1),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="no score_norm"):
    scoring.make_score_fn(module, variables, config)(x, x_hat)


def test_image_score_is_max_of_average_pool_and_border_margin_drops_edges():
  rng = np.random.default_rng(0)
  m = rng.random((3, 20, 24)).astype(np.float32)
  m[2, 0:3, 0:3] += 10.0  # an edge artefact
  p = 4
  want = np.array([max(m[b, i:i + p, j:j + p].mean() for i in range(20 - p + 1)
                       for j in range(24 - p + 1)) for b in range(3)])
  np.testing.assert_allclose(scoring.image_score(jnp.asarray(m), p), want, rtol=1e-6)
  np.testing.assert_allclose(scoring.image_score(jnp.asarray(m), 1), m.max(axis=(1, 2)), rtol=1e-6)
  with_margin = np.asarray(scoring.image_score(jnp.asarray(m), p, border_margin=3))
  assert with_margin[2] < 1.0 < want[2]
  np.testing.assert_allclose(with_margin, scoring.image_score(jnp.asarray(m[:, 3:-3, 3:-3]), p),
                             rtol=1e-6)


def test_reflect_padded_input_keeps_map_size_and_zero_for_identical(backbone):
  module, variables = backbone
  x = _images(seed=1, n=1)
  x_hat = x.copy()
  x_hat[0, :10, :10] = 0.0  # a change at the corner, where padding matters
  padded = scoring.make_score_fn(module, variables, _config(input_pad=16))
  plain = scoring.make_score_fn(module, variables, _config())
  zero, _ = padded(x, x)
  assert zero.shape == (1, 64, 64) and np.abs(np.asarray(zero)).max() < 1e-6
  m_pad, _ = padded(x, x_hat)
  m_plain, _ = plain(x, x_hat)
  assert m_pad.shape == m_plain.shape
  assert not np.allclose(m_pad, m_plain)
  with pytest.raises(ValueError, match="input_pad"):
    scoring.make_score_fn(module, variables, _config(input_pad=8))(x, x)  # s16 needs 16k


def test_enlarged_scorer_input_keeps_map_size_and_resolves_a_small_change(backbone):
  module, variables = backbone
  x = _images(seed=3, n=1)
  x_hat = x.copy()
  x_hat[0, 30:33, 40:43] = -x_hat[0, 30:33, 40:43]  # 3 x 3 pixels: under one s4 cell at 1x
  plain = scoring.make_score_fn(module, variables, _config(sigma=0.0))
  enlarged = scoring.make_score_fn(module, variables, _config(sigma=0.0, input_scale=4.0))
  zero, _ = enlarged(x, x)
  assert zero.shape == (1, 64, 64) and np.abs(np.asarray(zero)).max() < 1e-6
  m_plain, m_big = (np.asarray(f(x, x_hat)[0][0]) for f in (plain, enlarged))
  r, c = np.unravel_index(np.argmax(m_big), m_big.shape)
  assert abs(r - 31) <= 3 and abs(c - 41) <= 3
  def spread(m):  # pixels above half the peak: the blur of the map around the change
    return int((m > 0.5 * m.max()).sum())
  assert spread(m_big) < spread(m_plain)


def test_pixel_difference_map_and_pixel_score_fn():
  x = _images(seed=2)
  x_hat = x.copy()
  x_hat[0, 5:9, 5:9] += 0.5
  np.testing.assert_allclose(scoring.pixel_difference_map(x, x_hat),
                             np.abs(x - x_hat).mean(axis=-1), atol=1e-7)
  maps, scores = scoring.make_score_fn(None, None, _config(map_type="pixel", sigma=0.0,
                                                           pool_size=1))(x, x_hat)
  np.testing.assert_allclose(scores, [0.5, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match="map_type"):
    scoring.make_score_fn(None, None, _config(map_type="ssim"))(x, x_hat)


def _residual_batches(rng, cov_sqrt, mean, sizes, hw=3):
  """(feats_x, feats_xhat, valid) batches whose residual is mean + N(0, cov_sqrt cov_sqrt^T);
  invalid rows carry huge values that must not enter the fit."""
  batches = []
  for n in sizes:
    r = mean + rng.normal(size=(n, hw, hw, len(mean))) @ cov_sqrt.T
    x_hat = rng.normal(size=r.shape)
    valid = np.ones(n, bool)
    valid[-1] = False
    r[-1] = 1e6
    batches.append(({"s4": (x_hat + r).astype(np.float32)}, {"s4": x_hat.astype(np.float32)},
                    valid))
  return batches


def test_whitening_fit_matches_the_shrunk_covariance_of_valid_residuals():
  rng = np.random.default_rng(0)
  c = 4
  cov_sqrt = rng.normal(size=(c, c)) * np.array([3.0, 1.0, 0.3, 0.1])
  mean = rng.normal(size=c)
  batches = _residual_batches(rng, cov_sqrt, mean, (5, 7, 4))
  moments = lambda fx, fh, valid: scoring.residual_moments(fx, fh, ["s4"], jnp.asarray(valid))
  shrinkage = 0.1
  fit = scoring.fit_whitening(moments, batches, shrinkage)["s4"]

  r = np.concatenate([(fx["s4"] - fh["s4"])[v].reshape(-1, c) for fx, fh, v in batches]
                     ).astype(np.float64)
  cov = np.cov(r, rowvar=False, bias=True)
  shrunk = cov + shrinkage * np.trace(cov) / c * np.eye(c)
  np.testing.assert_allclose(fit["mean"], r.mean(0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(fit["whiten"] @ fit["whiten"].T, np.linalg.inv(shrunk), rtol=2e-3)
  # The fitted residuals have whitened length 1 in root mean square.
  d = scoring.whitened_distance(jnp.asarray(r, jnp.float32), 0.0, fit)
  assert float(jnp.sqrt(jnp.mean(jnp.square(d)))) == pytest.approx(1.0, rel=1e-3)

  json_round_trip = scoring.whitening_from_json(scoring.whitening_to_json({"s4": fit}))["s4"]
  for k in ("mean", "whiten", "scale"):
    np.testing.assert_array_equal(json_round_trip[k], fit[k])


def test_whitened_map_ranks_an_atypical_residual_above_a_larger_typical_one():
  rng = np.random.default_rng(1)
  cov_sqrt = np.diag([2.0, 0.05])  # texture residuals vary along the first channel only
  batches = _residual_batches(rng, cov_sqrt, np.zeros(2), (64,))
  moments = lambda fx, fh, valid: scoring.residual_moments(fx, fh, ["s4"], jnp.asarray(valid))
  whitening = scoring.fit_whitening(moments, batches, 0.01)
  base = np.ones((1, 2, 1, 2), np.float32)
  x = base + np.array([[[[3.0, 0.0]], [[0.0, 0.5]]]], np.float32)  # typical, atypical
  m = np.asarray(scoring.anomaly_map({"s4": x}, {"s4": base}, ["s4"], (2, 1), whitening))
  assert m[0, 1, 0] > 2 * m[0, 0, 0]  # though its Euclidean length is 6x smaller
  expected = scoring.whitened_distance(jnp.asarray(x), jnp.asarray(base), whitening["s4"])
  np.testing.assert_allclose(m[0, :, 0], np.asarray(expected)[0, :, 0], rtol=1e-6)


def test_whitened_score_fn_needs_a_fit_and_uses_it(backbone):
  module, variables = backbone
  config = _config(distance="whitened")
  x, x_hat = _images(0), _images(1)
  score = scoring.make_score_fn(module, variables, config)
  with pytest.raises(ValueError, match="no whitening"):
    score(x, x_hat)
  moments = scoring.make_moments_fn(module, variables, config)
  whitening = scoring.fit_whitening(moments, [(x, x_hat, np.ones(2, bool))], 0.01)
  assert set(whitening) == set(config.layers)
  maps, scores = map(np.asarray, score(x, x_hat, whitening))
  assert maps.shape == (2, 64, 64) and np.isfinite(maps).all() and (scores > 0).all()
  with pytest.raises(ValueError, match="unknown scorer distance"):
    scoring.make_score_fn(module, variables, _config(distance="l2"))


def test_pixels_layer_resolves_a_one_pixel_change_and_stays_out_of_the_perceptual_term(backbone):
  module, variables = backbone
  x = _images()
  fx = scoring.extract_features(module, variables, x, ("pixels", "s4"), input_pad=8)
  np.testing.assert_allclose(fx["pixels"], module.preprocess(x), rtol=1e-6, atol=1e-6)
  assert fx["s4"].shape[1:3] == (16, 16)
  x_hat = x.copy()
  x_hat[0, 30, 40] = -x_hat[0, 30, 40]
  pixels_only = scoring.make_score_fn(module, variables, _config(layers=("pixels",), sigma=0.0))
  maps = np.asarray(pixels_only(x, x_hat)[0])
  assert np.argwhere(maps[0] > 0).tolist() == [[30, 40]] and maps[1].max() == 0
  config = _config(layers=("pixels", "s4", "s8", "s16"))
  y = _images(1)
  assert float(scoring.feature_loss(module, variables, x, y, config)) == pytest.approx(
      float(scoring.feature_loss(module, variables, x, y, _config())), rel=1e-6)
  with pytest.raises(ValueError, match="needs a backbone layer"):
    scoring.feature_loss(module, variables, x, y, _config(layers=("pixels",)))


def test_match_mean_ignores_a_tone_offset_of_the_whole_reconstruction(backbone):
  module, variables = backbone
  x = _images() * 0.5
  offset = x + np.array([0.2, -0.1, 0.05], np.float32)
  for layers in (("pixels",), ("pixels", "s4", "s8")):
    matched = scoring.make_score_fn(module, variables, _config(layers=layers, match_mean=True))
    plain = scoring.make_score_fn(module, variables, _config(layers=layers))
    assert float(np.abs(np.asarray(matched(x, offset)[0])).max()) < 1e-5
    assert float(np.asarray(plain(x, offset)[1]).min()) > 1e-3
  spot = x.copy()
  spot[:, 20:24, 20:24] = 1.0
  maps = np.asarray(scoring.make_score_fn(module, variables, _config(
      layers=("pixels",), match_mean=True, sigma=0.0))(x, spot)[0])
  assert maps[:, 20:24, 20:24].mean() > 10 * maps[:, 40:, 40:].max()
