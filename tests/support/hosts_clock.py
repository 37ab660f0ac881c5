"""A skewed wall clock for one process: a tiny LD_PRELOAD library, compiled here, that adds
``APH_CLOCK_OFFSET_S`` seconds to what clock_gettime(CLOCK_REALTIME), gettimeofday and time
return, and leaves every other clock alone (deadlines inside a process run on the monotonic
clock). It stands for a host whose NTP is off, so the product needs no hook of its own.

Why not libfaketime: its 0.9.10 (Debian's) breaks Python 3.11's time.sleep (EINVAL from
clock_nanosleep when the monotonic clock is left alone, a hang when it is faked too), and slows
a node by ten times or more; this shim intercepts only the three wall-clock calls.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

OFFSET_VAR = "APH_CLOCK_OFFSET_S"
SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static long long offset_ns(void) {
    static int read;
    static long long offset;
    if (!read) {
        const char *text = getenv("APH_CLOCK_OFFSET_S");
        offset = text ? (long long)(atof(text) * 1e9) : 0;
        read = 1;
    }
    return offset;
}

static void shift(struct timespec *ts) {
    long long t = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + offset_ns();
    ts->tv_sec = t / 1000000000LL;
    ts->tv_nsec = t % 1000000000LL;
    if (ts->tv_nsec < 0) { ts->tv_nsec += 1000000000LL; ts->tv_sec -= 1; }
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = dlsym(RTLD_NEXT, "clock_gettime");
    int result = real(id, ts);
    if (result == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) shift(ts);
    return result;
}

int gettimeofday(struct timeval *tv, void *tz) {
    static int (*real)(struct timeval *, void *);
    if (!real) real = dlsym(RTLD_NEXT, "gettimeofday");
    int result = real(tv, tz);
    if (result == 0 && tv) {
        struct timespec ts = {tv->tv_sec, tv->tv_usec * 1000};
        shift(&ts);
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return result;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
"""


@functools.cache
def _library() -> str:
    """The shim, compiled once per process ("" without a C compiler)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return ""
    folder = Path(tempfile.mkdtemp(prefix="aph-clock-"))
    atexit.register(shutil.rmtree, folder, True)
    source, library = folder / "skew.c", folder / "libskew.so"
    source.write_text(SOURCE)
    built = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return str(library) if built.returncode == 0 else ""


def clock_offset_env(seconds: float) -> dict[str, str]:
    """Environment that runs a process with its wall clock ``seconds`` off; empty when no C
    compiler is here to build the shim."""
    library = _library()
    return {"LD_PRELOAD": library, OFFSET_VAR: f"{seconds:g}"} if library else {}
