"""TPU chips and slice topologies: the chip table, parsing ``v5p-8``-style names, and the compile-only
devices of a topology (``jax.experimental.topologies``, which needs libtpu)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import sys
import tempfile

from jax.experimental import topologies

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    jax_prefix: str  # the generation in JAX's topology names ("v5:2x2x1")
    dims: int  # torus dimensions: 3 (v4, v5p) or 2 (v5e, v6e)
    cores_per_chip: int  # TensorCores per chip: "v5p-8" counts cores, "v5e-8" counts chips


# Public Cloud TPU numbers (HBM as the accelerator type is sold; XLA itself allows v5p 95.74 GiB).
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1.2e12, "v4", 3, 2),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 0.82e12, "v5e", 2, 1),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2.765e12, "v5", 3, 2),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1.64e12, "v6e", 2, 1),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v6lite": "v6e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. "v5p-8"
    chip: Chip
    chips: int
    shape: tuple[int, ...]  # chips per torus dimension
    host_bounds: tuple[int, int, int]  # chips per host in each dimension

    @property
    def jax_name(self) -> str:
        return f"{self.chip.jax_prefix}:" + "x".join(map(str, self.shape))


def _torus(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape Cloud TPU uses for a power-of-two chip count: keep doubling the smallest
    dimension (the last one on ties), from 2x2x1 (3-D) or 1x1 (2-D). v5p-32 -> 2x2x4, v5e-32 -> 4x8."""
    shape = [1] * dims
    if dims == 3 and chips >= 4:
        shape = [2, 2, 1]
    while math.prod(shape) < chips:
        i = max(range(dims), key=lambda d: (-shape[d], d))
        shape[i] *= 2
    if math.prod(shape) != chips:
        raise ValueError(f"{chips} chips is not a power-of-two slice; pass the shape, e.g. v5p:4x4x12")
    return tuple(shape)


def parse_topology(name: str) -> Topology:
    """``v5p-8`` (TensorCores: 4 chips), ``v4-8`` (4 chips), ``v5e-16`` / ``v5litepod-16`` / ``v6e-16``
    (chips), or an explicit torus ``v5p:2x2x4`` / ``v6e:4x4``."""
    m = re.fullmatch(r"\s*([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)*))\s*", name.lower())
    gen = m and _ALIASES.get(m.group(1), m.group(1))
    if not m or gen not in CHIPS:
        raise ValueError(f"unknown TPU topology {name!r}; expected e.g. v5p-8, v4-8, v5e-16, v6e-8 or v5p:2x2x4 "
                         f"(generations: {', '.join(CHIPS)})")
    chip = CHIPS[gen]
    if m.group(3):
        shape = tuple(int(s) for s in m.group(3).split("x"))
        if len(shape) != chip.dims:
            raise ValueError(f"{name}: a {gen} torus has {chip.dims} dimensions")
        chips = math.prod(shape)
    else:
        count = int(m.group(2))
        if count % chip.cores_per_chip:
            raise ValueError(f"{name}: {gen} slices are named by TensorCores, a multiple of {chip.cores_per_chip}")
        chips = count // chip.cores_per_chip
        shape = _torus(chips, chip.dims)
    # Single-host slices keep all their chips on the host (v5e-8: 2x4); larger ones have 4 per host.
    if chips <= 4 or (chip.dims == 2 and chips == 8):
        host = tuple(shape) + (1,) * (3 - len(shape))
    else:
        host = (2, 2, 1)
    return Topology(name, chip, chips, shape, host)


class TpuUnavailable(RuntimeError):
    pass


@contextlib.contextmanager
def _quiet_stderr():
    """libtpu writes host-detection warnings to fd 2 when it loads on a machine without TPUs; keep
    them out of the report, and hand them back if loading fails (they are the diagnosis then)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def topology_devices(topo: Topology) -> tuple:
    """The compile-only devices of ``topo`` (loads the TPU compiler from libtpu; claims no chip)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TpuUnavailable("libtpu is not installed (it provides the TPU compiler): pip install 'realjax[tpu]'") \
            from None
    devices = _describe(topo.jax_name, "megacore" if topo.chip.cores_per_chip == 2 else "default", topo.host_bounds)
    if len(devices) != topo.chips:
        raise TpuUnavailable(f"{topo.name}: libtpu describes {len(devices)} devices, expected {topo.chips}")
    return devices


@functools.cache
def _describe(jax_name: str, chip_config: str, host_bounds: tuple) -> tuple:
    """Cached: every compile for a topology in this process sees the same device objects, hence the same
    mesh (a second description has new devices, which JAX will not mix with functions traced on the first)."""
    # libtpu takes /tmp/libtpu_lockfile so that two processes never drive the same chips. A compile
    # drives none, and must work beside a training run or another compile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    with _quiet_stderr() as log:
        try:
            desc = topologies.get_topology_desc(jax_name, "tpu", chip_config_name=chip_config,
                                                chips_per_host_bounds=host_bounds)
        except Exception as e:  # noqa: BLE001 - whatever the plugin raises, the user needs its words
            log.seek(0)
            detail = log.read().decode(errors="replace").strip().splitlines()
            raise TpuUnavailable(f"cannot describe TPU topology {jax_name}: {e}"
                                 + (f" ({detail[-1]})" if detail else "")) from None
    return tuple(desc.devices)


