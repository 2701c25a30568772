"""Ahead-of-time compilation for TPU topologies on this host: ``topology`` (chips, slices, compile-only
devices), ``compile`` (the RL step's programs, their memory and FLOPs, the step's time bound),
``report`` (the table). The command is ``realjax.cli.compile``."""
