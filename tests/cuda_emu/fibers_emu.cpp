// Runs the CUDA channel-directed kernel's code (csrc/cuda/fibers.cuh: the launch tables, the block-to-tensor
// search, the fiber index of every thread) on the CPU, block after block and thread after thread (it has no
// __syncthreads), over gradients read from stdin; prints them after. Driven by tests/test_cuda_emulated.py.
//
// stdin (whitespace separated): T_bytes sobolev(0/1) lam ntensors, per tensor: outer L C, then per tensor its
//   outer·L·C values. stdout: per tensor its values after, "%.17g". Exit 3 when a value outside a tensor was
//   written (each tensor sits between sentinels).
#include <cstdio>
#include <iostream>
#include <vector>

#include "cuda/fibers.cuh"

using namespace fgsgd;

template <class T>
int run() {
  int sobolev, nt;
  double lam;
  std::cin >> sobolev >> lam >> nt;
  std::vector<int64_t> shape(size_t(3 * nt));
  for (auto& v : shape) std::cin >> v;
  constexpr int kPad = 64;
  constexpr T kSentinel = T(-7777.25);
  std::vector<std::vector<T>> data(static_cast<size_t>(nt));
  std::vector<FiberSlot<T>> slots(static_cast<size_t>(nt));
  for (int k = 0; k < nt; ++k) {
    const int64_t n = shape[3 * k] * shape[3 * k + 1] * shape[3 * k + 2];
    data[k].assign(size_t(n + 2 * kPad), kSentinel);
    for (int64_t i = 0; i < n; ++i) {
      double v;
      std::cin >> v;
      data[k][size_t(kPad + i)] = T(v);
    }
    slots[k] = FiberSlot<T>{data[k].data() + kPad, shape[3 * k], shape[3 * k + 1], shape[3 * k + 2]};
  }
  if (!std::cin) {
    std::fprintf(stderr, "bad input\n");
    return 2;
  }
  const T inv_lam = sobolev ? T(1) : T(1.0 / lam);  // as channel_directed.cu
  for (int first = 0; first < nt; first += cuda::kFiberSlotsPerLaunch) {
    const cuda::FiberTable<T> table = cuda::next_fiber_table(slots.data(), nt, first, sobolev != 0, lam);
    for (int64_t b = 0; b < table.block_start[table.count]; ++b)
      for (int t = 0; t < cuda::kFiberThreads; ++t) cuda::fiber_thread(table, b, t, sobolev != 0, inv_lam);
  }
  for (int k = 0; k < nt; ++k) {
    const int64_t n = int64_t(data[k].size()) - 2 * kPad;
    for (int64_t i = 0; i < kPad; ++i)
      if (data[k][size_t(i)] != kSentinel || data[k][size_t(kPad + n + i)] != kSentinel) {
        std::fprintf(stderr, "tensor %d: a value outside the tensor was written\n", k);
        return 3;
      }
  }
  for (int k = 0; k < nt; ++k)
    for (int64_t i = 0; i < int64_t(data[k].size()) - 2 * kPad; ++i) std::printf("%.17g\n", double(slots[k].x[i]));
  return 0;
}

int main() {
  int bytes;
  std::cin >> bytes;
  return bytes == 8 ? run<double>() : run<float>();
}
