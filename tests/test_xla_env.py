"""msd_jax.xla_env: the XLA:CPU flags set on import, and a user's own choice left alone."""
import os

from msd_jax import xla_env


def test_adds_the_ynn_flag_to_other_flags():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_env.configure(env)
  assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                              "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce")
  assert not xla_env.configure(env)  # once only


def test_sets_the_flag_when_xla_flags_is_unset():
  env = {}
  assert xla_env.configure(env)
  assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"


def test_keeps_a_users_own_value():
  env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
  assert not xla_env.configure(env)
  assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="


def test_importing_msd_jax_configured_this_process():
  assert "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce" in os.environ["XLA_FLAGS"]
