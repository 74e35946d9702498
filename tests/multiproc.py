"""The one helper for multi-process tests: runs `fn(rank, world_size, *args)` on
`world_size` spawned CPU processes joined in a gloo process group, and returns each rank's
return value (a failure on any rank re-raises here with that rank's traceback). It is
pyruntime/spawn.py's run_world, shared with the multi-process benchmarks.

Spawning costs about a second per rank on CI's 2 cores: put several checks into one world.
"""
from pyruntime.spawn import TIMEOUT_S, run_world  # noqa: F401
