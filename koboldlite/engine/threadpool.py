"""ggml threadpools of KoboldLite's own, for builds whose CPU backend runs ggml's own threads rather than OpenMP's
(macOS's; tools/build_llama_lib.sh noopenmp): --cpuwait's policy reaches them through them.

Without one, llama.cpp gives each decode a threadpool ggml makes for that decode alone: every token starts and
joins its worker threads. llama-server attaches pools of its own (llama.cpp's common library); so does LlamaModel,
through this. An attached pool keeps its workers between decodes: each polls for the next decode a while (ggml's
`poll` level, 0 to 100: 1024 * 128 * poll pause instructions, POLL below), then sleeps on a condition variable, so
an idle server uses no CPU. Within a decode ggml's barrier always spins; the thread count (engine/cpu_threads.py)
meets contention there. An OpenMP build runs the threads itself and ignores a pool's poll level
(engine/cpu_policy.py sets OpenMP's waiting), so no pool is made there.

One pool per thread count: a pool runs a decode at fewer threads than it has, but every decode wakes all its
workers, and one left out polls until the next (measured beside busy programs, where the count sheds to one
thread: a pool of two ran a single stream at 0.7 to 0.9 of ggml's per-decode pools, its idle worker spinning
beside the busy loops). A pool not in use is paused by ggml (its workers sleep); one thread needs no pool at all.

Who calls what: LlamaModel makes a CountPools for its context (a draft model's LlamaModel attaches its context to
the target's), calls use(count) on its ContextPools whenever the engine sets another thread count (before the
decode that runs at it), and release() once the context is freed.
"""

from __future__ import annotations

import ctypes

from .cpu_policy import WaitPolicy

# --cpuwait as a poll level, each level 131,072 pause instructions (about 1.8 ms on a 2.1 GHz Xeon; a pause takes
# 10 to 140 cycles by CPU). spin: 2, about as long as the runtime's own spin in the OpenMP builds (libgomp's 300,000
# rounds of one). ggml's default, 50 (llama-server's), burns 0.09 s of CPU in each worker after every reply's last
# decode there, and was no faster (bench/README.md, "KoboldLite's own threadpools there"). short: the least that
# polls at all (OpenMP's short spin, 10,000 rounds, has no like here). passive: none, sleeping at once.
POLL = {WaitPolicy.SPIN: 2, WaitPolicy.SHORT: 1, WaitPolicy.PASSIVE: 0}


def poll_level(cpuwait: str) -> int:
    """--cpuwait's value (spin, short, passive) as ggml's poll level."""
    return POLL[WaitPolicy(cpuwait)]


GGML_MAX_N_THREADS = 512


class ThreadpoolParams(ctypes.Structure):
    """ggml.h's struct ggml_threadpool_params."""
    _fields_ = [("cpumask", ctypes.c_bool * GGML_MAX_N_THREADS),   # all false: the process's own affinity
                ("n_threads", ctypes.c_int),
                ("prio", ctypes.c_int),                             # 0: GGML_SCHED_PRIO_NORMAL, the inherited one
                ("poll", ctypes.c_uint32),
                ("strict_cpu", ctypes.c_bool),
                ("paused", ctypes.c_bool)]


class ThreadpoolUnavailable(Exception):
    """The CPU backend gives out no threadpool functions (a build older than them): ggml's own per-decode pools."""


class Threadpool:
    """One ggml threadpool of a fixed number of threads, made at once (its workers start polling)."""

    def __init__(self, registry, n_threads: int, poll: int):
        """`registry`: the build's GGMLRegistry (engine/llama_build.py), whose CPU backend makes the pool."""
        new, free = registry.cpu_function("ggml_threadpool_new"), registry.cpu_function("ggml_threadpool_free")
        if not new or not free:
            raise ThreadpoolUnavailable("this build's CPU backend gives out no ggml_threadpool_new")
        self._free = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(free)
        params = ThreadpoolParams(n_threads=n_threads, prio=0, poll=poll, strict_cpu=False, paused=False)
        self.handle = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(ThreadpoolParams))(new)(ctypes.byref(params))
        if not self.handle:
            raise ThreadpoolUnavailable(f"ggml_threadpool_new failed for {n_threads} threads")
        self.n_threads, self.poll = n_threads, poll

    def free(self):
        """Stop and join the workers: only once no decode will run on it, nor ggml's CPU backend hold it."""
        if self.handle:
            self._free(self.handle)
            self.handle = None


class CountPools:
    """The pools of the thread counts a model's decodes have run at, one per count (count 1: none, ggml's own pool
    of one thread starts no worker), shared by the contexts that one thread decodes on: the model's and its draft
    model's (engine/drafting.py). Their decodes never overlap, and a draft's decode between two of the model's finds
    the pool's workers awake, where a pool of its own would poll beside the model's decodes, and ggml's pool per
    decode would start and join a worker for every drafted token.

    None is freed before the last context sharing them: ggml's CPU backend holds the last pool a decode ran on
    until the next decode, and pauses it then (a paused pool wakes again when a decode starts on it). So at most
    one pool per count the adaptive count steps through (a quarter fewer at a time: on 16 cores 16, 12, 9, 7...
    nine pools), each asleep while not in use."""

    def __init__(self, registry, most: int, poll: int):
        """Makes the pool of `most` threads; ThreadpoolUnavailable where the build has none."""
        self.registry, self.most, self.poll = registry, most, poll
        self.pools: dict[int, Threadpool] = {}
        self.contexts = 0
        self.pool(most)

    def pool(self, count: int) -> Threadpool:
        """The pool of `count` threads, made now if need be."""
        if count not in self.pools:
            self.pools[count] = Threadpool(self.registry, count, self.poll)
        return self.pools[count]

    def attach(self, llama_lib, ctx, count: int) -> "ContextPools":
        """A context's decodes, from now on `count` threads on these pools."""
        self.contexts += 1
        return ContextPools(self, llama_lib, ctx, count)

    def released(self):
        """A context sharing them is freed: the last one frees every pool (its last decode has ended)."""
        self.contexts -= 1
        if self.contexts == 0:
            for pool in self.pools.values():
                pool.free()
            self.pools.clear()

    def report(self) -> dict:
        return {"threads": self.most, "poll": self.poll, "pools": sorted(self.pools), "contexts": self.contexts}


class ContextPools:
    """Which of the shared pools one llama context decodes on."""

    def __init__(self, shared: CountPools, llama_lib, ctx, count: int):
        self.shared, self.lib, self.ctx = shared, llama_lib, ctx
        for name, args in (("llama_attach_threadpool", [ctypes.c_void_p] * 3),
                           ("llama_detach_threadpool", [ctypes.c_void_p])):
            fn = getattr(llama_lib, name)       # llama-cpp-python binds neither
            fn.restype, fn.argtypes = None, args
        self.current = 0
        self.use(count)

    def use(self, count: int):
        """The next decode runs `count` threads: on that count's pool, or on none for one."""
        if count == self.current:
            return
        if count == 1:
            self.lib.llama_detach_threadpool(self.ctx)
        else:
            pool = self.shared.pool(count).handle
            self.lib.llama_attach_threadpool(self.ctx, pool, pool)      # for generation and prompt reading alike
        self.current = count

    def release(self):
        """Once the context is freed: the pools go with the last context sharing them."""
        if self.shared is not None:
            self.shared.released()
            self.shared = None

    def report(self) -> dict:
        return self.shared.report()
