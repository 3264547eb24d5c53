"""Devices and processes (layer: foundation).

  sharding.py     the mesh (dp, fsdp, tp, sp) from --mesh_dim, axis names and specs, the one parameter-rule table
  distributed.py  jax.distributed initialisation from flags or the environment
  multihost.py    arrays and batches across processes: placing host values, global batches, the one read-back
"""
