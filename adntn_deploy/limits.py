"""Bounds on what a file or a flag declares, checked before anything is allocated; and the thread cap.

A few kilobytes of ONNX or checkpoint metadata can declare a weight of terabytes (a generator's
``weight_shape``, a layer's width, an input's dimensions). Every such declared size is checked here
against one limit before the tensor exists:

* ``--max-weight-bytes`` on the commands that load models (it sets the environment variable), else
* ``ADNTN_MAX_WEIGHT_BYTES`` (bytes, or a size such as ``12GiB`` / ``500M``), else
* an eighth of the memory available when the check runs (``MemAvailable`` in /proc/meminfo), else 8 GiB.

The limit bounds one model's generated weights together (they all live at once after loading) and
every single tensor a file or flag declares (a model input). Refusals raise :class:`LimitError` with
one line naming the declared size, the limit and how to raise it.

Threads: intra-op thread counts above the CPUs this process may use only add contention (5,000 TVM
threads hung, 100,000 crashed), so :func:`cap_threads` caps them with a one-line note on stderr.
"""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Iterable, Mapping

from adntn_deploy.errors import AdntnError

ENV = "ADNTN_MAX_WEIGHT_BYTES"
FLAG = "--max-weight-bytes"
#: used where the available memory cannot be read (not Linux, no /proc)
FALLBACK_LIMIT = 8 << 30
#: share of the available memory a model's declared weights may take by default. Loading needs headroom:
#: ONNX Runtime's constant folding peaked at 4-5x the generated weight (measured: +258 MB for a 64 MiB
#: weight, 5.5 GB for a 1 GiB one), so an eighth keeps the default peak within the available memory
AVAILABLE_FRACTION = 1 / 8
FLOAT_BYTES = 4

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


class LimitError(AdntnError):
    """A declared size (weight, tensor, layer) is above the memory limit, or the limit itself is malformed."""


def parse_bytes(text: str | int, source: str = FLAG) -> int:
    """A byte count from ``text``: an integer, or a number with a unit (K, M, G, T; KiB, MiB, GiB, TiB).

    ``source`` names where the text came from in the error message.

    Raises:
        LimitError: not a size, or below 1 byte.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.match(str(text))
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS or len(match.group(1)) > 30:
            raise LimitError(f"{source} {text!r} is not a size: give bytes or a size such as 12GiB or 500M")
        value = int(float(match.group(1)) * _UNITS[unit]) if "." in match.group(1) else int(match.group(1)) * _UNITS[unit]
    if value < 1:
        raise LimitError(f"{source} must be at least 1 byte, got {text!r}")
    return value


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def max_weight_bytes() -> tuple[int, str]:
    """The limit in bytes and where it comes from (for messages): the environment variable or the default.

    Raises:
        LimitError: ``ADNTN_MAX_WEIGHT_BYTES`` is set but is not a size.
    """
    given = os.environ.get(ENV, "").strip()
    if given:
        return parse_bytes(given, ENV), f"set by {FLAG} / {ENV}"
    available = available_memory()
    if available is None:
        return FALLBACK_LIMIT, "the default where available memory is unknown"
    return max(1, int(available * AVAILABLE_FRACTION)), "an eighth of the available memory"


def gib(n: int | float) -> str:
    """``n`` bytes in GiB for messages: two decimals, or three significant digits below 0.01 GiB."""
    if n >= 1 << 1000:  # beyond float range: an exponent is all a message needs
        return f"2^{int(n).bit_length() - 31} GiB"
    value = n / (1 << 30)
    return f"{value:,.2f} GiB" if value >= 0.01 else f"{value:.3g} GiB"


def _refuse(what: str, declared: int) -> None:
    limit, source = max_weight_bytes()
    if declared > limit:
        raise LimitError(
            f"{what} would take {gib(declared)}, above the limit of {gib(limit)} ({source}); if this machine has "
            f"the memory, raise it with {FLAG} or {ENV}"
        )


def check_bytes(declared: int, what: str) -> None:
    """Refuse ``declared`` bytes of ``what`` (a phrase such as "input 'x' of shape (1, 2)") above the limit.

    Raises:
        LimitError: above :func:`max_weight_bytes`.
    """
    _refuse(what, int(declared))


def tensor_bytes(shape: Iterable[int], itemsize: int = FLOAT_BYTES) -> int:
    """Bytes of a dense tensor of ``shape`` (non-negative ints) with ``itemsize``-byte elements."""
    return math.prod(int(d) for d in shape) * int(itemsize)


def check_tensor(what: str, shape: Iterable[int], itemsize: int = FLOAT_BYTES) -> None:
    """Refuse a tensor of ``shape`` that ``what`` declares (e.g. "input 'x'") when it is above the limit.

    Raises:
        LimitError: its bytes exceed :func:`max_weight_bytes`.
    """
    shape = tuple(int(d) for d in shape)
    _refuse(f"{what} of shape {shape}", tensor_bytes(shape, itemsize))


def generator_bytes(irs: Mapping[str, object]) -> int:
    """Bytes that loading every generator of ``irs`` ({layer or weight name: GeneratorIR}) takes at its peak.

    All generated weights stay (they are the model's weights), and one generator at a time adds its
    intermediates: sum of dense weights + the largest (peak intermediates - own weight), float32.
    """
    reports = [ir.report() for ir in irs.values()]  # type: ignore[attr-defined]
    dense = sum(r.dense_weight_bytes for r in reports)
    extra = max((max(r.peak_intermediate_bytes - r.dense_weight_bytes, 0) for r in reports), default=0)
    return dense + extra


def check_generators(irs: Mapping[str, object], what: str = "the model's generated weights") -> None:
    """Refuse generators whose weights (see :func:`generator_bytes`) exceed the limit, naming the largest.

    Raises:
        LimitError: above :func:`max_weight_bytes`.
    """
    if not irs:
        return
    total = generator_bytes(irs)
    limit, _ = max_weight_bytes()
    if total <= limit:
        return
    name, ir = max(irs.items(), key=lambda item: item[1].report().dense_weight_bytes)  # type: ignore[attr-defined]
    shape = " x ".join(str(d) for d in ir.weight_shape)  # type: ignore[attr-defined]
    _refuse(f"{what} ({len(irs)} generator(s), largest {name!r}: {shape})", total)


def usable_cpus() -> int:
    """CPUs this process may run on (affinity and cpuset aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def cap_threads(threads: int, what: str = "threads") -> int:
    """``threads`` capped to :func:`usable_cpus`, with a one-line note on stderr when capped.

    More threads than CPUs only make them wait for each other; thousands hang thread pools.

    Raises:
        ValueError: ``threads`` below 1.
    """
    threads = int(threads)
    if threads < 1:
        raise ValueError(f"{what} must be at least 1, got {threads}")
    cpus = usable_cpus()
    if threads > cpus:
        print(f"note: {what} {threads} capped to the {cpus} usable CPU(s)", file=sys.stderr)
        return cpus
    return threads
