"""What an arm64 userland under qemu-user needs to run LiteRT on an x86 host (measured here, 2026-12).

qemu-user passes the host's ``/proc/cpuinfo`` (x86) and ``/sys/devices/system/cpu`` through. XNNPACK's
CPU detection (pytorch/cpuinfo), running as aarch64 code, reads them as an ARM machine's and crashes:
SIGSEGV while the interpreter is created (LiteRT 2.3.0, qemu 7.2), and under Docker the process then hangs.
With the sysfs CPU directory hidden, cpuinfo finds no CPU, LiteRT does not create the XNNPACK delegate and
runs its builtin aarch64 kernels: their int8 outputs match this host's x86 XNNPACK run to within one
quantization step. (Shown an ARM CPU description instead, XNNPACK's aarch64 int8 path ran but gave the
same output for every input under qemu 7.2, so it is not used: an emulated run proves the artifact and
the builtin kernels, not XNNPACK's ARM kernels; a real board runs those.)
"""

from __future__ import annotations

#: ``docker run`` arguments for an arm64 container on an x86 host
DOCKER_ARGS = ("--tmpfs", "/sys/devices/system/cpu")
