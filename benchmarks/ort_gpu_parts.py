"""Pack onnxruntime-gpu for a lent GPU machine that cannot reach the package index, in parts under 64 MiB.

The wheel (CUDA 13 build, 1.31: 256 MB) is over what one device call carries. Its CUDA provider holds
kernels for six GPU architectures; this keeps one (`--sm 90`: H100/H200) and zeroes the payloads of the
others inside the fatbinary (their headers stay, so the CUDA driver still parses the container and simply
picks the kept architecture), then tars and xz-compresses the package and splits it:

    python benchmarks/ort_gpu_parts.py --out .ortgpu          # → .ortgpu/part.0, part.1, SHA256
    # call 1 carries .ortgpu/part.0 and copies it to /tmp; call 2 (machine still warm) carries part.1, then:
    #   cat /tmp/part.0 .ortgpu/part.1 | xz -d | tar x -C /tmp/ortsite && export PYTHONPATH=/tmp/ortsite
    #   bash benchmarks/gpu_check.sh onnx

(2026-11-27: 69.8 MB in two parts; CUDA EP ran on an H200 with the image's own CUDA 13 / cuDNN wheels.)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
ELF_KIND = 2


def keep_one_arch(lib: bytes, sm: int) -> tuple[bytes, int]:
    """Zero the ELF (cubin) payloads of every architecture but `sm` in the .nv_fatbin section."""
    out = bytearray(lib)
    start, size = _section(lib, ".nv_fatbin")
    p, end, zeroed = start, start + size, 0
    while p < end:
        magic, _, header, body = struct.unpack_from("<IHHQ", out, p)
        if magic != FATBIN_MAGIC:
            p = out.find(struct.pack("<I", FATBIN_MAGIC), p, end)
            if p < 0:
                break
            continue
        e, stop = p + header, p + header + body
        while e < stop:
            kind, _, eheader = struct.unpack_from("<HHI", out, e)
            (payload,) = struct.unpack_from("<Q", out, e + 8)
            (arch,) = struct.unpack_from("<I", out, e + 28)
            if kind == ELF_KIND and arch != sm:
                out[e + eheader : e + eheader + payload] = bytes(payload)
                zeroed += payload
            e += eheader + payload
        p = stop
    return bytes(out), zeroed


def _section(elf: bytes, name: str) -> tuple[int, int]:
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    (str_off,) = struct.unpack_from("<Q", elf, shoff + shstrndx * shentsize + 0x18)
    for i in range(shnum):
        h = shoff + i * shentsize
        (name_off,) = struct.unpack_from("<I", elf, h)
        if elf[str_off + name_off : elf.index(b"\0", str_off + name_off)].decode() == name:
            off, sz = struct.unpack_from("<QQ", elf, h + 0x18)
            return off, sz
    raise ValueError(f"no {name} section")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", default="1.31.1")
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python")
    ap.add_argument("--sm", type=int, default=90)
    ap.add_argument("--part-mb", type=int, default=36)
    ap.add_argument("--out", type=Path, default=Path(".ortgpu"))
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    got = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            a.python,
            "--implementation",
            "cp",
            "--platform",
            "manylinux_2_28_x86_64",
            "-d",
            str(tmp),
            f"onnxruntime-gpu=={a.version}",
        ]
    )
    if got.returncode:
        sys.exit(
            f"pip could not download onnxruntime-gpu=={a.version} for Python {a.python} (manylinux_2_28 "
            "x86_64): check --version / --python against the package index"
        )
    wheel = next(tmp.glob("onnxruntime_gpu-*.whl"))
    buf = io.BytesIO()
    with zipfile.ZipFile(wheel) as z, tarfile.open(fileobj=buf, mode="w") as tar:
        for info in z.infolist():
            if info.is_dir() or info.filename.endswith("providers_tensorrt.so"):
                continue
            data = z.read(info)
            if info.filename.endswith("libonnxruntime_providers_cuda.so"):
                data, zeroed = keep_one_arch(data, a.sm)
                print(f"{info.filename}: zeroed {zeroed / 1e6:.0f} MB of other architectures' kernels")
            t = tarfile.TarInfo(info.filename)
            t.size, t.mode = len(data), 0o755 if info.filename.endswith(".so") else 0o644
            tar.addfile(t, io.BytesIO(data))
    packed = lzma.compress(buf.getvalue(), preset=6)
    a.out.mkdir(parents=True, exist_ok=True)
    step = a.part_mb * 10**6
    for i in range(0, len(packed), step):
        (a.out / f"part.{i // step}").write_bytes(packed[i : i + step])
    (a.out / "SHA256").write_text(hashlib.sha256(packed).hexdigest() + "\n")
    print(f"{len(packed) / 1e6:.1f} MB in {(len(packed) + step - 1) // step} parts under {a.out}")


if __name__ == "__main__":
    main()
