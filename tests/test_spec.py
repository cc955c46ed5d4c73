"""The resolved run spec: derived once, complete, and the same for a config written before a field
existed."""

from __future__ import annotations

import pytest

from configs import default, tpdiff
from pfm import errors
from pfm import spec as spec_lib


def test_partition_override_moves_the_sampling_steps():
  """TPDiff Table 2's partitions split the 30 steps as they split the time axis."""
  uniform = spec_lib.resolve(tpdiff.get_config())
  config = tpdiff.get_config()
  config.pyramid.partition = "2-1-1"  # as --config.pyramid.partition=2-1-1 does
  skewed = spec_lib.resolve(config)
  assert sum(uniform.steps_per_stage) == sum(skewed.steps_per_stage) == 30
  assert len(set(uniform.steps_per_stage)) == 1
  # Coarsest first: the coarsest stage has half of the time axis, and so half of the steps.
  assert skewed.steps_per_stage[0] > skewed.steps_per_stage[1] == skewed.steps_per_stage[2]
  for steps, part in zip(skewed.steps_per_stage, (2, 1, 1)):  # the partition's shares, +-1
    assert steps == pytest.approx(30 * part / 4, abs=1)


def test_explicit_steps_per_stage_win():
  config = tpdiff.get_config()
  config.sample.steps_per_stage = (5, 6, 7)
  config.pyramid.partition = "2-1-1"
  assert spec_lib.resolve(config).steps_per_stage == (5, 6, 7)


def test_a_config_without_the_optional_fields_gets_their_defaults():
  """A workdir's config.json from before these fields existed resolves as the defaults say."""
  config = default.get_config("smoke")
  for field in ("mode", "pyramid.spatial", "pyramid.diffusion", "model.scan_layers",
                "train.microbatches", "data.num_shards"):
    *sections, key = field.split(".")
    node = config
    for section in sections:
      node = node[section]
    del node[key]
  spec = spec_lib.resolve(config)
  for field, value in spec_lib.OPTIONAL_FIELDS.items():
    *sections, key = field.split(".")
    node = spec.config
    for section in sections:
      node = node[section]
    assert key in node, field
  assert spec.mode == "autoregressive" and spec.pyramid.diffusion == "flow_matching"
  assert spec.model.scan_layers is False and spec.config.train.microbatches == 1
  full = spec_lib.resolve(default.get_config("smoke"))
  assert (spec.pyramid, spec.model, spec.objective) == (full.pyramid, full.model, full.objective)


def test_resolve_is_idempotent_and_the_spec_is_hashable():
  spec = spec_lib.resolve(default.get_config("smoke"))
  assert spec_lib.resolve(spec) is spec
  assert hash(spec) == hash(spec_lib.resolve(default.get_config("smoke")))
  with pytest.raises(Exception):
    spec.config.data.height = 8  # frozen


@pytest.mark.parametrize("section, field, value, message", [
    (None, "mode", "sideways", "config.mode='sideways' is not one of"),
    ("model", "variant", "huge", "config.model.variant='huge' is not one of"),
    ("pyramid", "diffusion", "sde", "config.pyramid.diffusion='sde' is not one of"),
    ("pyramid", "partition", "1-x", "config.pyramid .*partition"),
])
def test_resolve_names_the_field(section, field, value, message):
  config = default.get_config("smoke")
  (config[section] if section else config)[field] = value
  with pytest.raises(errors.ConfigError, match=message):
    spec_lib.resolve(config)
