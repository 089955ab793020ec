// CPU kernels: at::parallel_for over components, each calling the shared math of csrc/fgsgd.
#pragma once
#include <vector>

#include "../fgsgd/batched.h"

namespace fgsgd {
namespace cpu {

template <class T> void proj(const UnaryArgs<T>& a, int A, int B);
template <class T> void retr(const UnaryArgs<T>& a, int A, int B);
template <class T> void projx(const UnaryArgs<T>& a, int A, int B);
template <class T> void norms(const UnaryArgs<T>& a, int A, int B);

// A slot with TensorSlot::interleave = L > 0 is a channels-last conv weight whose kh×kw filters are the components
// (csrc/cpu/interleaved.h); its gradient has its layout.
template <class T> void multi_step(const std::vector<TensorSlot<T>>& slots, int A, int B, const StepHParams<T>& h);
template <class T> void multi_sqnorm(const std::vector<TensorSlot<T>>& slots, int A, int B, T weight_decay);
template <class T> void multi_projx(const std::vector<TensorSlot<T>>& slots, int A, int B);
template <class T> void multi_rescale(const std::vector<TensorSlot<T>>& slots, int A, int B);
template <class T> void group_scale(const GroupScaleArgs<T>& a);

// The instruction set of the fused step's fast path (csrc/cpu/fast.h): "avx512" (AVX-512 F/VL/DQ/BW, float
// only: double runs avx2's lanes), "avx2" (AVX2 + FMA), each where the CPU has it, "base" (the build's
// baseline: SSE2 on x86-64), or "scalar" (one component at a time, no fast path); the first the CPU runs by
// default. Chosen once from the CPU, or from the environment variable FGSGD_CPU_ISA;
// set_isa changes it (tests and benchmarks). set_isa returns false for a name this CPU or build
// cannot run, and changes nothing then.
const char* isa();
bool set_isa(const char* name);

}  // namespace cpu
}  // namespace fgsgd
