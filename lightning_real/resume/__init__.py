"""Resume under another plan or world size: a trained model's checkpointed parameters and
optimizer state in canonical coordinates, resliced onto the layout positions of this run.

* :mod:`~lightning_real.resume.canonical`: assemble the shards' pieces into canonical tensors
  and slice them onto a rank's layout position (ZeRO-1 slices included);
* :mod:`~lightning_real.resume.roles`: the trained roles' architectures, checked on load.

Above :mod:`lightning_real.checkpoint` (folders, shards, RNG) and :mod:`lightning_real.models`
(parameter specs, optimizer state), which it reads; the strategy and the module call it.
"""
