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
  c.latent_channels = {"demo": 16}.get(variant, 4)
  c.scaling_factor = 0.18215
  c.layers_per_block = {"full": 2, "small": 2, "tiny": 1, "demo": 1}[variant]
  c.block_out_channels = {
      "full": (128, 256, 512, 512),
      "small": (64, 128, 256, 256),
      "tiny": (8, 16, 16, 16),
      "demo": (32, 64, 64),  # f = 4 (the other variants: f = 8): a 16 x 16 latent at 64 px
  }[variant]
  n = len(c.block_out_channels)
  c.down_block_types = ("DownEncoderBlock2D",) * n
  c.up_block_types = ("UpDecoderBlock2D",) * n
  c.norm_num_groups = {"full": 32, "small": 32, "tiny": 4, "demo": 16}[variant]
  c.dtype = "float32"  # activations; "bfloat16" on accelerators (params stay float32)
  c.patch_shortcut = variant == "demo"  # + a linear patch autoencoder (msd_jax/models/vae.py)
  c.deep = variant != "demo"  # False: that patch autoencoder alone, no SD encoder / decoder
  return c


def _unet(variant):
  """diffusers `UNet2DConditionModel` config keys."""
  c = ml_collections.ConfigDict()
  c.in_channels = c.out_channels = {"demo": 16}.get(variant, 4)  # = model.vae.latent_channels
  c.layers_per_block = {"full": 2, "small": 2, "tiny": 1, "demo": 1}[variant]
  c.block_out_channels = {
      "full": (320, 640, 1280, 1280),
      "small": (128, 256, 512, 512),
      "tiny": (16, 32),
      "demo": (32, 64, 64),
  }[variant]
  n = len(c.block_out_channels)
  c.down_block_types = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
  c.up_block_types = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
  c.cross_attention_dim = {"full": 768, "small": 256, "tiny": 24, "demo": 32}[variant]
  c.attention_head_dim = {"full": 8, "small": 8, "tiny": 2, "demo": 4}[variant]  # heads (diffusers' naming)
  c.norm_num_groups = {"full": 32, "small": 32, "tiny": 8, "demo": 16}[variant]
  c.dtype = "float32"  # activations; "bfloat16" on accelerators (params stay float32)
  c.remat = False  # recompute each resnet / transformer block in the backward pass
  return c


def _sgen(variant):
  """SGEN (msd_jax/models/sgen.py): BPNet pyramid, semantic modules, SFF; the control encoder
  copies the UNet's encoder config."""
  c = ml_collections.ConfigDict()
  c.use_bpnet = True  # False: DiAD's plain conv hint encoder (ControlNet conditioning embedding)
  c.use_sff = True  # False: the control outputs go straight to the zero convs
  c.bpnet_widths = {  # BasicBlock stage widths at strides 4, 8, 16, 32
      "full": (64, 128, 256, 512),
      "small": (32, 64, 128, 256),
      "tiny": (8, 8, 16, 16),
      "demo": (16, 16, 32, 32),
  }[variant]
  c.bpnet_depths = {"full": (2, 2, 2, 2), "small": (2, 2, 2, 2), "tiny": (1, 1, 1, 1),
                    "demo": (1, 1, 1, 1)}[variant]
  c.semantic_depth = {"full": 2, "small": 1, "tiny": 1, "demo": 1}[variant]  # refine convs per level
  c.bpnet_norm_num_groups = {"full": 32, "small": 16, "tiny": 4, "demo": 8}[variant]  # + semantic
  # + a 1x1 projection of the image's latent (not in the paper; demo trains from scratch in
  # minutes, see msd_jax/models/sgen.py)
  c.latent_hint = {"demo": True}.get(variant, False)
  c.hint_block_out_channels = {  # plain hint encoder widths (use_bpnet=False)
      "full": (16, 32, 96, 256),
      "small": (16, 32, 96, 256),
      "tiny": (4, 8, 8, 16),
      "demo": (16, 32, 32, 64),
  }[variant]
  return c


