"""Scale-out on a Ray cluster (``--ray``; docs/scale-out.md): the connection, importance rows as tasks, latency rows
on actors, healing on Ray Train. Imported only when a run asks for Ray."""
