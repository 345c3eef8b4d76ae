"""What the hardware can do: which device a run may use, the training precision it runs fastest, and the CPU's name.

Machines of one kind differ in CPU model (some have native bf16, some only AVX2), so precision is
chosen from the machine found, never from the last one, and every timing names its CPU. A device string
is checked before any work (`resolve_device`): an unknown one, or CUDA where this torch sees none, is a
`icon2_lens.errors.BadInputError`, never a silent run on the CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .errors import BadInputError

if TYPE_CHECKING:
    import torch

__all__ = ["choose_precision", "cpu_name", "cpu_bf16_flags", "torch_cpu_bf16", "resolve_device"]

#: CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic.
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


#: The device types icon2_lens runs on.
_DEVICE_TYPES = ("cpu", "cuda", "mps")
_DEVICE_HELP = "use 'cpu', 'cuda', 'cuda:N' or 'mps', or leave it out (CUDA when available, else CPU)"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device a run uses, checked before any work.

    ``None`` is CUDA when torch sees a GPU, else the CPU. A string torch does not parse (``"banana"``), a device
    type icon2_lens does not run on (``"meta"``), or a device this machine lacks (``"cuda"`` where
    ``torch.cuda.is_available()`` is False, ``"cuda:3"`` with two GPUs, ``"mps"`` off Apple silicon) is a
    `icon2_lens.errors.BadInputError` (``option="device"``) saying what to use instead: never a silent fallback.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> try:
        ...     resolve_device("banana")
        ... except BadInputError as e:
        ...     print(e.option)
        device
    """
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(device)
    try:
        dev = device if isinstance(device, torch.device) else torch.device(name.strip())
    except (RuntimeError, TypeError, ValueError):
        raise BadInputError(f"device {name!r} (CLI: --device) is not a torch device; {_DEVICE_HELP}.",
                            option="device") from None
    if dev.type not in _DEVICE_TYPES:
        raise BadInputError(f"device {name!r} (CLI: --device) is not a device icon2_lens runs on; {_DEVICE_HELP}.",
                            option="device")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(
                f"device {name!r} (CLI: --device) asks for CUDA, but this torch sees no CUDA GPU "
                "(torch.cuda.is_available() is False: no GPU, no driver, or a CPU-only torch build); use 'cpu', or "
                "leave the device out to use CUDA where there is one.", option="device")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise BadInputError(f"device {name!r} (CLI: --device) names GPU {dev.index}, but this machine has {count} "
                                f"(cuda:0..cuda:{count - 1}); pick one of them.", option="device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise BadInputError(f"device {name!r} (CLI: --device) asks for Apple's MPS, which this machine does not have; "
                            f"{_DEVICE_HELP}.", option="device")
    return dev


def torch_cpu_bf16() -> list[str] | None:
    """Native bf16 features that torch's private CPU helpers report, or None where torch has none.

    Older torch builds expose ``torch._C._cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``;
    newer ones (2.13) do not, and the caller falls back to ``/proc/cpuinfo``.
    """
    try:
        import torch

        cpu = getattr(torch._C, "_cpu", None)
    except Exception:  # pragma: no cover - torch is a dependency
        return None
    found: list[str] = []
    asked = False
    for label, name in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx", "_is_amx_tile_supported")):
        check = getattr(cpu, name, None)
        if check is None:
            continue
        try:
            ok = bool(check())
        except Exception:
            continue
        asked = True
        if ok:
            found.append(label)
    return found if asked else None


def cpu_bf16_flags(path: str | os.PathLike[str] = "/proc/cpuinfo") -> list[str] | None:
    """The native-bf16 flags of ``/proc/cpuinfo`` (Linux), or None where it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in _CPU_BF16_FLAGS if f in flags]
    return None


def cpu_name() -> str:
    """The CPU model as ``/proc/cpuinfo`` or `platform` names it (``"CPU"`` if neither does)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def choose_precision(device: str) -> tuple[Literal["fp32", "bf16"], str]:
    """The training precision the hardware of ``device`` runs fastest, with a one-line reason.

    - CUDA: ``"bf16"`` if ``torch.cuda.is_bf16_supported()``, else ``"fp32"``.
    - CPU: ``"bf16"`` only with native bf16 arithmetic (the ``avx512_bf16`` or ``amx_bf16`` flags;
      torch's private capability checks where this torch has them, else ``/proc/cpuinfo``), else
      ``"fp32"``: without them bf16 autocast is emulated and a step is about ten times slower.
    - Anything else (``mps``, ...): ``"fp32"``.

    Args:
        device: a torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).

    Returns:
        ``(precision, reason)``, e.g. ``("fp32", "CPU without native bf16 (AMD EPYC 7B13: no avx512_bf16/amx_bf16)")``.

    Examples:
        >>> choose_precision("mps")
        ('fp32', 'mps device: fp32 (bf16 is chosen automatically only on CUDA and on CPUs with native bf16)')
    """
    kind = str(device).split(":", 1)[0].lower()
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "fp32", "CUDA asked for but not available"
        try:
            ok = bool(torch.cuda.is_bf16_supported())
        except Exception as exc:  # no CUDA runtime, no device
            return "fp32", f"CUDA bf16 support could not be checked ({type(exc).__name__}: {exc})"
        try:
            name = torch.cuda.get_device_name(device)
        except Exception:
            name = "CUDA device"
        return ("bf16", f"{name} supports bf16") if ok else ("fp32", f"{name} without bf16 support")
    if kind == "cpu":
        found = torch_cpu_bf16()
        if found is None:
            found = cpu_bf16_flags()
        name = cpu_name()
        if found is None:
            return "fp32", f"CPU ({name}) whose bf16 support could not be read: fp32 is the safe choice"
        if found:
            return "bf16", f"CPU with native bf16 ({name}: {', '.join(found)})"
        return "fp32", f"CPU without native bf16 ({name}: no {'/'.join(_CPU_BF16_FLAGS)}, bf16 would be emulated)"
    return "fp32", f"{kind} device: fp32 (bf16 is chosen automatically only on CUDA and on CPUs with native bf16)"
