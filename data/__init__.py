"""The tiny world: its generator (world, roles), its files (world/), and the graders that judge results."""

# The code of this package a training step's outputs depend on, for its cache key. The graders judge results and never
# feed a step, so a fix to one re-grades every model (the evaluate steps rerun) and retrains none.
GENERATOR = ("data.world", "data.roles")
