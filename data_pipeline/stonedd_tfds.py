"""TFDS builder for StoneDD read from a manual directory (COCO or Labelme layout).

    builder = StoneDD(data_dir=..., config="default")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=ROOT))

The train/val/test splits are `datasets.make_splits(records, seed=0)` with its default fractions,
so they match `load_splits` with `data.seed=0` and the default config fractions.
"""
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipeline import datasets


class StoneDD(tfds.core.GeneratorBasedBuilder):
  """StoneDD stone surface defects: images, binary masks, label and defect type."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  # This file's path, given directly: TFDS would otherwise look it up through the optional
  # `importlib_resources` package.
  code_path = epath.Path(__file__)
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Place StoneDD in the manual directory: images/ and annotations/<name>.json (COCO), or "
      "images with Labelme json files next to them.")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "mask": tfds.features.Image(shape=(None, None, 1)),
            "label": tfds.features.ClassLabel(names=["good", "defective"]),
            "defect_type": tfds.features.ClassLabel(
                names=(datasets.GOOD,) + datasets.STONEDD_DEFECT_TYPES),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://doi.org/10.1016/j.engappai.2024.109486",
    )

  def _split_generators(self, dl_manager):
    records = datasets.validate_records(datasets.read_stonedd(str(dl_manager.manual_dir)))
    splits = datasets.make_splits(records, seed=0)
    return {name: self._generate_examples(split) for name, split in splits.items()}

  def _generate_examples(self, records):
    for record in records:
      yield record.path, {
          "image": datasets.load_image(record),
          "mask": np.asarray(datasets.load_mask(record))[..., None] * np.uint8(255),
          "label": record.label,
          "defect_type": record.defect_type,
          "file_name": record.path,
      }