def _scorer(variant):
  """Feature-space anomaly scorer: backbone (msd_jax.models.scorer) and map/score (msd_jax.scoring)."""
  c = ml_collections.ConfigDict()
  # efficientnet_lite0 | efficientnet_lite2 | resnet50 | wide_resnet50_2 | resnet_tiny
  c.backbone = {"full": "resnet50"}.get(variant, "efficientnet_lite0")
  c.weights = ""  # "": EfficientNet-Lite0 from its pip package; else a .pth/.safetensors/.npz/folder
  # the paper's f1-f3; "pixels" adds the images themselves as a stride-1 layer (msd_jax/scoring.py)
  c.layers = {"demo": ("pixels", "s4", "s8", "s16")}.get(variant, ("s4", "s8", "s16"))
  c.map_type = "feature"  # feature (1 - cos, the paper) | pixel (|x - x_hat|, ablation)
  # feature distance: cosine (the paper) | whitened (the residual's Mahalanobis length under the
  # residuals of `whitening_images` defect-free training images; msd_jax/scoring.py)
  c.distance = {"demo": "whitened"}.get(variant, "cosine")
  c.whitening_images = 64
  c.whitening_shrinkage = 0.01  # covariance shrinkage, a fraction of the mean variance
  # Gaussian smoothing of the map, pixels: the paper's 4 at 256 px; demo: the same at 64 px
  c.sigma = {"demo": 1.0}.get(variant, 4.0)
  c.pool_size = {"full": 16, "small": 16, "tiny": 4, "demo": 4}[variant]  # image score pooling
  # > 0: the image score is the larger of the map's and its local peaks' (the map minus its
  # Gaussian background of this many pixels), each z-scored on defect-free training images
  # (msd_jax/scoring.py). demo: the test image AUROC of five demo models +0.02-0.04, bubbles
  # +0.2, the held-out set +0.01 on average.
  c.local_contrast = {"demo": 4.0, "tiny": 2.0}.get(variant, 0.0)
  c.input_scale = 1.0  # > 1: both images enlarged (bilinear) before the backbone
  c.input_pad = 0  # pixels of padding around the scorer input (multiple of the largest stride)
  c.pad_mode = "reflect"  # reflect | symmetric | edge | constant, for input_pad
  c.border_margin = 0  # pixels at each image edge left out of the image score
  # shift x_hat by the per-image, per-channel mean of x - x_hat before scoring (an offset of the
  # whole reconstruction's tone is not a defect)
  c.match_mean = variant == "demo"
  # x_hat is compared with: input (x, the paper) | autoencoder (D(E(x)): the detail a lossy
  # autoencoder drops cancels; the vae stage's validation always uses the input). demo's
  # autoencoder is nearly lossless (model.vae.patch_shortcut), so it compares with the input.
  c.reference = {"demo": "input"}.get(variant, "autoencoder")
  return c


