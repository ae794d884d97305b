"""Device mesh, shardings and multi-host start-up.

One `Mesh` with axes ('data', 'fsdp'). Batches are split over both axes (every device holds
a distinct slice of the global batch); parameters are replicated, or with fsdp > 1 each leaf
of at least `fsdp_min_size` elements is sharded along its largest axis divisible by the fsdp
size (the rule big_vision and maxtext use for ZeRO-3-style training).
"""
import os
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Mesh from `config.mesh` (`data`, `fsdp`; -1 for data means all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  fsdp = int(mesh_config.fsdp)
  data = int(mesh_config.data)
  if data == -1:
    if len(devices) % fsdp:
      raise ValueError(f"mesh.fsdp={fsdp} does not divide the {len(devices)} devices")
    data = len(devices) // fsdp
  if data * fsdp != len(devices):
    raise ValueError(
        f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, found {len(devices)}")
  return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp_size: int, min_size: int) -> P:
  """Shard the largest axis divisible by `fsdp_size` on 'fsdp'; replicate small or odd leaves."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(tree, mesh: Mesh, min_size: int = 2**14):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) under the fsdp rule."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp_size, min_size)), tree)


def shard_batch(batch, mesh: Mesh):
  """This host's slice of a batch (numpy pytree) -> global arrays split over the mesh.

  Each process passes only its own rows (global batch / process count); on one host that is
  the whole batch.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def check_batch_size(global_batch_size: int, mesh: Mesh):
  if global_batch_size % mesh.size:
    raise ValueError(
        f"batch size {global_batch_size} is not divisible by the {mesh.size} devices of the mesh")
  if global_batch_size % jax.process_count():
    raise ValueError(
        f"batch size {global_batch_size} is not divisible by {jax.process_count()} processes")


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           local_device_ids=None) -> bool:
  """`jax.distributed.initialize` from arguments, else JAX_COORDINATOR_ADDRESS /
  JAX_NUM_PROCESSES / JAX_PROCESS_ID. Returns False (single process) when neither names a
  coordinator.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not coordinator_address:
    return False
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      local_device_ids=local_device_ids,
      initialization_timeout=int(os.environ.get("JAX_INITIALIZATION_TIMEOUT", 300)))
  return True
