"""The llama.cpp build that llama-cpp-python loads: which folder, its backend modules, and the CPU variant.

pip compiles llama.cpp for the CPU it is built on; the builds of tools/build_llama_lib.sh (and the executables)
load their backends at run time instead (ggml's GGML_BACKEND_DL): one CPU module per instruction-set level, of
which ggml loads the best the machine runs, and a GPU module that is skipped where its driver is missing. Who
calls what: plan_gpu() (engine/gpu.py) calls choose_build() before llama_cpp is imported, then GGMLRegistry,
whose load_backends() LlamaModel calls again, harmlessly, before it loads weights.
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import os
import re
import struct
import sys

from ..errors import ConfigError
from ..paths import program_folder


# Folders beside the program that hold a build of llama.cpp made for it, preferred in this order over pip's.
BUILDS_BESIDE_PROGRAM = (".llama-cuda/lib", ".llama-vulkan/lib", ".llama-cpu/lib")


def choose_build():
    """Point llama-cpp-python at a build of llama.cpp made beside this script (tools/build_llama_lib.sh) when
    LLAMA_CPP_LIB_PATH names none; without one, pip's build (or the one the executable carries) is loaded."""
    if not os.environ.get("LLAMA_CPP_LIB_PATH"):
        here = program_folder()
        for folder in BUILDS_BESIDE_PROGRAM:
            candidate = os.path.join(here, folder)
            if glob.glob(os.path.join(candidate, "*llama.*")):
                os.environ["LLAMA_CPP_LIB_PATH"] = candidate
                break
    folder = os.environ.get("LLAMA_CPP_LIB_PATH")
    if folder and "MTMD_CPP_LIB" not in os.environ:
        os.environ["MTMD_CPP_LIB"] = folder     # the projector's library from the same build, never pip's beside it
    # ggml's own libraries from that folder first, by path: the dynamic linker then binds libllama's needs to
    # them by name, never to another build's copies found on a library path. A module whose driver is missing
    # (libggml-vulkan without libvulkan) is skipped here; GGMLRegistry says why.
    for stem in ("ggml-base", "ggml-cpu", "ggml-vulkan", "ggml-blas", "ggml") if folder else ():
        path = ggml_library(folder, stem)
        if path is not None:
            try:
                ctypes.CDLL(path, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
            except OSError:
                pass


def ggml_library(folder: str, stem: str) -> str | None:
    """The file of one of ggml's libraries in a build's folder. The name libllama asks for (its soname:
    libggml.so.0) comes first: where the names are copies rather than links (pip's wheel, a one-file bundle),
    opening libggml.so would load a second ggml, with a registry of its own that libllama never sees."""
    sonames = sorted(n for n in os.listdir(folder) if re.fullmatch(rf"lib{re.escape(stem)}\.so\.\d+", n)) \
        if os.path.isdir(folder) else []
    for name in (*sonames, f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def module_stem(path: str) -> str:
    """libggml-cpu-haswell.so, ggml-cpu-haswell.dll -> ggml-cpu-haswell."""
    name = os.path.basename(path)
    name = name[3:] if name.startswith("lib") else name
    return name.split(".", 1)[0]


@dataclasses.dataclass
class CPUBackend:
    """The CPU code llama.cpp runs: a variant module of a dynamic-backend build, or the CPU backend built into
    the library (pip's, compiled for the machine it was built on)."""
    variant: str                  # haswell, skylakex, x64... or "built-in"
    features: list[str]           # the instruction sets its code uses, as ggml names them
    library: str | None           # the file it was loaded from
    # Why llama.cpp's extra weight buffers (AMX, and the repacked layouts beside it) must stay off, if they must
    # (amx_fault(): read from the library's file once, when the backend is found).
    extra_buffers_fault: str | None = None
    # Whether its threads run under OpenMP, the only runtime --cpuwait reaches (engine/cpu_policy.py); False:
    # ggml's own threads (a build without OpenMP, as Apple's compiler makes on macOS); None: the build says nothing.
    openmp: bool | None = None

    def describe(self) -> str:
        return f"CPU backend: {self.variant} ({', '.join(self.features) or 'baseline x86-64'})"

    def report(self) -> dict:
        """For /props and /api/extra/perf: the file's name only (a path would tell callers where things are)."""
        return {"variant": self.variant, "features": self.features,
                "library": os.path.basename(self.library) if self.library else None,
                "extra_buffers": "off: " + self.extra_buffers_fault if self.extra_buffers_fault else "on",
                "openmp": self.openmp}


class _Feature(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


# Of ggml_backend_get_features, the instruction sets (the rest say how it was built: OPENMP, REPACK...).
INSTRUCTION_SETS = ("SSE3", "SSSE3", "AVX", "AVX_VNNI", "AVX2", "F16C", "FMA", "BMI2", "AVX512", "AVX512_VBMI",
                    "AVX512_VNNI", "AVX512_BF16", "AMX_INT8", "NEON", "ARM_FMA", "FP16_VA", "DOTPROD",
                    "MATMUL_INT8", "SVE", "SME")


class GGMLRegistry:
    """ggml's registry of backends and devices, in the build llama-cpp-python loaded.

    A dynamic-backend build registers nothing until load_backends() loads its modules from its folder."""

    def __init__(self, llama_cpp_module):
        llama = llama_cpp_module.llama_cpp._lib
        self.folder = os.path.dirname(llama._name)
        if hasattr(llama, "ggml_backend_load_all_from_path"):
            # Looked up through libllama's handle (dlsym searches its dependencies): the very ggml it uses, even
            # where a bundler left another copy of libggml on the library path.
            ggml = base = llama
        else:
            ggml, base = self._load("ggml"), self._load("ggml-base")
        for lib, name, res, args in (
                (ggml, "ggml_backend_reg_count", ctypes.c_size_t, []),
                (ggml, "ggml_backend_reg_get", ctypes.c_void_p, [ctypes.c_size_t]),
                (ggml, "ggml_backend_reg_by_name", ctypes.c_void_p, [ctypes.c_char_p]),
                (base, "ggml_backend_reg_name", ctypes.c_char_p, [ctypes.c_void_p]),
                (base, "ggml_backend_reg_get_proc_address", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
                (ggml, "ggml_backend_dev_count", ctypes.c_size_t, []),
                (ggml, "ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t]),
                (base, "ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p]),
                (base, "ggml_backend_dev_description", ctypes.c_char_p, [ctypes.c_void_p]),
                (base, "ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p]),
                (base, "ggml_backend_dev_backend_reg", ctypes.c_void_p, [ctypes.c_void_p]),
                (base, "ggml_backend_dev_memory", None,
                 [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]),
                (ggml, "ggml_backend_load_all_from_path", None, [ctypes.c_char_p])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self.ggml, self.base = ggml, base

    def _load(self, stem: str) -> ctypes.CDLL:
        return ctypes.CDLL(ggml_library(self.folder, stem) or f"lib{stem}.so", mode=getattr(ctypes, "RTLD_GLOBAL", 0))

    @property
    def loads_backends(self) -> bool:
        """A dynamic-backend build: its CPU code is in variant modules beside it."""
        return bool(self.cpu_variant_files())

    def cpu_variant_files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.folder, "libggml-cpu-*.so"))
                      + glob.glob(os.path.join(self.folder, "ggml-cpu-*.dll")))

    def load_backends(self):
        """Load the folder's backend modules once (the best CPU variant, the GPU modules whose drivers answer);
        a ConfigError that names the cause when no CPU variant can run here."""
        if self.ggml.ggml_backend_reg_count() == 0:
            self.ggml.ggml_backend_load_all_from_path(self.folder.encode())
        if not self.ggml.ggml_backend_reg_by_name(b"CPU"):
            files = self.cpu_variant_files()
            raise ConfigError(
                f"llama.cpp found no CPU backend that runs on this computer in {self.folder}: "
                + (f"none of {', '.join(module_stem(f) for f in files)} loads here ({self._why_not(files)})"
                   if files else "the ggml-cpu-* files are missing (an incomplete copy of the program?)"))

    @staticmethod
    def _why_not(files: list[str]) -> str:
        """What the dynamic linker says about the first module that does not load, or that the CPU lacks what
        every one of them needs."""
        for path in files:
            try:
                ctypes.CDLL(path)
            except OSError as e:
                return str(e)
        return "each one needs instructions this CPU does not have"

    @property
    def backends(self) -> list[str]:
        return [self.base.ggml_backend_reg_name(self.ggml.ggml_backend_reg_get(i)).decode()
                for i in range(self.ggml.ggml_backend_reg_count())]

    def modules_not_loaded(self) -> dict[str, str]:
        """GPU modules in the folder that registered nothing, each with the dynamic linker's reason (a driver
        library missing: libvulkan.so.1, nvcuda.dll) or, where the module loads, that no driver answered."""
        if not self.loads_backends:      # a build with its backends linked in has no modules to miss
            return {}
        registered = {b.lower() for b in self.backends}
        out = {}
        for path in sorted(glob.glob(os.path.join(self.folder, "*ggml-*.*"))):
            name = module_stem(path)[len("ggml-"):]
            if name in ("base", "cpu", "blas") or name.startswith("cpu-") or name in registered:
                continue
            try:
                ctypes.CDLL(path)
                out[name] = "no driver answered"
            except OSError as e:
                out[name] = str(e)
        return out

    def cpu_function(self, name: str) -> int | None:
        """The address of a function the CPU backend gives out by name (ggml_backend_reg_get_proc_address: a
        dynamic-backend build's variant module exports nothing else to its users); None where it has none."""
        reg = self.ggml.ggml_backend_reg_by_name(b"CPU")
        return self.base.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None

    def cpu_backend(self) -> CPUBackend:
        reg = self.ggml.ggml_backend_reg_by_name(b"CPU")
        get = self.cpu_function("ggml_backend_get_features")
        features, openmp = [], None
        if get:
            feats = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)(get)(reg)
            openmp, i = False, 0             # ggml lists OPENMP only in a build that uses it
            while feats[i].name:
                name, on = feats[i].name.decode(), feats[i].value not in (b"0", b"")
                if on and name in INSTRUCTION_SETS:
                    features.append(name)
                openmp = openmp or (on and name == "OPENMP")
                i += 1
        library = library_of_address(get) if get else None
        stem = module_stem(library) if library else ""
        variant = stem[len("ggml-cpu-"):] if stem.startswith("ggml-cpu-") else "built-in"
        return CPUBackend(variant, features, library, amx_fault(features, library), openmp)


# GCC up to 12.2 declares _tile_loadconfig's 64-byte operand as 8 bytes ("m" (*(const void **)config)), so the
# optimizer drops the stores of the tile shapes before it: ggml's AMX kernels then load a config of empty tiles
# and their first tile instruction faults (SIGILL; seen with Debian 12's GCC 12.2.0 on a Xeon with AMX). GCC 13
# passes it to a builtin that reads all 64 bytes; whether a later 12.x was mended is not known here, so every
# GCC 12 counts as faulty (the cost: AMX unused where it would have worked).
FIRST_GCC_WITH_SOUND_TILE_CONFIG = (13, 0)


def amx_fault(features: list[str], library: str | None) -> str | None:
    """Why llama.cpp's AMX kernels would crash on this machine (the build's compiler; see above), or None where
    the CPU code has no AMX kernels or they are sound. Only its compiler is known: the CPU library's ELF .comment
    section names it; other formats (Windows' DLLs, built by MSVC) are taken as sound."""
    if "AMX_INT8" not in features or not library:
        return None
    for compiler in elf_comment(library):
        version = re.match(r"GCC: \(.*\) (\d+)\.(\d+)", compiler)
        if version and (int(version.group(1)), int(version.group(2))) < FIRST_GCC_WITH_SOUND_TILE_CONFIG:
            return (f"its AMX kernels were built by GCC {version.group(1)}.{version.group(2)}, whose AMX tile setup "
                    f"is optimized away, and would crash")
    return None


def elf_comment(path: str) -> list[str]:
    """The strings of an ELF file's .comment section (the compilers that built it); [] for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:      # 64-bit little-endian only
                return []
            shoff, = struct.unpack_from("<Q", head, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            sections = [struct.unpack_from("<I20xQQ", table, i * shentsize) for i in range(shnum)]
            names_offset, names_size = sections[shstrndx][1:]
            f.seek(names_offset)
            names = f.read(names_size)
            for name_at, offset, size in sections:
                if names[name_at:names.index(b"\0", name_at)] == b".comment":
                    f.seek(offset)
                    return [s.decode("utf-8", "replace") for s in f.read(size).split(b"\0") if s]
    except (OSError, struct.error, ValueError, IndexError):
        pass
    return []


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def library_of_address(address: int) -> str | None:
    """The file of the shared library that holds this code address (dladdr; on Windows, the module's file)."""
    try:
        if sys.platform == "win32":
            kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
            handle = ctypes.c_void_p()
            # GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS | _UNCHANGED_REFCOUNT
            if not kernel32.GetModuleHandleExW(0x4 | 0x2, ctypes.c_void_p(address), ctypes.byref(handle)):
                return None
            buf = ctypes.create_unicode_buffer(1024)
            kernel32.GetModuleFileNameW(handle, buf, len(buf))
            return buf.value or None
        libc = ctypes.CDLL(None)
        info = _DlInfo()
        libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        if libc.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) and info.dli_fname:
            return os.path.realpath(info.dli_fname.decode())
    except (OSError, AttributeError):
        pass
    return None