def _mgkd(variant):
  """MGKD (msd_jax/models/mgkd.py): teacher, mask source, student, L_KD and the context tokens.
  The token width is config.model.unet.cross_attention_dim; lambda is config.stages.msd.kd_weight."""
  c = ml_collections.ConfigDict()
  stand_in = variant != "full"
  c.teacher = "efficientnet_lite0" if stand_in else "sam_vit_b"  # sam_vit_b | efficientnet_lite0
  c.mask_source = "slic" if stand_in else "sam"  # sam | slic
  c.sam = ml_collections.ConfigDict()
  c.sam.model = "tiny" if variant == "tiny" else "vit_b"  # msd_jax.models.sam.CONFIGS
  c.sam.weights = ""  # transformers SamModel folder (facebook/sam-vit-base); required for SAM
  c.amg = ml_collections.ConfigDict()  # SAM automatic mask generation
  c.amg.points_per_side = {"full": 32, "small": 32, "tiny": 4, "demo": 32}[variant]
  c.amg.points_per_batch = 64
  c.amg.pred_iou_thresh = 0.88
  c.amg.stability_score_thresh = 0.95
  c.amg.stability_score_offset = 1.0
  c.amg.box_nms_thresh = 0.7
  c.slic = ml_collections.ConfigDict()  # skimage.segmentation.slic
  c.slic.n_segments = {"full": 64, "small": 64, "tiny": 8, "demo": 64}[variant]
  c.slic.compactness = 10.0
  c.student_width = {"full": 256, "small": 128, "tiny": 16, "demo": 32}[variant]
  c.student_depth = {"full": 4, "small": 2, "tiny": 1, "demo": 1}[variant]  # residual blocks
  c.student_norm_num_groups = {"full": 32, "small": 32, "tiny": 4, "demo": 8}[variant]
  c.num_context_tokens = {"full": 64, "small": 64, "tiny": 4, "demo": 16}[variant]  # a square
  c.alpha = 1.0  # MSE weight
  c.beta = 1.0  # KL weight
  c.tau = 1.0  # softmax temperature over channels
  c.mask_emphasis = 1.0  # loss weight per location = 1 + mask_emphasis * G
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
  config.data.image_size = {"full": 256, "small": 256, "tiny": 32, "demo": 64}[variant]
  config.data.skip_bad = False  # True: log and skip unreadable or inconsistent files
  config.data.seed = 0  # splits
  config.data.k_shot = 0  # > 0: train on the first k defect-free images only
  config.data.val_normal_fraction = 0.1  # of defect-free objects
  config.data.test_normal_fraction = 0.2  # of defect-free objects
  config.data.val_defect_fraction = 0.2  # of defective objects, the rest is test
  config.data.augment = ml_collections.ConfigDict()  # training only
  config.data.augment.flip = True
  config.data.augment.rot90 = True
  config.data.augment.color_jitter = 0.05  # max brightness shift; contrast/saturation 1 +- 2x
  # > 0: training, validation and eval.py use native-resolution tiles of this size (each resized
  # to image_size) instead of whole images resized to image_size; detect.py mirrors it.
  config.data.tile_size = 0
  config.data.tile_overlap = 32  # minimum overlap of neighbouring tiles, pixels
  config.data.synthetic = ml_collections.ConfigDict()  # kind=synthetic
  config.data.synthetic.num_normal = {"full": 800, "small": 400, "tiny": 16, "demo": 120}[variant]
  config.data.synthetic.num_defect = {"full": 240, "small": 120, "tiny": 12, "demo": 36}[variant]
  config.data.synthetic.size = {"full": 256, "small": 256, "tiny": 64, "demo": 256}[variant]
  config.data.synthetic.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.vae = _vae(variant)
  config.model.unet = _unet(variant)

  config.diffusion = ml_collections.ConfigDict()  # diffusers DDPMScheduler/DDIMScheduler keys
  config.diffusion.num_train_timesteps = 1000
  config.diffusion.beta_schedule = "scaled_linear"  # linear | scaled_linear | squaredcos_cap_v2
  config.diffusion.beta_start = 0.00085
  config.diffusion.beta_end = 0.012
  # epsilon (SD v1) | v_prediction | sample. demo trains its UNet from scratch in minutes, with
  # restoration targets: predicting the clean latent directly keeps every target bounded (an eps
  # or v target that leads a corrupted latent back grows like 1 / sqrt(1 - alpha_bar_t) at low t).
  config.diffusion.prediction_type = {"demo": "sample"}.get(variant, "epsilon")
  config.diffusion.t_start = {"full": 999, "small": 999, "tiny": 999, "demo": 249}[variant]  # partial noising
  config.diffusion.num_inference_steps = {"full": 10, "small": 10, "tiny": 2, "demo": 5}[variant]
  config.diffusion.eta = 0.0  # DDIM stochasticity
  # True: the last DDIM step returns the predicted clean latent (alpha_bar before step 0 = 1).
  # SD's scheduler config has False, which leaves sqrt(1 - alpha_bar_0) = 3% of the predicted
  # noise in every reconstruction.
  config.diffusion.set_alpha_to_one = True
  config.model.scorer = _scorer(variant)
  config.model.sgen = _sgen(variant)
  config.model.mgkd = _mgkd(variant)

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = {"full": 12, "small": 8, "tiny": 2, "demo": 8}[variant]
  config.train.learning_rate = {"full": 1e-5, "small": 1e-4, "tiny": 1e-3, "demo": 3e-4}[variant]
  config.train.warmup_steps = {"full": 500, "small": 200, "tiny": 0, "demo": 20}[variant]
  # after warmup: constant (the paper) | cosine (to 0 at the end of each stage)
  config.train.lr_decay = "constant"
  config.train.grad_clip_norm = 1.0  # global norm of the trained leaves; 0 = off
  config.train.adam_b1 = 0.9
  config.train.adam_b2 = 0.999
  config.train.ema_decay = 0.0  # > 0: EMA of the trained weights, used for validation and test
  config.train.checkpoint_every = {"full": 2000, "small": 1000, "tiny": 2, "demo": 400}[variant]
  config.train.keep_checkpoints = 3  # the last K, plus the best by validation

  config.mesh = ml_collections.ConfigDict()  # axes ('data', 'fsdp'); batch split over both
  config.mesh.data = -1  # -1: all devices left after fsdp
  config.mesh.fsdp = 1  # > 1: shard each large parameter on its largest divisible axis
  config.mesh.fsdp_min_size = 2**14  # smaller leaves stay replicated

  # Stages run in `order`; each resumes from its own checkpoints and is skipped when finished.
  # `trainable` lists regexes over '/'-joined parameter paths (re.match); the rest is frozen.
  config.stages = ml_collections.ConfigDict()
  config.stages.order = ("vae", "teacher_cache", "msd")
  config.stages.vae = ml_collections.ConfigDict()
  config.stages.vae.num_steps = {"full": 20000, "small": 10000, "tiny": 2, "demo": 100}[variant]
  config.stages.vae.learning_rate = {"full": 4.5e-6, "small": 1e-4, "tiny": 1e-3, "demo": 1e-3}[variant]
  config.stages.vae.kl_weight = 1e-6
  config.stages.vae.init_logvar = -10.0  # starting posterior log-variance (vae.with_posterior_logvar)
  config.stages.vae.perceptual_weight = 0.0  # > 0: + the scorer's 1 - cos of x and x_hat
  config.stages.vae.init_checkpoint = ""  # converted AutoencoderKL params (skips training)
  # After training (not with converted weights, which keep model.vae.scaling_factor): latent
  # scale = 1 / std of the latents of the first `scale_images` training images (LDM scale_by_std).
  config.stages.vae.scale_by_std = True
  # with scale_by_std: one scale per latent channel (msd.MSD.latent_scale_from_data)
  config.stages.vae.scale_per_channel = variant == "demo"
  config.stages.vae.scale_images = 64  # also the images of the patch shortcut's PCA
  config.stages.vae.trainable = ("vae/",)
  config.stages.msd = ml_collections.ConfigDict()
  config.stages.msd.num_steps = {"full": 100000, "small": 30000, "tiny": 2, "demo": 1600}[variant]
  config.stages.msd.kd_weight = 1.0  # lambda in L_MSD = eps-loss + lambda * L_KD
  config.stages.msd.grid_dropout = 0.5  # P(student input z0 * 1, as at inference, not z0 * G)
  # Restoration training (msd_jax.anomalies; 0 = the paper's objective): this fraction of the
  # images gets synthetic anomalies and the target is the clean latent, for t >= restore_min_t.
  config.stages.msd.restore_prob = {"demo": 0.9}.get(variant, 0.5)
  config.stages.msd.restore_min_t = 100
  # loss weight per latent position: 1 + restore_weight * its corrupted fraction
  config.stages.msd.restore_weight = {"demo": 10.0}.get(variant, 0.0)
  # Training timesteps drawn from [0, max_t) (0: all of them). Reconstruction never runs the
  # denoiser above diffusion.t_start; demo, trained for minutes, spends every step below it.
  config.stages.msd.max_t = {"demo": 250}.get(variant, 0)
  # > 0: + this weight x the scorer's 1 - cos between x and the decoded predicted clean latent
  # (msd_jax.models.msd): reconstructions trained in the space they are scored in. demo: on its
  # validation split image / pixel AUROC 0.85 / 0.96 -> 0.95 / 0.98 (weight 3: 0.87 / 0.98).
  config.stages.msd.perceptual_weight = {"demo": 1.0}.get(variant, 0.0)
  # DiAD's choice for a pretrained SD UNet: SGEN, UNet decoder, MGKD student + context. demo has
  # no pretrained UNet, so a frozen encoder would be a random one: it trains the whole UNet.
  config.stages.msd.trainable = {"demo": ("sgen/", "unet/", "mgkd/")}.get(variant, (
      "sgen/", "unet/up_blocks_", "unet/conv_norm_out/", "unet/conv_out/", "mgkd/"))

  config.eval = ml_collections.ConfigDict()  # validation split only; the test split is eval.py's
  config.eval.every_steps = {"full": 5000, "small": 2000, "tiny": 2, "demo": 400}[variant]
  config.eval.batch_size = {"full": 12, "small": 8, "tiny": 2, "demo": 8}[variant]
  config.eval.best_metric = "val_auroc"  # mean of image and pixel AUROC

  config.log = ml_collections.ConfigDict()  # clu writers and ReportProgress, process 0 only
  config.log.every_steps = {"full": 100, "small": 50, "tiny": 1, "demo": 25}[variant]
  config.log.num_images = 4  # inputs, reconstructions and heatmaps per validation

  config.lock()
  return config
