"""The cffi declarations must match the installed llama.h byte for byte.

A small C program compiled against the header prints sizeof/offsetof of every
by-value struct; cffi's view of our cdef must agree (a version drift fails here
instead of corrupting memory at run time).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from llamafleet.backends.llama._cdef import BY_VALUE_STRUCTS, CDEF


def _header() -> str | None:
    from llamafleet.backends.llama import binding
    return binding.find_header()


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc/cc) to check the struct layout")
    header = _header()
    if header is None:
        pytest.skip("llama.h not found (llama-cpp-python 0.3.36 not installed?)")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "llama.h"',
             "int main(void) {"]
    for struct, fields in BY_VALUE_STRUCTS.items():
        lines.append(f'printf("{struct}|sizeof|%zu\\n", sizeof({struct}));')
        for f in fields:
            lines.append(f'printf("{struct}|{f}|%zu\\n", offsetof({struct}, {f}));')
    lines += ["return 0;", "}"]
    d = tmp_path_factory.mktemp("layout")
    src = d / "layout.c"
    src.write_text("\n".join(lines))
    exe = d / "layout"
    inc = os.path.dirname(header)
    proc = subprocess.run([gcc, "-std=c11", f"-I{inc}", str(src), "-o", str(exe)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.fail(f"layout probe did not compile against {header}:\n{proc.stderr[-3000:]}")
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=True)
    result: dict[str, int] = {}
    for line in out.stdout.splitlines():
        struct, field, value = line.split("|")
        result[f"{struct}|{field}"] = int(value)
    return result


def test_struct_sizes_and_offsets(c_layout: dict[str, int]) -> None:
    from cffi import FFI
    ffi = FFI()
    ffi.cdef(CDEF)
    mismatches = []
    for struct, fields in BY_VALUE_STRUCTS.items():
        want = c_layout[f"{struct}|sizeof"]
        got = ffi.sizeof(struct)
        if want != got:
            mismatches.append(f"sizeof({struct}): C {want}, cffi {got}")
        for f in fields:
            want = c_layout[f"{struct}|{f}"]
            got = ffi.offsetof(struct, f)
            if want != got:
                mismatches.append(f"offsetof({struct}, {f}): C {want}, cffi {got}")
    assert not mismatches, "cdef drifted from llama.h:\n" + "\n".join(mismatches)


def test_every_field_declared(c_layout: dict[str, int]) -> None:
    """The cffi struct has exactly the listed fields, in order (none missing or extra)."""
    from cffi import FFI
    ffi = FFI()
    ffi.cdef(CDEF)
    for struct, fields in BY_VALUE_STRUCTS.items():
        declared = [name for name, _ in ffi.typeof(struct).fields]
        assert declared == fields, struct
