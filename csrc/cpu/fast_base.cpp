// The CPU fast path for the build's baseline instruction set (SSE2 on x86-64, NEON on aarch64).
#include "fast.h"
#if FGSGD_CPU_HAVE_FAST
#define FGSGD_ISA base
#define FGSGD_FAST_ENTRY(NAME) NAME##_base
#include "fast_impl.h"
#endif
